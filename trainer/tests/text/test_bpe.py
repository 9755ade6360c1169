import json
import os
import subprocess
import sys

import pytest

from trainer import REPO_ROOT
from trainer.tests.golden import CLIP_DIR
from trainer.text.bpe import (
    BOS_TOKEN,
    EOS_TOKEN,
    MERGES_HEADER,
    CLIPTokenizer,
    bytes_to_unicode,
    pre_tokenize,
    train_bpe,
)


@pytest.fixture(scope="module")
def clip_tokenizer():
    return CLIPTokenizer.from_dir(CLIP_DIR)


def _shape_captions():
    colours = ["red", "green", "blue", "yellow", "white", "black"]
    shapes = ["circle", "square", "triangle", "star"]
    positions = ["on the left", "on the right", "at the top", "at the bottom", "in the center"]
    backgrounds = ["white background", "black background", "gray background"]
    captions = []
    for i, colour in enumerate(colours):
        for j, shape in enumerate(shapes):
            for k, pos in enumerate(positions):
                size = "small" if (i + j + k) % 2 else "large"
                bg = backgrounds[(i + 2 * j + k) % len(backgrounds)]
                captions.append(f"a {size} {colour} {shape} {pos}, {bg}")
    return captions


def test_matches_golden_ids(clip_tokenizer):
    with open(os.path.join(CLIP_DIR, "clip_golden.json")) as f:
        golden = json.load(f)
    assert golden["bos"] == clip_tokenizer.bos_token_id == 49406
    assert golden["eos"] == clip_tokenizer.eos_token_id == 49407
    assert len(golden["cases"]) >= 10
    for case in golden["cases"]:
        assert clip_tokenizer.encode(case["text"]) == case["ids"], case["text"]


def test_batch_layout_padding_and_truncation(clip_tokenizer):
    ids, mask = clip_tokenizer(["a photo of a cat", "cat " * 200], return_attention_mask=True)
    assert ids.shape == (2, 77) and str(ids.dtype) == "torch.int64"
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == 49407).all()
    assert mask[0].tolist() == [1] * 7 + [0] * 70
    # 200 words truncate to 75 content tokens, EOS still last.
    assert ids[1, 0] == 49406 and ids[1, 76] == 49407
    assert (ids[1, 1:76] == clip_tokenizer.encode("cat")[0]).all()
    assert mask[1].tolist() == [1] * 77
    assert clip_tokenizer("").tolist() == [[49406] + [49407] * 76]


def test_byte_alphabet_and_specials_match_real_vocab(clip_tokenizer):
    alphabet = list(bytes_to_unicode().values())
    assert [clip_tokenizer.encoder[c] for c in alphabet] == list(range(256))
    assert [clip_tokenizer.encoder[c + "</w>"] for c in alphabet] == list(range(256, 512))


def test_decode_round_trip(clip_tokenizer):
    text = "a red circle on a blue background, café"
    ids = clip_tokenizer(text)[0].tolist()
    assert clip_tokenizer.decode(ids) == "a red circle on a blue background , café"


def test_pre_tokenize_unicode_classes():
    # Letters (incl. accented and non-Latin) stay together, digits split one by one, punctuation runs group.
    assert pre_tokenize("Héllo ΔΑ 42!? it's") == ["héllo", "δα", "4", "2", "!?", "it", "'s"]
    assert pre_tokenize("x<|endoftext|>") == ["x", EOS_TOKEN]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    vocab, merges = train_bpe(_shape_captions(), vocab_size=600, out_dir=str(out))
    return str(out), vocab, merges


def test_trained_files_have_hf_clip_layout(trained):
    out, vocab, merges = trained
    with open(os.path.join(out, "merges.txt"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    assert lines[0] == MERGES_HEADER
    body = [l for l in lines[1:] if l]
    assert len(body) == len(merges) > 0
    with open(os.path.join(out, "vocab.json"), encoding="utf-8") as f:
        on_disk = json.load(f)
    assert on_disk == vocab
    ids = sorted(on_disk.values())
    assert ids == list(range(len(on_disk)))
    assert len(on_disk) <= 600
    by_id = {i: t for t, i in on_disk.items()}
    alphabet = list(bytes_to_unicode().values())
    assert [by_id[i] for i in range(256)] == alphabet
    assert [by_id[i] for i in range(256, 512)] == [c + "</w>" for c in alphabet]
    assert by_id[len(on_disk) - 2] == BOS_TOKEN and by_id[len(on_disk) - 1] == EOS_TOKEN
    # Merges in order: merge i makes token 512 + i (no duplicates arise on this corpus).
    for i, line in enumerate(body):
        a, b = line.split(" ")
        assert a in on_disk and b in on_disk
        assert by_id[512 + i] == a + b


def test_trained_tokenizer_common_words_are_single_tokens(trained):
    out, vocab, _ = trained
    tok = CLIPTokenizer.from_dir(out)
    for word in ["circle", "square", "triangle", "background", "red", "left", "the", "a"]:
        assert tok.tokenize(word) == [word + "</w>"], word
    caption = "a small red circle on the left, white background"
    ids = tok.encode(caption)
    assert len(ids) == 10  # 9 words + the comma
    assert tok.decode(tok(caption)[0].tolist()) == "a small red circle on the left , white background"
    # Unseen words still encode (byte fallback) and round-trip.
    assert tok.decode(tok.encode("zebra 123 ünïcode")) == "zebra 1 2 3 ünïcode"


def test_training_is_deterministic_and_breaks_ties_lexicographically(tmp_path):
    v1, m1 = train_bpe(["ab cd", "cd ab"], vocab_size=600)
    v2, m2 = train_bpe(["cd ab", "ab cd"], vocab_size=600)
    assert (v1, m1) == (v2, m2)
    # ('a','b</w>') and ('c','d</w>') both occur twice: the smaller pair goes first; then no pairs remain.
    assert m1 == [("a", "b</w>"), ("c", "d</w>")]
    assert len(v1) == 512 + 2 + 2


def test_training_prefers_frequent_pairs():
    _, merges = train_bpe(["xy xy xy zw"], vocab_size=515)
    assert merges == [("x", "y</w>")]
    with pytest.raises(ValueError):
        train_bpe(["a"], vocab_size=100)


def test_cli(tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(_shape_captions()) + "\n", encoding="utf-8")
    out = tmp_path / "tok"
    result = subprocess.run(
        [sys.executable, "-m", "trainer.text.bpe", "--captions", str(captions), "--vocab-size", "560", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    tok = CLIPTokenizer.from_dir(str(out))
    assert tok.vocab_size == 560
    assert tok.eos_token_id == 559 and tok.bos_token_id == 558
