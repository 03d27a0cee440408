"""Text conditioning: a word tokenizer and a tiny transformer text encoder (the shapes, or your captions).

LDM's text-to-image model (Rombach et al. 2022, Sec. 4.3.1) conditions its UNet on the
output of a transformer tau_theta(y) over the caption's tokens, trained from scratch
together with the UNet, through cross-attention (Eq. 3). Here at toy scale:

    captions --Tokenizer--> ids (B, L) long, mask (B, L) bool
             --TextEncoder--> context (B, L, dim)      (pre-LN transformer, learned positions)
             --UNet cross-attention (context_mask = mask)

`TextConditionedUNet` puts the encoder and the UNet into one module called as
model(xt, t, ids), so `minildm.train.train_denoiser` trains both with one optimizer, and
the all-padding caption (`Tokenizer.null_ids`) is the "empty prompt" of classifier-free
guidance: the cross-attention then makes no update (see `minildm.nn.CrossAttention2d`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from minildm.data import COLORS, POSITION_PHRASES, SHAPES, SIZES
from minildm.nn import attention
from minildm.unet import UNet

PAD, UNK = "<pad>", "<unk>"


def shapes_vocabulary() -> tuple[str, ...]:
    """Every word of the `make_shapes` captions, sorted, after <pad> (id 0) and <unk> (id 1)."""
    words = {"a"} | set(SIZES) | set(COLORS) | set(SHAPES)
    for phrase in POSITION_PHRASES:
        words |= set(phrase.split())
    return (PAD, UNK) + tuple(sorted(words))


def caption_words(caption: str) -> list[str]:
    """The caption's words, lower-cased, split on anything that is not a letter."""
    return re.findall(r"[a-z]+", caption.lower())


class Tokenizer:
    """Lower-case word-level tokenizer with a fixed vocabulary: deterministic, no training.

    A caption is split on anything that is not a letter; unknown words map to <unk> (they
    are kept, so the encoder sees that something was there), and every caption is padded
    with <pad> (or truncated) to `max_len` tokens.
    """

    def __init__(self, vocabulary: Sequence[str] | None = None, max_len: int = 10):
        self.vocabulary = tuple(vocabulary) if vocabulary is not None else shapes_vocabulary()
        if self.vocabulary[:2] != (PAD, UNK):
            raise ValueError(f"the vocabulary must start with {PAD!r}, {UNK!r}; got {self.vocabulary[:2]}")
        if len(set(self.vocabulary)) != len(self.vocabulary):
            raise ValueError("the vocabulary has repeated words")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.max_len = max_len
        self.index = {w: i for i, w in enumerate(self.vocabulary)}
        self.pad_id, self.unk_id = 0, 1

    def __len__(self) -> int:
        return len(self.vocabulary)

    def words(self, caption: str) -> list[str]:
        """The caption's words (`caption_words`)."""
        return caption_words(caption)

    def __call__(self, captions: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """ids (B, max_len) int64 and mask (B, max_len) bool (True = a real token)."""
        if isinstance(captions, str):
            captions = [captions]
        ids = torch.full((len(captions), self.max_len), self.pad_id, dtype=torch.long)
        for b, caption in enumerate(captions):
            tokens = [self.index.get(w, self.unk_id) for w in self.words(caption)][: self.max_len]
            ids[b, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return ids, ids != self.pad_id

    def null_ids(self) -> Tensor:
        """The empty caption (max_len,): all padding, the unconditional input of CFG."""
        return torch.full((self.max_len,), self.pad_id, dtype=torch.long)

    def decode(self, ids: Tensor) -> list[str]:
        """Back to text (padding dropped): the inverse of __call__ up to case and punctuation."""
        return [" ".join(self.vocabulary[i] for i in row.tolist() if i != self.pad_id) for row in ids]


def build_vocabulary(captions: Sequence[str], size: int) -> tuple[str, ...]:
    """The `size` most frequent words of `captions` (ties in alphabetical order), split by
    `caption_words`: the words of a vocabulary learnt from your captions, to which
    the Tokenizer adds <pad> and <unk> (rarer words become <unk>)."""
    counts: dict[str, int] = {}
    for caption in captions:
        for w in caption_words(caption):
            counts[w] = counts.get(w, 0) + 1
    return tuple(sorted(counts, key=lambda w: (-counts[w], w))[:size])


@dataclass
class TextEncoderConfig:
    vocab_size: int = len(shapes_vocabulary())  # ids are in 0 .. vocab_size-1; 0 is padding
    words: tuple[str, ...] = ()  # the tokenizer's words after <pad> and <unk>; () = the shapes'.
    # A run on captioned images fills it from their most frequent words (vocab_size - 2 of them)
    max_len: int = 10  # L, the number of positions (learned position embeddings)
    dim: int = 64  # D, the width of the tokens; the UNet's context_dim
    depth: int = 2  # transformer blocks
    heads: int = 4  # attention heads; must divide dim
    mlp_ratio: int = 4  # hidden width of each block's MLP = mlp_ratio * dim

    def __post_init__(self):
        for name in ("vocab_size", "max_len", "dim", "depth", "heads", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.heads != 0:
            raise ValueError(f"heads={self.heads} must divide dim={self.dim}")

    def tokenizer(self) -> Tokenizer:
        """The Tokenizer of these captions: `words` after <pad> and <unk>, or the shapes'
        vocabulary; captions padded or cut to max_len tokens."""
        return Tokenizer((PAD, UNK) + tuple(self.words) if self.words else None, max_len=self.max_len)


class TransformerBlock(nn.Module):
    """Pre-LN transformer block (Vaswani et al. 2017; pre-LN as GPT-2):
    x + MHSA(LN(x)), then x + MLP(LN(x)); padded tokens receive no attention weight."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.heads = config.heads
        self.norm1 = nn.LayerNorm(config.dim)
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)
        self.norm2 = nn.LayerNorm(config.dim)
        self.mlp = nn.Sequential(nn.Linear(config.dim, config.mlp_ratio * config.dim), nn.GELU(),
                                 nn.Linear(config.mlp_ratio * config.dim, config.dim))

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        # x: (B, L, D), attn_mask: (B, 1, 1, L) bool, True = attend
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)  # 3 x (B, L, D)
        q, k, v = (z.view(B, L, self.heads, D // self.heads).transpose(1, 2) for z in (q, k, v))
        h = attention(q, k, v, attn_mask)  # (B, nh, L, D / nh)
        x = x + self.proj(h.transpose(1, 2).reshape(B, L, D))
        return x + self.mlp(self.norm2(x))  # (B, L, D)


class TextEncoder(nn.Module):
    """tau_theta: token ids (B, L) and mask (B, L) -> contextual token embeddings (B, L, dim).

    Token + learned position embeddings, `depth` pre-LN transformer blocks, a final LayerNorm.
    Padded positions are never attended to; their outputs are set to 0 (the UNet masks them
    anyway). A caption with no real token (the empty prompt) gives all zeros, never NaN.
    """

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.token_embed = nn.Embedding(config.vocab_size, config.dim)
        self.pos_embed = nn.Parameter(torch.randn(config.max_len, config.dim) / math.sqrt(config.dim))
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        B, L = ids.shape
        if L > self.config.max_len:
            raise ValueError(f"{L} tokens, but the encoder has max_len={self.config.max_len} positions")
        if mask.shape != ids.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must have the shape of ids {tuple(ids.shape)}")
        x = self.token_embed(ids) + self.pos_embed[:L]  # (B, L, D)
        # an all-padding row would softmax over nothing: let it attend everywhere (zeroed below)
        attn_mask = (mask | ~mask.any(1, keepdim=True))[:, None, None, :]  # (B, 1, 1, L)
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.norm(x) * mask[..., None].to(x.dtype)  # (B, L, D), 0 at padding


class TextConditionedUNet(nn.Module):
    """eps_theta(x_t, t, tau_theta(y)): a UNet (with context_dim) and a TextEncoder in one
    module, called as model(xt, t, ids) with ids (B, L) from `Tokenizer`; the mask is
    ids != pad. ids=None is the empty prompt. Training it trains both (LDM Eq. 3)."""

    def __init__(self, unet: UNet, encoder: TextEncoder, pad_id: int = 0):
        super().__init__()
        if unet.config.context_dim != encoder.config.dim:
            raise ValueError(f"the UNet's context_dim={unet.config.context_dim} must equal the text "
                             f"encoder's dim={encoder.config.dim}")
        self.unet, self.encoder, self.pad_id = unet, encoder, pad_id

    def forward(self, xt: Tensor, t: Tensor, ids: Tensor | None = None) -> Tensor:
        if ids is None:
            return self.unet(xt, t)  # no context: no cross-attention update
        mask = ids != self.pad_id  # (B, L)
        context = self.encoder(ids, mask)  # (B, L, D)
        return self.unet(xt, t, context, mask)
