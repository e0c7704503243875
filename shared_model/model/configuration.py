"""The architecture of LLNM-Net (`ModelConfig`), beside the modeling code that builds it (as Hugging Face keeps a
model's configuration beside its modeling), with the named presets ``paper`` and ``tiny``. A round's
ConfigRecord carries its JSON dump (`shared_model.protocol`); the site validates it with this same model."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from shared_model.config.base import (
    ConfigError,
    Float,
    Int,
    Schema,
)
from shared_model.config.inputs import InputsConfig

__all__ = ["ModelConfig"]


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
        dropout / attention_dropout: dropout rate of the embeddings, blocks, MLPs and heads / of the attention
            weights; the released code uses 0.3 / 0.2 for the paper-sized model.
        num_stages: classes of the risk-stage head (3), or 0 for no stage head.
        head_hidden: hidden width of the two-layer MLP heads.
        text_top_layers: trainable copies of the text encoder's top layers owned by the model (0 = the
            encoder is fully frozen, as in the paper); must equal TextEncoderConfig.trainable_top_layers.
        layer_norm_eps: epsilon of every LayerNorm.
        init_std: std of the normal initialisation of Linear/Embedding weights (BERT/ViT 0.02).
        architecture: ``llnm-net`` (the paper's model) or ``feature-head`` (a small head on frozen public
            features, `shared_model.model.feature_head`, for DP training; only text_dim, num_clinical and
            feature_hidden apply to it).
        feature_hidden: hidden width of the feature head's scalar MLP.
        feature_centring: the feature head's inputs minus the site's mean feature over this split (``val``),
            or ``none`` (`shared_model.sitedata.public_features.PublicFeatures.centred`).
        image_features: what the image pathway reads: ``maps`` (the three preprocessed feature maps, cut into
            patches) or ``public-tokens`` (the frozen public EfficientNet-Lite0 feature map of each view pooled to
            an ``image_size`` x ``image_size`` grid, ``in_channels`` = 320 wide, one token per cell with
            ``patch_size`` 1; `shared_model.sitedata.public_features`): LLNM-Net's attention over features no
            site trained, which DP-SGD can afford (the ``dp-attention`` preset).
        patch_stem: how image patches become tokens: ``linear`` (one patch-size convolution, the paper's ViT
            embedding) or ``conv`` (`layers.ConvStem`: two 3x3 convolutions of ``stem_width`` and 2 x
            ``stem_width`` channels ahead of the patches).
        stem_width: channels of the convolutional stem's first layer.
        scalar_embedding: how a numeric scalar becomes its token: ``linear`` (``Linear(1, H)``) or ``mlp``
            (`layers.ScalarEmbedding`: a learned curve per number, ``scalar_width`` hidden units); categorical
            tokens are always a ``Linear(k, H)`` of their one-hot code.
        scalar_width: hidden units of each numeric scalar's MLP embedding.
        view_fusion: how the two views make the patient's prediction: ``probability`` (the paper's: each view
            trained to predict alone, the probabilities averaged) or ``logit`` (the views' logits averaged and
            trained together, so that what only one view shows adds to what only the other shows;
            `shared_model.model.loss`).
    """

    WHAT: ClassVar[str] = "model config"

    architecture: Literal["llnm-net", "feature-head"] = "llnm-net"
    feature_hidden: Int = Field(16, ge=1)
    feature_centring: Literal["val", "none"] = "val"
    image_features: Literal["maps", "public-tokens"] = "maps"
    patch_stem: Literal["linear", "conv"] = "linear"
    stem_width: Int = Field(16, ge=1)
    scalar_embedding: Literal["linear", "mlp"] = "linear"
    scalar_width: Int = Field(16, ge=1)
    view_fusion: Literal["probability", "logit"] = "probability"

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
        # LLNM-Net itself, narrow, on frozen public tokens: each view's EfficientNet-Lite0 feature map pooled to
        # 2 x 2 cells (4 image tokens of 320 values), the report's MiniLM segment states and the scalar tokens,
        # fused by one bidirectional attention block of width 16: 17,649 parameters, every one trained by
        # DP-SGD: the DP design that keeps the bidirectional attention (docs/privacy.md).
        "dp-attention": {"image_features": "public-tokens", "in_channels": 320, "image_size": 2, "patch_size": 1,
                         "hidden_size": 16, "num_heads": 2, "num_bidirectional_layers": 1, "num_self_layers": 0,
                         "mlp_dim": 32, "head_hidden": 16, "num_stages": 0, "dropout": 0.0,
                         "attention_dropout": 0.0, "init_std": 0.25},
    }

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.num_bidirectional_layers + self.num_self_layers < 1:
            raise ValueError("the model needs at least one bidirectional or self-attention block")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.patch_stem == "conv" and (self.patch_size < 2 or self.patch_size % 2):
            raise ValueError(f"patch_stem=conv needs an even patch_size >= 2, got {self.patch_size}")
        if self.image_features == "public-tokens" and (self.architecture != "llnm-net" or self.patch_size != 1):
            raise ValueError("image_features=public-tokens is LLNM-Net on one token per grid cell: it needs "
                             f"architecture llnm-net and patch_size 1, got {self.architecture} and {self.patch_size}")
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
