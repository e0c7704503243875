"""The configuration schemas that both sides use, each defined once (pydantic).

One schema per concern: the model's architecture (`ModelConfig`), what determines a site's cached tensors
(`PreprocessConfig` with its `TextEncoderConfig`, version and fingerprint), local training (`TrainConfig`)
and patient-level DP-SGD (`PatientDPConfig`). The coordinator's experiment file (`fl_server.config`)
composes them; a round's ConfigRecord carries their JSON dumps (`shared_model.protocol`), and the site
validates them once, with these same models. Every default lives here and nowhere else.

Every schema rejects unknown keys (a typo must never silently fall back to a default) and reports each
problem with the key that has it (`ConfigError`).
"""

from __future__ import annotations

import hashlib
import json
import numbers
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from shared_model.config_base import (
    _HEX64,
    ConfigError,
    Float,
    Int,
    Schema,
    SchemaT,
    format_validation_error,
    parse_json,
)
from shared_model.encoder_files import DEFAULT_ENCODER_SHA256, WEIGHTS_FILE, default_encoder_path, sha256_file
from shared_model.inputs import ClinicalVariable, InputsConfig

__all__ = [
    "ClinicalVariable",
    "ConfigError",
    "InputsConfig",
    "ModelConfig",
    "PatientDPConfig",
    "PreprocessConfig",
    "Schema",
    "SchemaT",
    "TextEncoderConfig",
    "TrainConfig",
    "format_validation_error",
    "parse_frame",
    "parse_json",
]

#: Bumped whenever preprocessing's output for the same files and settings changes (feature channels,
#: scalar tokens, cache layout), so that every site rebuilds its cache.
PREPROCESSING_VERSION = "3"
#: Bumped whenever `shared_model.text_encoder.split_report` changes, so cached segment encodings are rebuilt.
SEGMENTER_VERSION = 1


#: The named cine frames; any other frame is a 0-based index.
FRAME_NAMES = ("first", "middle", "last")


def parse_frame(value: Any) -> str | int:
    """A cine-frame choice: ``"first"``, ``"middle"``, ``"last"`` or a 0-based index (an integer, or a string
    of digits as typed on a command line). The one place where a frame setting is checked."""
    if isinstance(value, str):
        key = value.strip().lower()
        if key in FRAME_NAMES:
            return key
        if key.isdigit():
            return int(key)
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0:
        return int(value)
    raise ValueError(f"frame must be 'first', 'middle', 'last' or a 0-based index, not {value!r}")


# --------------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------------


class ModelConfig(Schema):
    """Architecture of LLNM-Net. The defaults are the paper's TMDL dimensions (== ``preset("paper")``).

    Attributes:
        hidden_size: token width H (paper 768).
        num_heads: attention heads in every block (paper 12, i.e. d_k = 64).
        num_bidirectional_layers: image<->text blocks before the joint ones (paper 4; ablation BMA(N)).
        num_self_layers: self-attention blocks over the concatenated tokens (paper 12).
        mlp_dim: hidden width of every block's MLP (paper 3072).
        patch_size / image_size: square patches on square images (paper 16 on 224 -> 196 tokens).
        in_channels: stacked feature maps per view (3: texture, margin, location map).
        text_dim: width of the report encoder's hidden states (384 for all-MiniLM-L6-v2; 768 for BERT-base).
        text_max_length: most report tokens the model accepts (the encoder's max_length).
        num_clinical: scalars per view, each its own token (7 by default: the clinical variables age and sex,
            then shape ratio, echogenicity, capsule distance, size and position measured from the image and
            its masks; ``InputsConfig.feature_names`` gives them for any inputs).
        clinical_levels: per scalar token, 0 (one number) or the level count k of a categorical variable with
            k > 2 levels (one-hot into its token); None: every token is one number.
        images / reports: whether the image / report pathway exists (``preprocess.inputs``); without images
            there are no image tokens and the bidirectional blocks become self-attention blocks.
        alpha: weight of cross-modal attention in the bidirectional blocks (paper 1.0; 0 disables it).
        dropout / attention_dropout: the released code uses 0.3 / 0.2 for the paper-sized model.
        num_stages: classes of the risk-stage head (3), or 0 for no stage head.
        head_hidden: hidden width of the two-layer MLP heads.
        text_top_layers: trainable copies of the text encoder's top layers owned by the model (0 = the
            encoder is fully frozen, as in the paper); must equal TextEncoderConfig.trainable_top_layers.
        layer_norm_eps: epsilon of every LayerNorm.
        init_std: std of the normal initialisation of Linear/Embedding weights (BERT/ViT 0.02).
        architecture: ``llnm-net`` (the paper's model) or ``feature-head`` (a small head on frozen public
            features, `shared_model.feature_head`, for DP training; only text_dim, num_clinical and
            feature_hidden apply to it).
        feature_hidden: hidden width of the feature head's scalar MLP.
        feature_centring: the feature head's inputs minus the site's mean feature over this split (``val``),
            or ``none`` (`shared_model.public_features.PublicFeatures.centred`).
    """

    WHAT: ClassVar[str] = "model config"

    architecture: Literal["llnm-net", "feature-head"] = "llnm-net"
    feature_hidden: Int = Field(16, ge=1)
    feature_centring: Literal["val", "none"] = "val"

    hidden_size: Int = Field(768, ge=1)
    num_heads: Int = Field(12, ge=1)
    num_bidirectional_layers: Int = Field(4, ge=0)
    num_self_layers: Int = Field(12, ge=0)
    mlp_dim: Int = Field(3072, ge=1)
    patch_size: Int = Field(16, ge=1)
    image_size: Int = Field(224, ge=1)
    in_channels: Int = Field(3, ge=1)
    text_dim: Int = Field(384, ge=1)
    text_max_length: Int = Field(64, ge=1)
    num_clinical: Int = Field(7, ge=0)
    clinical_levels: list[Int] | None = None
    images: bool = True
    reports: bool = True
    alpha: Float = Field(1.0, ge=0.0)
    dropout: Float = Field(0.3, ge=0.0, lt=1.0)
    attention_dropout: Float = Field(0.2, ge=0.0, lt=1.0)
    num_stages: Int = Field(3, ge=0)
    head_hidden: Int = Field(768, ge=1)
    text_top_layers: Int = Field(0, ge=0)
    layer_norm_eps: Float = Field(1e-6, gt=0.0)
    init_std: Float = Field(0.02, gt=0.0)

    #: Named presets: field overrides on top of the defaults.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # The paper's TMDL: 768 wide, 12 heads, 4 bidirectional + 12 self-attention blocks, 16x16 patches on
        # 224x224, MLP 3072; dropout 0.3 / attention dropout 0.2 from the released code.
        "paper": {},
        # Small enough to train on 2 CPU cores in minutes (tests, synthetic consortia, CI).
        "tiny": {
            "hidden_size": 64,
            "num_heads": 4,
            "num_bidirectional_layers": 2,
            "num_self_layers": 2,
            "mlp_dim": 256,
            "patch_size": 8,
            "image_size": 64,
            "dropout": 0.1,
            "attention_dropout": 0.0,
            "head_hidden": 64,
            # BERT's 0.02 is ~0.55/sqrt(768); at width 64 it left the network in a long plateau (the report
            # pathway near chance for 3-6 epochs on the benchmark consortium). 0.1 is ~0.8/sqrt(64).
            "init_std": 0.1,
        },
        # A per-view head of about 900 parameters on frozen public features (EfficientNet-Lite0 ImageNet image
        # features, mean-pooled MiniLM report states, the per-view scalars): what DP-SGD trains well.
        "feature-head": {"architecture": "feature-head", "num_stages": 0},
    }

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.num_bidirectional_layers + self.num_self_layers < 1:
            raise ValueError("the model needs at least one bidirectional or self-attention block")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.num_stages == 1:
            raise ValueError("num_stages must be 0 (no stage head) or >= 2, got 1")
        if self.clinical_levels is not None:
            if len(self.clinical_levels) != self.num_clinical:
                raise ValueError(f"clinical_levels has {len(self.clinical_levels)} entries for num_clinical="
                                 f"{self.num_clinical} tokens")
            if any(k == 1 or k < 0 for k in self.clinical_levels):
                raise ValueError(f"clinical_levels entries must be 0 or >= 2, got {self.clinical_levels}")
        if not (self.images or self.reports or self.num_clinical):
            raise ValueError("the model has no input: images, reports and clinical tokens are all absent")
        return self

    @property
    def token_levels(self) -> list[int]:
        """Per scalar token: 0 (a number) or its categorical level count (see ``clinical_levels``)."""
        return list(self.clinical_levels) if self.clinical_levels is not None else [0] * self.num_clinical

    def check_inputs(self, inputs: InputsConfig, source: str) -> None:
        """Refuse a model that does not take what `inputs` (the preprocessing's) gives.

        A checkpoint or round config made for other inputs (or by an llnm-fl version with other scalars) would
        otherwise fail deep in ``forward`` with a bare shape error; this names the cause and the way out.

        Raises:
            ValueError: the pathways or the scalar tokens differ.
        """
        problems = []
        if self.images != inputs.images or self.reports != inputs.reports:
            problems.append(f"it has images={self.images}, reports={self.reports} but the inputs have "
                            f"images={inputs.images}, reports={inputs.reports}")
        if self.token_levels != inputs.token_levels:
            problems.append(f"it takes {self.num_clinical} per-view scalars {self.token_levels} but the inputs give "
                            f"{len(inputs.token_levels)} ({', '.join(inputs.feature_names)}) {inputs.token_levels}")
        if problems:
            raise ValueError(f"{source}: the model does not fit the inputs: {'; '.join(problems)}. It was made for "
                             "other inputs (preprocess.inputs) or by another llnm-fl version: use the matching "
                             "inputs, or train again")

    @property
    def num_patches(self) -> int:
        """Image tokens per view."""
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset (``paper`` or ``tiny``), with optional field overrides."""
        if name not in cls.PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; known presets: {sorted(cls.PRESETS)}")
        return cls.from_dict({**cls.PRESETS[name], **overrides})


# --------------------------------------------------------------------------------------------------------
# preprocessing (what a site's cached tensors depend on)
# --------------------------------------------------------------------------------------------------------


class TextEncoderConfig(Schema):
    """Which local report encoder to use and how to cut the reports.

    Attributes:
        path: encoder folder (config, tokenizer files, ``model.safetensors``); None means the default MiniLM.
        sha256: expected SHA-256 of ``model.safetensors``. Defaults to the pinned MiniLM hash (``"pinned"`` in
            a YAML file means the same); for another encoder set its own hash, or None to skip the check (an
            explicit opt-out, e.g. for a site's own Chinese BERT).
        max_length: tokens per report after truncation/padding (the paper cuts Chinese reports at 50
            characters, about 50 tokens; 64 leaves room for [CLS]/[SEP] and English word pieces).
            In ``segment`` units, the word pieces per segment.
        trainable_top_layers: 0 keeps the encoder frozen (the paper). k > 0 makes ``encode_reports`` return
            the hidden states *before* the top k layers; LLNMNet then owns trainable copies of those k layers.
            Token units only (trainable layers need the word pieces).
        unit: ``"token"`` (one text token per word piece, the paper) or ``"segment"`` (one per report
            sentence, list item or line: its mean-pooled hidden state).
        max_segments: text tokens per report in ``segment`` units.
    """

    WHAT: ClassVar[str] = "text encoder config"

    path: str | None = None
    sha256: str | None = DEFAULT_ENCODER_SHA256
    max_length: Int = Field(64, ge=4, le=512)
    trainable_top_layers: Int = Field(0, ge=0, le=24)
    unit: Literal["token", "segment"] = "token"
    max_segments: Int = Field(24, ge=1, le=512)

    @field_validator("path", mode="before")
    @classmethod
    def _path(cls, v: Any) -> Any:
        return str(v) if isinstance(v, Path) else v

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if v == "pinned":
            return DEFAULT_ENCODER_SHA256
        if not _HEX64.match(v.lower()):
            raise ValueError(f"sha256 must be 64 hex digits, 'pinned' or null, got {v!r}")
        return v.lower()

    @model_validator(mode="after")
    def _top_layers_need_tokens(self) -> TextEncoderConfig:
        if self.unit == "segment" and self.trainable_top_layers:
            raise ValueError("trainable_top_layers needs unit: token (trainable encoder layers run on the word "
                             "pieces, which segment units pool away)")
        return self

    @property
    def num_positions(self) -> int:
        """Text tokens per report that ``encode_reports`` returns (the model's ``text_max_length``)."""
        return self.max_length if self.unit == "token" else self.max_segments

    def resolved_path(self) -> Path:
        """The encoder folder as an absolute path (the default one when ``path`` is None)."""
        return default_encoder_path() if self.path is None else Path(self.path).expanduser().resolve()

    def cache_key(self) -> dict[str, Any]:
        """What cached hidden states depend on; preprocessing stores it to detect a stale cache."""
        weights = self.sha256 or sha256_file(self.resolved_path() / WEIGHTS_FILE)
        return {
            "weights_sha256": weights,
            "max_length": self.max_length,
            "trainable_top_layers": self.trainable_top_layers,
            "unit": self.unit,
            "max_segments": self.max_segments,
            "segmenter": SEGMENTER_VERSION,
        }


class PreprocessConfig(Schema):
    """Everything that determines the cached tensors of a site (besides the site's files themselves).

    Attributes:
        image_size: side S of every feature image (64 for the ``tiny`` preset, 224 for ``paper``).
        frame: cine frame to use: ``"first"``, ``"middle"``, ``"last"`` or a 0-based index.
        crop_margin: context around the nodule's bounding box, as a fraction of its larger physical side,
            added on each side before the crop is made square (0.25: the box's larger side is 1/1.5 of it).
        thyroid_crop_margin: the same for the location crop around the thyroid (and nodule) bounding box.
        margin_band_mm: half-width of the margin band around the nodule outline (pixels when uncalibrated).
        margin_sigma_mm: Gaussian scale of the gradient used for the margin channel (pixels when uncalibrated;
            never below half a pixel).
        echo_ring_mm: width of the ring around the nodule used as the echogenicity reference when there is no
            thyroid mask (pixels when uncalibrated).
        intensity_percentiles: (low, high) percentiles of the site's tissue pixels that map to 0 and 1.
        range_max_views: at most this many views (evenly spread over the site, deterministic) are decoded to
            estimate the site's brightness range; percentiles of a few hundred images are stable, and this
            bounds the extra decoding work on a large site.
        range_samples_per_view: pixels taken (evenly strided) from each of those views' tissue region.
        text: the frozen report encoder (its weight hash and token length are part of the fingerprint).
        inputs: which modalities and clinical variables exist (`shared_model.inputs`); the defaults are the
            paper's (two views, the report, age and sex).
    """

    WHAT: ClassVar[str] = "preprocessing config"

    image_size: Int = Field(64, ge=8, le=1024)
    frame: str | int = "middle"
    crop_margin: Float = Field(0.25, ge=0.0, le=3.0)
    thyroid_crop_margin: Float = Field(0.05, ge=0.0, le=3.0)
    margin_band_mm: Float = Field(1.0, gt=0.0, le=20.0)
    margin_sigma_mm: Float = Field(0.1, gt=0.0, le=20.0)
    echo_ring_mm: Float = Field(2.0, gt=0.0, le=50.0)
    intensity_percentiles: tuple[float, float] = (1.0, 99.0)
    range_max_views: Int = Field(256, ge=1)
    range_samples_per_view: Int = Field(20000, ge=1)
    text: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    inputs: InputsConfig = Field(default_factory=InputsConfig)

    @field_validator("frame", mode="before")
    @classmethod
    def _frame(cls, v: Any) -> str | int:
        return parse_frame(v)

    @field_validator("intensity_percentiles")
    @classmethod
    def _percentiles(cls, v: tuple[float, float]) -> tuple[float, float]:
        low, high = v
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(f"intensity_percentiles must satisfy 0 <= low < high <= 100, got {v}")
        return v

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> PreprocessConfig:
        """``tiny`` (S = 64, CPU-friendly) or ``paper`` (S = 224, the paper's input size)."""
        sizes = {"tiny": 64, "paper": 224}
        if name not in sizes:
            raise ConfigError(f"unknown preprocessing preset {name!r}; known: {sorted(sizes)}")
        return cls.from_dict({"image_size": sizes[name], **overrides})

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the canonical JSON of the settings plus :data:`PREPROCESSING_VERSION`.

        The encoder enters through ``TextEncoderConfig.cache_key()`` (weight hash, token length, trainable
        split), not its folder, so the same weights installed in another venv give the same fingerprint.
        With ``sha256=None`` (verification off) that hashes the weight file itself (about 0.3 s for 90 MB),
        so callers that need the fingerprint repeatedly compute it once.
        """
        data = self.to_dict()
        data["text"] = self.text.cache_key()
        payload = json.dumps(
            {"preprocessing_version": PREPROCESSING_VERSION, "config": data},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
        )
        return hashlib.sha256(payload.encode("ascii")).hexdigest()


# --------------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------------


class TrainConfig(Schema):
    """Optimiser and loop settings of local training (one site, one round or one baseline run)."""

    WHAT: ClassVar[str] = "training config"

    lr: Float = Field(3e-4, gt=0.0, le=100.0)
    weight_decay: Float = Field(0.01, ge=0.0, le=1.0)
    # AdamW (the default), or SGD with momentum: under DP-SGD, Adam's per-coordinate scaling also scales up the
    # noise of coordinates with little signal; the small DP head trains better with momentum SGD.
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: Float = Field(0.9, ge=0.0, lt=1.0)
    local_epochs: Int = Field(1, ge=1, le=1000)
    batch_size: Int = Field(32, ge=1, le=4096)
    seed: Int = 0
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    # Mixed precision (bf16 autocast) is used on CUDA only, and never under DP-SGD: Opacus computes
    # per-sample gradients from the hooked activations and we keep those in fp32.
    amp: bool = True
    # Gradient-norm clipping of non-private training (DP-SGD clips per sample instead).
    max_grad_norm: Float | None = Field(1.0, gt=0.0)
    stage_loss_weight: Float = Field(0.5, ge=0.0)
    # Learning-rate schedule across a run's epochs (baselines) or rounds (federations), applied by the caller
    # through `shared_model.training.scheduled_lr`: "constant", or "cosine" from `lr` down to
    # `lr * lr_min_ratio` at the last one. A federation sends each round's rate in the round config.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_min_ratio: Float = Field(0.05, ge=0.0, le=1.0)


# --------------------------------------------------------------------------------------------------------
# patient-level differential privacy
# --------------------------------------------------------------------------------------------------------


class PatientDPConfig(Schema):
    """Patient-level DP-SGD at every site (Opacus), as the coordinator proposes it for a run."""

    WHAT: ClassVar[str] = "patient DP config"

    enabled: bool = False
    target_epsilon: Float | None = Field(None, gt=0.0)
    delta: Float = Field(1e-5, gt=0.0, lt=1.0)
    noise_multiplier: Float | None = Field(None, gt=0.0)
    max_grad_norm: Float = Field(1.0, gt=0.0)
    accountant: Literal["rdp", "prv"] = "rdp"
    #: What DP-SGD trains (`shared_model.architectures.restrict_trainable`): all, heads, heads-norms-biases.
    #: The smallest model, a head on frozen public features, is `model.preset: feature-head`.
    trainable: Literal["all", "heads", "heads-norms-biases"] = "all"

    @model_validator(mode="after")
    def _one_target(self) -> PatientDPConfig:
        if self.enabled and (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("patient DP needs exactly one of target_epsilon or noise_multiplier")
        return self
