"""The shapes tokenizer, the text encoder and the text-conditioned UNet."""

import pytest
import torch

from helpers import perturb_
from minildm.data import make_shapes
from minildm.text import (TextConditionedUNet, build_vocabulary, TextEncoder, TextEncoderConfig, Tokenizer,
                          shapes_vocabulary)
from minildm.unet import UNet, UNetConfig


def test_tokenizer_is_deterministic_and_covers_every_caption():
    captions = make_shapes(300, seed=0).captions
    a_ids, a_mask = Tokenizer()(captions)
    b_ids, b_mask = Tokenizer()(list(captions))  # a fresh tokenizer: same ids
    assert torch.equal(a_ids, b_ids) and torch.equal(a_mask, b_mask)
    assert a_ids.shape == (300, 10) and a_ids.dtype == torch.long and a_mask.dtype == torch.bool
    assert not (a_ids == Tokenizer().unk_id).any()  # every caption word is in the vocabulary
    assert Tokenizer().decode(a_ids) == captions  # a lossless round trip
    torch.testing.assert_close(a_mask, a_ids != 0)
    lengths = torch.tensor([len(c.split()) for c in captions])
    assert torch.equal(a_mask.sum(1), lengths)


def test_tokenizer_by_hand():
    tok = Tokenizer()
    voc = shapes_vocabulary()
    assert voc[:2] == ("<pad>", "<unk>") and list(voc[2:]) == sorted(voc[2:])
    ids, mask = tok(["A big BLUE circle, at the bottom-right!", "a zebra"])
    words = ["a", "big", "blue", "circle", "at", "the", "bottom", "right"]
    assert ids[0, :8].tolist() == [voc.index(w) for w in words] and ids[0, 8:].tolist() == [0, 0]
    assert ids[1, :2].tolist() == [voc.index("a"), tok.unk_id]  # unknown words are kept as <unk>
    assert mask[1].tolist() == [True, True] + [False] * 8
    assert tok(["a " * 20])[0].shape == (1, 10)  # truncated to max_len
    assert torch.equal(tok.null_ids(), torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="must start with"):
        Tokenizer(vocabulary=["a", "b"])


def _encoder():
    torch.manual_seed(0)
    return TextEncoder(TextEncoderConfig(dim=16, depth=2, heads=2)).eval()


def test_encoder_shapes_and_padding_invariance():
    """Trailing padding changes nothing at the real tokens: the same caption in a longer
    sequence gives the same embeddings, and padded positions are exactly 0."""
    enc, tok = _encoder(), Tokenizer()
    ids, mask = tok(["a small red star on the left", "a big blue circle at the bottom right"])
    out = enc(ids, mask)
    assert out.shape == (2, 10, 16)
    assert torch.equal(out[~mask], torch.zeros(int((~mask).sum()), 16))
    short = enc(ids[:, :8], mask[:, :8])  # both captions fit in 8 tokens
    torch.testing.assert_close(short, out[:, :8])


def test_encoder_empty_caption_is_zero_not_nan():
    enc, tok = _encoder(), Tokenizer()
    ids, mask = tok(["", "a red square"])
    out = enc(ids, mask)
    assert torch.isfinite(out).all() and torch.equal(out[0], torch.zeros(10, 16))


def test_encoder_attends_across_tokens():
    """A token's embedding depends on the other tokens (the transformer mixes them)."""
    enc, tok = _encoder(), Tokenizer()
    ids, mask = tok(["a red square", "a blue square"])
    out = enc(ids, mask)
    assert not torch.allclose(out[0, 2], out[1, 2], atol=1e-4)  # "square" in two contexts


def _text_unet():
    torch.manual_seed(0)
    unet = UNet(UNetConfig(in_ch=4, out_ch=4, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                           heads=2, groups=8, context_dim=16, image_size=8))
    return perturb_(TextConditionedUNet(unet, TextEncoder(TextEncoderConfig(dim=16, depth=1, heads=2))), 0.05)


def test_text_unet_output_changes_with_the_caption_and_empty_is_unconditional():
    model, tok = _text_unet().eval(), Tokenizer()
    x, t = torch.randn(1, 4, 8, 8).expand(3, -1, -1, -1), torch.full((3,), 300.0)
    ids, mask = tok(["a big blue circle at the bottom right", "a small red star at the top left", ""])
    out = model(x, t, ids)
    assert out.shape == (3, 4, 8, 8)
    assert not torch.allclose(out[0], out[1], atol=1e-4)
    torch.testing.assert_close(out[2], model(x[:1], t[:1])[0])  # empty caption == no context
    # the same as calling the UNet on the encoder's context with the mask by hand
    torch.testing.assert_close(out, model.unet(x, t, model.encoder(ids, mask), mask))


def test_text_unet_trains_the_encoder_jointly():
    model, tok = _text_unet(), Tokenizer()
    ids, _ = tok(["a big blue circle at the bottom right"] * 2)
    model(torch.randn(2, 4, 8, 8), torch.tensor([5.0, 500.0]), ids).square().mean().backward()
    assert model.encoder.token_embed.weight.grad.abs().sum() > 0


def test_dimension_mismatch_is_a_clear_error():
    unet = UNet(UNetConfig(in_ch=4, out_ch=4, ch=16, ch_mult=(1, 2), attn_resolutions=(4,), heads=2,
                           context_dim=32, image_size=8))
    with pytest.raises(ValueError, match="context_dim=32 must equal"):
        TextConditionedUNet(unet, TextEncoder(TextEncoderConfig(dim=16, heads=2)))
    with pytest.raises(ValueError, match="heads=3 must divide"):
        TextEncoderConfig(dim=16, heads=3)


def test_a_vocabulary_learnt_from_captions():
    captions = ["A red square.", "a BLUE circle, on grass", "red red sky", "a dog"]
    assert build_vocabulary(captions, 10) == ("a", "red", "blue", "circle", "dog", "grass", "on", "sky", "square")
    assert build_vocabulary(captions, 2) == ("a", "red")  # the most frequent; ties alphabetical
    tok = TextEncoderConfig(vocab_size=4, words=build_vocabulary(captions, 2)).tokenizer()
    ids, mask = tok(["a red dog"])
    assert tok.decode(ids) == ["a red <unk>"] and mask.sum() == 3  # rare words are kept as <unk>
    assert len(TextEncoderConfig().tokenizer()) == len(shapes_vocabulary())  # no words: the shapes'
