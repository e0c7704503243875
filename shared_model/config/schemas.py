"""The configuration schemas that both sides use, each defined once (pydantic).

One schema per concern: what determines a site's cached tensors (`PreprocessConfig` with its
`TextEncoderConfig`, version and fingerprint), local training (`TrainConfig`) and patient-level DP-SGD
(`PatientDPConfig`); the model's architecture (`ModelConfig`) sits beside the modeling code
(`shared_model.model.configuration`). The coordinator's experiment file (`fl_server.config`)
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

from shared_model.config.base import (
    _HEX64,
    ConfigError,
    Float,
    Int,
    Schema,
    SchemaT,
    format_validation_error,
    parse_json,
)
from shared_model.config.inputs import ClinicalVariable, InputsConfig
from shared_model.model.encoder_files import DEFAULT_ENCODER_SHA256, WEIGHTS_FILE, default_encoder_path, sha256_file

__all__ = [
    "ClinicalVariable",
    "ConfigError",
    "InputsConfig",
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
#: Bumped whenever `shared_model.model.text_encoder.split_report` changes, so cached segment encodings are rebuilt.
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
        inputs: which modalities and clinical variables exist (`shared_model.config.inputs`); the defaults are the
            paper's (two views, the report, age and sex).
        masks: where the thyroid and nodule masks come from: ``drawn`` (the site table's, the default),
            ``predicted`` (the masks `llnm-site segment` predicted with the segmenter ``segmenter_sha256``, for
            every view) or ``drawn-else-predicted`` (a drawn mask where the table has one, else the predicted one).
        segmenter_sha256: the SHA-256 of the segmenter's weights file whose predicted masks are used (what
            `llnm-site segment` prints); required unless ``masks`` is ``drawn``. Part of the cache key.
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
    masks: Literal["drawn", "predicted", "drawn-else-predicted"] = "drawn"
    segmenter_sha256: str | None = None

    @field_validator("segmenter_sha256")
    @classmethod
    def _segmenter_hash(cls, v: str | None) -> str | None:
        if v is not None and not _HEX64.match(v.lower()):
            raise ValueError(f"segmenter_sha256 must be 64 hex digits (what llnm-site segment prints), got {v!r}")
        return None if v is None else v.lower()

    @model_validator(mode="after")
    def _masks_need_a_segmenter(self) -> PreprocessConfig:
        if self.masks != "drawn" and self.segmenter_sha256 is None:
            raise ValueError(f"masks: {self.masks} needs segmenter_sha256, the hash of the segmenter whose predicted "
                             "masks to use (llnm-site segment prints it)")
        return self

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
        if self.masks == "drawn":
            # Drawn masks are what every cache was built from before mask sources existed: same key, no rebuild.
            del data["masks"], data["segmenter_sha256"]
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

    # Learning rate of the local optimiser (the first epoch's or round's under a cosine lr_schedule).
    lr: Float = Field(3e-4, gt=0.0, le=100.0)
    # Weight decay of the optimiser (decoupled for AdamW).
    weight_decay: Float = Field(0.01, ge=0.0, le=1.0)
    # AdamW (the default), or SGD with momentum: under DP-SGD, Adam's per-coordinate scaling also scales up the
    # noise of coordinates with little signal; the small DP head trains better with momentum SGD.
    optimizer: Literal["adamw", "sgd"] = "adamw"
    # Momentum of SGD (optimizer: sgd only).
    momentum: Float = Field(0.9, ge=0.0, lt=1.0)
    # Epochs of local training per round over the site's training split (over the round's part of it when
    # federation.rounds_per_epoch > 1).
    local_epochs: Int = Field(1, ge=1, le=1000)
    # Patients per training batch (under DP-SGD's Poisson sampling, an expected size).
    batch_size: Int = Field(32, ge=1, le=4096)
    # The run's seed: the round-0 model's initialisation and every site's per-round training seed derive from it.
    seed: Int = 0
    # Where training runs: auto (CUDA when available, else CPU), cpu, cuda or cuda:N; a site whose own device
    # setting (`llnm-site join --device`) is not auto uses that instead.
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    # Mixed precision (bf16 autocast) is used on CUDA only, and never under DP-SGD: Opacus computes
    # per-sample gradients from the hooked activations and we keep those in fp32.
    amp: bool = True
    # Gradient-norm clipping of non-private training (DP-SGD clips per sample instead).
    max_grad_norm: Float | None = Field(1.0, gt=0.0)
    # Weight of the risk-stage cross-entropy in each patient's loss (LLNM BCE + stage_loss_weight * stage CE).
    stage_loss_weight: Float = Field(0.5, ge=0.0)
    # Learning-rate schedule across a run's epochs (baselines) or rounds (federations), applied by the caller
    # through `shared_model.model.training.scheduled_lr`: "constant", or "cosine" from `lr` down to
    # `lr * lr_min_ratio` at the last one. A federation sends each round's rate in the round config.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    # Under the cosine schedule, the last epoch's or round's learning rate as a fraction of lr.
    lr_min_ratio: Float = Field(0.05, ge=0.0, le=1.0)


# --------------------------------------------------------------------------------------------------------
# patient-level differential privacy
# --------------------------------------------------------------------------------------------------------


class PatientDPConfig(Schema):
    """Patient-level DP-SGD at every site (Opacus), as the coordinator proposes it for a run."""

    WHAT: ClassVar[str] = "patient DP config"

    #: Train with DP-SGD at every site: per-patient gradient clipping, Gaussian noise and Poisson sampling.
    enabled: bool = False
    #: The epsilon per patient the whole run may spend: the noise multiplier is calibrated for every local step
    #: planned (rounds x local epochs x steps per epoch). Exactly one of target_epsilon and noise_multiplier.
    target_epsilon: Float | None = Field(None, gt=0.0)
    #: The delta of the per-patient (epsilon, delta) guarantee.
    delta: Float = Field(1e-5, gt=0.0, lt=1.0)
    #: A fixed noise multiplier (noise standard deviation / max_grad_norm) instead of a target_epsilon.
    noise_multiplier: Float | None = Field(None, gt=0.0)
    #: The norm every patient's gradient is clipped to.
    max_grad_norm: Float = Field(1.0, gt=0.0)
    #: The privacy accountant that calibrates the noise and reports the epsilon spent: rdp (Renyi DP) or prv
    #: (privacy random variables).
    accountant: Literal["rdp", "prv"] = "rdp"
    #: What DP-SGD trains (`shared_model.model.architectures.restrict_trainable`): all, heads, heads-norms-biases.
    #: The smallest model, a head on frozen public features, is `model.preset: feature-head`.
    trainable: Literal["all", "heads", "heads-norms-biases"] = "all"

    @model_validator(mode="after")
    def _one_target(self) -> PatientDPConfig:
        if self.enabled and (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("patient DP needs exactly one of target_epsilon or noise_multiplier")
        return self
