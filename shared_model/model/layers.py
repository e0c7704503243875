"""LLNM-Net's building blocks, each made of layers Opacus has exact per-sample gradient rules for (Linear,
Conv2d, LayerNorm, Embedding): learned positions and placeholder tokens as embedding look-ups, masked
scaled dot-product attention, the self-attention and bidirectional image-text blocks (the paper's eqs 4-10,
pre-norm), the head, and the trainable top layers of the report encoder. The model that wires them is
:mod:`shared_model.model.modeling`; why each rule holds is in its docstring and docs/model.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared_model.model.configuration import ModelConfig

__all__ = [
    "MLP",
    "BidirectionalBlock",
    "ConvStem",
    "Head",
    "LearnedPositions",
    "LearnedTokens",
    "ScalarEmbedding",
    "SelfAttentionBlock",
    "TextTopLayers",
    "attention_probabilities",
    "masked_attention",
]



class ConvStem(nn.Module):
    """Patch embedding through a small convolutional stem: two 3x3 convolutions (the second with stride 2), then
    a patch-size / 2 convolution with that stride, giving the same ``[B, H, S/p, S/p]`` tokens as a single
    patch-size convolution. Why: a linear patch embedding sees each patch's pixels as one flat vector, and a small
    transformer trained on a few thousand nodules learns little fine texture from it (bright punctate
    microcalcifications, cystic spaces, an irregular outline); a few convolutions ahead of the patches are the
    usual remedy (Xiao et al. 2021, "Early convolutions help transformers see better"). Conv2d only, so Opacus
    has exact per-sample gradients; no normalisation layer (no BatchNorm under DP-SGD)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, width: int = 16) -> None:
        super().__init__()
        if patch_size < 2 or patch_size % 2:
            raise ValueError(f"the convolutional stem needs an even patch_size >= 2, got {patch_size}")
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, kernel_size=3, stride=2, padding=1)
        self.patchify = nn.Conv2d(2 * width, dim, kernel_size=patch_size // 2, stride=patch_size // 2)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.patchify(self.act(self.conv2(self.act(self.conv1(x)))))


class ScalarEmbedding(nn.Module):
    """One number to one token through a small MLP: ``Linear(1, width) -> GELU -> Linear(width, dim)``.

    Why: a ``Linear(1, H)`` token is ``value * w + b``, a point on a line, and every non-linear response to the
    number (the capsule distance's risk falls steeply within the first 2.5 mm, then flattens) must be built by the
    attention and MLP blocks downstream, which a small model trained on a few thousand patients does poorly. An
    MLP per scalar gives each number its own learned curve ahead of the fusion (Gorishniy et al. 2022, "On
    embeddings for numerical features in tabular deep learning"). Linear layers only, so Opacus has exact
    per-sample gradients."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.expand = nn.Linear(1, width)
        self.project = nn.Linear(width, dim)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.act(self.expand(x)))


class LearnedPositions(nn.Module):
    """Adds a learned vector per position: ``x + table[0..N-1]``.

    The table is an ``nn.Embedding`` looked up with ``arange`` indices rather than a bare ``nn.Parameter``, so
    Opacus computes its per-sample gradient with its exact Embedding rule (no functorch fallback, which would
    also fail on the empty batches Poisson sampling produces).
    """

    def __init__(self, num_positions: int, dim: int) -> None:
        super().__init__()
        self.table = nn.Embedding(num_positions, dim)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[1]
        if n > self.table.num_embeddings:
            raise ValueError(f"{n} tokens but only {self.table.num_embeddings} learned positions")
        index = torch.arange(n, device=x.device).expand(x.shape[0], n)
        return x + self.table(index).to(x.dtype)


class LearnedTokens(nn.Module):
    """``k`` learned tokens repeated over the batch: placeholders for a missing report, view or value.

    ``forward(ref)`` only uses ``ref`` for its batch size and device, and returns ``[B, k, H]``.
    """

    def __init__(self, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.table = nn.Embedding(num_tokens, dim)

    def forward(self, ref: Tensor) -> Tensor:
        k = self.table.num_embeddings
        index = torch.arange(k, device=ref.device).expand(ref.shape[0], k)
        return self.table(index)


def _split_heads(x: Tensor, heads: int) -> Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor, dropout_p: float) -> Tensor:
    """Scaled dot-product attention over heads; keys where ``key_valid`` is False get no weight.

    The mask is additive with ``finfo(dtype).min`` rather than ``-inf``, so even a row with every key masked
    would give finite (uniform) weights instead of NaN under fp16/bf16 autocast. The model itself always
    keeps at least one valid key per stream (a placeholder token stands in for missing inputs).
    """
    bias = torch.zeros(key_valid.shape, dtype=q.dtype, device=q.device)
    bias = bias.masked_fill(~key_valid, torch.finfo(q.dtype).min)[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)


def attention_probabilities(q: Tensor, k: Tensor, key_valid: Tensor) -> Tensor:
    """The weights :func:`masked_attention` applies, ``[B, heads, Nq, Nk]``; for explanations only (attention
    rollout), when a block's ``record`` list is set: training never computes them explicitly."""
    bias = torch.zeros(key_valid.shape, dtype=q.dtype, device=q.device)
    bias = bias.masked_fill(~key_valid, torch.finfo(q.dtype).min)[:, None, None, :]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    return torch.softmax(scores.float(), dim=-1)


class MLP(nn.Module):
    """Block feed-forward: Linear-GELU-Dropout-Linear-Dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SelfAttentionBlock(nn.Module):
    """Pre-norm transformer block over one token sequence with a key padding mask."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.heads = cfg.num_heads
        self.attn_dropout = cfg.attention_dropout
        self.norm1 = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.qkv = nn.Linear(h, 3 * h)
        self.out = nn.Linear(h, h)
        self.drop = nn.Dropout(cfg.dropout)
        self.norm2 = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.mlp = MLP(h, cfg.mlp_dim, cfg.dropout)
        # Set to a list by attention rollout (`fl_client.explain.rollout`): each forward appends its weights.
        self.record: list[dict[str, Tensor]] | None = None

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(self.norm1(x)).chunk(3, dim=-1))
        if self.record is not None:
            self.record.append({"self": attention_probabilities(q, k, valid).mean(dim=1).detach(), "valid": valid})
        p = self.attn_dropout if self.training else 0.0
        x = x + self.drop(self.out(_merge_heads(masked_attention(q, k, v, valid, p))))
        return x + self.mlp(self.norm2(x))


class BidirectionalBlock(nn.Module):
    """The paper's bidirectional multimodal attention block (eqs 4-10), pre-norm.

    Each modality has its own LayerNorms, one Q/K/V projection, output projection and MLP:
    ``T_I = Attn(Q_I, K_I, V_I) + alpha * Attn(Q_I, K_T, V_T)`` and symmetrically for text, then the usual
    residuals. (The released code averages the two contexts and shares one output projection; we follow
    the paper's equations.)
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.heads = cfg.num_heads
        self.alpha = cfg.alpha
        self.attn_dropout = cfg.attention_dropout
        eps = cfg.layer_norm_eps
        self.norm_img1 = nn.LayerNorm(h, eps=eps)
        self.norm_txt1 = nn.LayerNorm(h, eps=eps)
        self.qkv_img = nn.Linear(h, 3 * h)
        self.qkv_txt = nn.Linear(h, 3 * h)
        self.out_img = nn.Linear(h, h)
        self.out_txt = nn.Linear(h, h)
        self.norm_img2 = nn.LayerNorm(h, eps=eps)
        self.norm_txt2 = nn.LayerNorm(h, eps=eps)
        self.mlp_img = MLP(h, cfg.mlp_dim, cfg.dropout)
        self.mlp_txt = MLP(h, cfg.mlp_dim, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)
        # Set to a list by attention rollout: each forward appends the four attention maps (head means).
        self.record: list[dict[str, Tensor]] | None = None

    def forward(
        self, img: Tensor, txt: Tensor, img_valid: Tensor, txt_valid: Tensor
    ) -> tuple[Tensor, Tensor]:
        qi, ki, vi = (_split_heads(t, self.heads) for t in self.qkv_img(self.norm_img1(img)).chunk(3, dim=-1))
        qt, kt, vt = (_split_heads(t, self.heads) for t in self.qkv_txt(self.norm_txt1(txt)).chunk(3, dim=-1))
        p = self.attn_dropout if self.training else 0.0
        ctx_img = masked_attention(qi, ki, vi, img_valid, p)
        ctx_txt = masked_attention(qt, kt, vt, txt_valid, p)
        if self.record is not None:
            self.record.append({
                "img_img": attention_probabilities(qi, ki, img_valid).mean(dim=1).detach(),
                "img_txt": attention_probabilities(qi, kt, txt_valid).mean(dim=1).detach(),
                "txt_img": attention_probabilities(qt, ki, img_valid).mean(dim=1).detach(),
                "txt_txt": attention_probabilities(qt, kt, txt_valid).mean(dim=1).detach(),
            })
        if self.alpha != 0.0:
            ctx_img = ctx_img + self.alpha * masked_attention(qi, kt, vt, txt_valid, p)
            ctx_txt = ctx_txt + self.alpha * masked_attention(qt, ki, vi, img_valid, p)
        img = img + self.drop(self.out_img(_merge_heads(ctx_img)))
        txt = txt + self.drop(self.out_txt(_merge_heads(ctx_txt)))
        img = img + self.mlp_img(self.norm_img2(img))
        txt = txt + self.mlp_txt(self.norm_txt2(txt))
        return img, txt


class Head(nn.Module):
    """Two-layer MLP head (Linear-GELU-Dropout-Linear) on the pooled tokens, as the paper describes."""

    def __init__(self, dim: int, hidden: int, out: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class TextTopLayers(nn.Module):
    """Trainable copies of the report encoder's top layers (``text_top_layers > 0``).

    ``text_encoder.TrainableEncoderLayer`` modules (Linear and LayerNorm only, so Opacus handles them
    natively); they run once per patient (batch B), before the text projection.
    """

    def __init__(self, layers: nn.ModuleList) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, hidden: Tensor, valid: Tensor) -> Tensor:
        for layer in self.layers:
            hidden = layer(hidden, valid)
        return hidden
