"""LLNM-Net (the paper's TMDL transformer), written to train under Opacus DP-SGD.

Per ultrasound view, the network sees two token streams:

* image: the three feature maps (texture, margin, location map) stacked as channels, cut into patches by a
  Conv2d (or, with ``patch_stem: conv``, by a small convolutional stem ahead of the patches), plus learned
  positions;
* text: the frozen report encoder's hidden states projected to the model width, plus learned positions,
  followed by one "no report" slot and one token per per-view scalar, each from its own Linear(1, H) (or, with
  ``scalar_embedding: mlp``, its own small MLP): the
  paper's four clinical variables (age, sex, shape ratio, echogenicity; its Tokens_T(m+4)) and three
  measurements of the nodule from its masks (capsule distance, size, position along the gland).

``num_bidirectional_layers`` blocks let each stream attend to itself plus ``alpha`` times to the other
stream (the paper's eqs 4-10, pre-norm), then the concatenated tokens pass ``num_self_layers`` ordinary
self-attention blocks, masked mean pooling and a Linear-GELU-Linear head giving one LLNM logit (and
optionally 3 risk-stage logits). The same network runs once per view with batch B; the patient score is
the mean of the per-view probabilities over the views that exist (or, with ``view_fusion: logit``, the
sigmoid of the mean of their logits; `shared_model.model.loss`).

Design rules that come from DP-SGD (see docs/model.md):

* every trainable parameter lives directly in an ``nn.Linear``, ``nn.Conv2d``, ``nn.LayerNorm`` or
  ``nn.Embedding``: Opacus has exact per-sample gradient rules for these. Learned positions and placeholder
  tokens are therefore ``nn.Embedding`` tables looked up with ``arange`` indices, not bare parameters;
* views are never folded into the batch dimension: Opacus treats each batch row as one privacy unit, and the
  unit is the patient;
* no BatchNorm, no ``nn.MultiheadAttention``; attention is Linear Q/K/V plus scaled dot-product with masks;
* missing inputs are replaced through ``torch.where`` rather than Python branches, so every parameter takes
  part in every forward pass and Opacus gets a per-sample gradient for each (zero where unused).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared_model.config import TextEncoderConfig
from shared_model.model.configuration import ModelConfig
from shared_model.model.layers import (
    BidirectionalBlock,
    ConvStem,
    Head,
    LearnedPositions,
    LearnedTokens,
    ScalarEmbedding,
    SelfAttentionBlock,
    TextTopLayers,
)
from shared_model.model.loss import llnm_loss, patient_probability, view_weights
from shared_model.model.outputs import ModelOutput

__all__ = [
    "LLNMNet",
    "ModelConfig",
    "ModelOutput",
    "count_parameters",
    "llnm_loss",
    "select_device",
    "view_weights",
]


# --------------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------------


class LLNMNet(nn.Module):
    """LLNM-Net / TMDL: bidirectional image-text attention, joint self-attention, per-view LLNM logit.

    ``forward(image, view_mask, text, text_mask, clinical, clinical_mask)`` takes the batch of
    docs/architecture.md (B patients, V = 2 views) and returns ``ModelOutput``. Values under a zero mask are
    ignored (replaced by learned placeholders), even if they are NaN.

    Args:
        config: the architecture.
        text_top_layers: with ``config.text_top_layers = k > 0``, the k trainable encoder layers to own
            (e.g. ``text_encoder.load_top_layers(cfg)`` for a non-default encoder). If omitted they are loaded
            from the default, hash-verified all-MiniLM-L6-v2.
    """

    def __init__(self, config: ModelConfig, text_top_layers: nn.ModuleList | None = None) -> None:
        super().__init__()
        self.config = config
        c = config
        h = c.hidden_size
        # A modality absent by design (ModelConfig.images / reports) gets no module at all: every parameter
        # must take part in the loss (Opacus), and nothing should travel that no site can train.
        if c.images:
            self.patch_embed = (ConvStem(c.in_channels, h, c.patch_size, c.stem_width) if c.patch_stem == "conv" else
                                nn.Conv2d(c.in_channels, h, kernel_size=c.patch_size, stride=c.patch_size))
            self.image_pos = LearnedPositions(c.num_patches, h)
            self.no_image = LearnedTokens(1, h)
            # No parameters: the image tokens after the last bidirectional block pass through it, so that a
            # class-activation-map library can hook them (Grad-CAM++ in `fl_client.explain.gradcam`).
            self.image_tokens = nn.Identity()
        if c.reports:
            # Frozen encoder states are small (std ~0.3 for MiniLM) and share a large common direction; a
            # LayerNorm per token brings each report token to unit scale before the projection.
            self.text_norm = nn.LayerNorm(c.text_dim, eps=c.layer_norm_eps)
            self.text_proj = nn.Linear(c.text_dim, h)
            self.text_pos = LearnedPositions(c.text_max_length, h)
            self.no_report = LearnedTokens(1, h)
        # One token per scalar: Linear(1, H) (or with scalar_embedding "mlp" a ScalarEmbedding) of a number or a
        # two-level indicator, Linear(k, H) of a k-level one-hot code.
        self.clinical_proj = nn.ModuleList(
            ScalarEmbedding(h, c.scalar_width) if c.scalar_embedding == "mlp" and not k else nn.Linear(max(k, 1), h)
            for k in c.token_levels)
        self.clinical_missing = LearnedTokens(c.num_clinical, h) if c.num_clinical else None
        self.embed_drop = nn.Dropout(c.dropout)
        # Bidirectional blocks need two streams; with one (no images, or no reports and no clinical tokens)
        # they are self-attention blocks over it, which is what the bidirectional equations reduce to.
        self.two_streams = c.images and (c.reports or c.num_clinical > 0)
        self.bidirectional = nn.ModuleList(BidirectionalBlock(c) for _ in range(c.num_bidirectional_layers)
                                           if self.two_streams)
        n_self = c.num_self_layers + (0 if self.two_streams else c.num_bidirectional_layers)
        self.self_blocks = nn.ModuleList(SelfAttentionBlock(c) for _ in range(n_self))
        self.norm = nn.LayerNorm(h, eps=c.layer_norm_eps)
        self.llnm_head = Head(h, c.head_hidden, 1, c.dropout)
        self.stage_head = Head(h, c.head_hidden, c.num_stages, c.dropout) if c.num_stages else None
        self.apply(self._init_weights)
        # Modality input projections get LeCun init (std 1/sqrt(fan_in)) like the patch embedding, so report
        # and clinical tokens enter the residual stream at the image tokens' unit scale. With BERT's 0.02
        # they entered ~10-50x smaller than the image tokens, and the tiny preset trained on the report
        # alone stayed near chance for epochs (train AUC 0.58 after 6 epochs on the benchmark consortium).
        for proj in ((self.text_proj,) if c.reports else ()) + tuple(self.clinical_proj):
            for linear in (proj.expand, proj.project) if isinstance(proj, ScalarEmbedding) else (proj,):
                nn.init.normal_(linear.weight, std=1 / math.sqrt(linear.in_features))
            if isinstance(proj, ScalarEmbedding):
                # Kinks at -bias / weight: spread over the scalars' scaled range, not all at 0.
                nn.init.normal_(proj.expand.bias, std=1.0)
        # Attached after initialisation so the pre-trained encoder weights are kept.
        self.text_top: TextTopLayers | None = None
        if c.text_top_layers > 0 and not c.reports:
            raise ValueError("text_top_layers needs the report pathway, but ModelConfig.reports is false")
        if c.text_top_layers > 0:
            if text_top_layers is None:
                from shared_model.model.text_encoder import load_top_layers

                text_top_layers = load_top_layers(TextEncoderConfig(trainable_top_layers=c.text_top_layers))
            if len(text_top_layers) != c.text_top_layers:
                raise ValueError(
                    f"ModelConfig.text_top_layers={c.text_top_layers} but "
                    f"{len(text_top_layers)} layers were given"
                )
            self.text_top = TextTopLayers(text_top_layers)
        elif text_top_layers is not None:
            raise ValueError("text_top_layers given but ModelConfig.text_top_layers is 0")

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear | nn.Embedding):
            # BERT-style N(0, std); trunc_normal_ gives the same models but is ~30x slower on CPU.
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            # Like a Linear over the flattened patch (ViT practice).
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            nn.init.normal_(module.weight, std=1 / math.sqrt(fan_in))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def _check_inputs(
        self,
        image: Tensor,
        view_mask: Tensor,
        text: Tensor,
        text_mask: Tensor,
        clinical: Tensor,
        clinical_mask: Tensor,
    ) -> None:
        c = self.config
        b = image.shape[0]
        if image.dim() != 5 or (c.images and image.shape[2:] != (c.in_channels, c.image_size, c.image_size)):
            raise ValueError(
                f"image must be [B, V, {c.in_channels}, {c.image_size}, {c.image_size}], "
                f"got {list(image.shape)}"
            )
        v = image.shape[1]
        if tuple(view_mask.shape) != (b, v):
            raise ValueError(f"view_mask must be [B, V] = [{b}, {v}], got {list(view_mask.shape)}")
        if not c.reports:
            pass  # no report pathway: the text inputs are ignored (an empty [B, 0, 0] by convention)
        elif text.dim() != 3 or text.shape[0] != b or text.shape[2] != c.text_dim:
            raise ValueError(f"text must be [B, L, {c.text_dim}] with B={b}, got {list(text.shape)}")
        if c.reports and text.shape[1] > c.text_max_length:
            raise ValueError(
                f"text has {text.shape[1]} tokens, more than ModelConfig.text_max_length={c.text_max_length}"
            )
        if c.reports and tuple(text_mask.shape) != tuple(text.shape[:2]):
            raise ValueError(
                f"text_mask must be [B, L] = {list(text.shape[:2])}, got {list(text_mask.shape)}"
            )
        expected = (b, v, c.num_clinical)
        if tuple(clinical.shape) != expected:
            raise ValueError(f"clinical must be {list(expected)}, got {list(clinical.shape)}")
        if tuple(clinical_mask.shape) != expected:
            raise ValueError(f"clinical_mask must be {list(expected)}, got {list(clinical_mask.shape)}")

    def forward(
        self,
        image: Tensor,
        view_mask: Tensor,
        text: Tensor,
        text_mask: Tensor,
        clinical: Tensor,
        clinical_mask: Tensor,
    ) -> ModelOutput:
        self._check_inputs(image, view_mask, text, text_mask, clinical, clinical_mask)
        b = image.shape[0]
        # Text stream, shared by both views: computed once per patient.
        if self.config.reports:
            t_valid = text_mask > 0.5
            txt = torch.where(t_valid[..., None], text, torch.zeros((), dtype=text.dtype, device=text.device))
            if self.text_top is not None:
                txt = self.text_top(txt, t_valid)
            txt = self.text_pos(self.text_proj(self.text_norm(txt)))
            no_report = self.no_report(txt).to(txt.dtype)
            report: tuple[Tensor, Tensor, Tensor, Tensor] | None = (txt, t_valid, no_report,
                                                                    ~t_valid.any(dim=1)[:, None])
        else:
            report = None

        llnm, stage = [], []
        # Without images the views differ in nothing: the network runs once and its output stands for each.
        views = image.shape[1] if self.config.images else 1
        for view in range(views):
            pooled = self._encode_view(
                image[:, view] if self.config.images else None,
                view_mask[:, view] > 0.5,
                report,
                clinical[:, view],
                clinical_mask[:, view] > 0.5,
                b,
            )
            llnm.append(self.llnm_head(pooled).squeeze(-1))
            if self.stage_head is not None:
                stage.append(self.stage_head(pooled))
        if views != image.shape[1]:
            llnm = llnm * image.shape[1]
            stage = stage * image.shape[1]
        return ModelOutput(
            llnm_logits=torch.stack(llnm, dim=1),
            stage_logits=torch.stack(stage, dim=1) if self.stage_head is not None else None,
            view_fusion=self.config.view_fusion,
        )

    def _clinical_tokens(self, clinical: Tensor, known: Tensor) -> Tensor:
        """One token per scalar ``[B, C, H]``; unknown ones (and any NaN under them) are the placeholders."""
        nothing = torch.zeros((), dtype=clinical.dtype, device=clinical.device)
        values = torch.where(known, clinical, nothing)
        tokens = []
        for j, (proj, k) in enumerate(zip(self.clinical_proj, self.config.token_levels, strict=True)):
            x = values[:, j : j + 1]
            if k:  # a k-level categorical variable: its level index, one-hot
                x = F.one_hot(x.squeeze(1).round().long().clamp(0, k - 1), k).to(values.dtype)
            tokens.append(proj(x))
        stacked = torch.stack(tokens, 1)
        assert self.clinical_missing is not None
        missing = self.clinical_missing(values).to(stacked.dtype)
        return torch.where(known[..., None], stacked, missing)

    def _encode_view(
        self,
        image: Tensor | None,
        present: Tensor,
        report: tuple[Tensor, Tensor, Tensor, Tensor] | None,
        clinical: Tensor,
        known: Tensor,
        b: int,
    ) -> Tensor:
        """Pooled features ``[B, H]`` of one view (batch = patients)."""
        # Text stream: report tokens, the "no report" slot, then one token per clinical variable.
        parts: list[Tensor] = []
        valid: list[Tensor] = []
        if report is not None:
            txt, t_valid, no_report, no_report_valid = report
            parts += [txt, no_report.expand(b, -1, -1)]
            valid += [t_valid, no_report_valid]
        if self.clinical_missing is not None:
            parts.append(self._clinical_tokens(clinical, known))
            valid.append(torch.ones_like(known))

        img = img_valid = None
        if image is not None:
            zero = torch.zeros((), dtype=image.dtype, device=image.device)
            # Image tokens; a missing view becomes the "no image" token (first slot valid, the rest masked out).
            image = torch.where(present[:, None, None, None], image, zero)
            img = self.image_pos(self.patch_embed(image).flatten(2).transpose(1, 2))
            placeholder = self.no_image(img).to(img.dtype)
            img = torch.where(present[:, None, None], img, placeholder.expand_as(img))
            first = torch.zeros(img.shape[1], dtype=torch.bool, device=img.device)
            first[0] = True
            img_valid = present[:, None] | first[None, :]

        if parts:
            dtype = torch.promote_types(img.dtype, parts[0].dtype) if img is not None else parts[0].dtype
            stream = torch.cat([p.to(dtype) for p in parts], dim=1)
            s_valid = torch.cat(valid, dim=1)
        if img is not None:
            img = self.embed_drop(img.to(dtype) if parts else img)
        if parts:
            stream = self.embed_drop(stream)

        if self.two_streams:
            assert img is not None and img_valid is not None
            for block in self.bidirectional:
                img, stream = block(img, stream, img_valid, s_valid)
            img = self.image_tokens(img)
            x = torch.cat([img, stream], dim=1)
            x_valid = torch.cat([img_valid, s_valid], dim=1)
        elif img is not None:
            x, x_valid = self.image_tokens(img), img_valid
        else:
            x, x_valid = stream, s_valid
        for block in self.self_blocks:
            x = block(x, x_valid)
        x = self.norm(x)
        weight = x_valid.to(x.dtype)[..., None]
        return (x * weight).sum(dim=1) / weight.sum(dim=1)

    @staticmethod
    def patient_probability(out: ModelOutput, view_mask: Tensor) -> Tensor:
        """Patient LLNM probability ``[B]`` over the present views (view 0 if none): `loss.patient_probability`."""
        return patient_probability(out, view_mask)


# --------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------


def select_device(preference: str | torch.device = "auto") -> torch.device:
    """Where to run: ``"auto"`` picks CUDA when available, else CPU; ``"cpu"``/``"cuda[:i]"`` force it."""
    if isinstance(preference, torch.device):
        preference = str(preference)
    pref = str(preference).strip().lower()
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref == "cpu":
        return torch.device("cpu")
    if pref == "cuda" or pref.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {preference!r} requested but CUDA is not available on this machine")
        dev = torch.device(pref)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device {preference!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return dev
    raise ValueError(f"unknown device {preference!r}; use 'auto', 'cpu', 'cuda' or 'cuda:<index>'")


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
