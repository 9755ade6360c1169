"""Small models shared by the training and io tests (seeded: the same weights in every test)."""
import torch

from trainer.models.afa import AFAEnsemble
from trainer.models.text_encoder import CLIPTextEncoder, TextEncoderConfig
from trainer.models.unet import CROSS_ATTN_DOWN, CROSS_ATTN_UP, PLAIN_DOWN, PLAIN_UP, UNet2DConditionModel, UNetConfig
from trainer.text.bpe import CLIPTokenizer, train_bpe

CAPTIONS = ["a red square", "a blue circle", "a red circle", "a blue square"]
TEXT_DIM = 16


def small_tokenizer():
    vocab, merges = train_bpe(CAPTIONS * 3, 560)
    return CLIPTokenizer(vocab, merges)


def small_unet_config(**overrides):
    fields = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                  down_block_types=(CROSS_ATTN_DOWN, PLAIN_DOWN), up_block_types=(PLAIN_UP, CROSS_ATTN_UP),
                  attention_head_dim=2, cross_attention_dim=TEXT_DIM, norm_num_groups=8)
    fields.update(overrides)
    return UNetConfig(**fields)


def small_text_encoder(tokenizer, seed=1):
    torch.manual_seed(seed)
    return CLIPTextEncoder(TextEncoderConfig.tiny(
        vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
        hidden_size=TEXT_DIM, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))


def small_unet(seed=2):
    torch.manual_seed(seed)
    return UNet2DConditionModel(small_unet_config())


def small_ensemble(n=3):
    unets = [small_unet(seed=10 + k) for k in range(n)]
    torch.manual_seed(5)
    return AFAEnsemble(unets, hidden=16, depth=1, heads=2, head_dim=8)


def tensors_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
