"""Small models shared by the trainer's tests (seeded: the same weights in every test)."""
import torch
from torch import nn

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


CLIP_BOS = 49406
CLIP_EOS = 49407


def tiny_clip_text_encoder(**overrides) -> CLIPTextEncoder:
    """A CLIP-vocabulary text encoder with non-trivial LayerNorm affine parameters, so that a missed norm
    cannot go unnoticed."""
    torch.manual_seed(0)
    model = CLIPTextEncoder(TextEncoderConfig.tiny(vocab_size=49408, **overrides)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def clip_ids(*contents: list) -> torch.Tensor:
    """Rows of 77 CLIP ids: BOS, the content, EOS, padded with EOS."""
    rows = []
    for content in contents:
        row = [CLIP_BOS] + content + [CLIP_EOS]
        rows.append(row + [CLIP_EOS] * (77 - len(row)))
    return torch.tensor(rows, dtype=torch.long)


def ensemble_inputs(batch=2, n=3, size=8, seed=0, text_dim=32):
    """(sample, timestep, per-expert text embeddings [N,B,77,D]) for an ensemble of tiny U-Nets."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, size, size, generator=g)
    timestep = torch.tensor([37.0, 811.0][:batch])
    ehs = torch.randn(n, batch, 77, text_dim, generator=g)
    return sample, timestep, ehs
