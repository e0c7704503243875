"""Experiment configuration: one YAML file per experiment, validated before anything runs.

`ExperimentConfig` composes the shared schemas of `shared_model.config` (preprocess, train,
privacy.patient; the model section picks a `ModelConfig` preset) with the coordinator's own sections
(data, federation, simulation, baseline, privacy.site).

The file is checked with pydantic (unknown keys, wrong types and impossible values are errors naming the
offending key), resolved (defaults filled in, relative paths made absolute) and written into the run
directory as `config.yaml`. For a Flower deployment the resolved configuration travels to the ServerApp
as one JSON string in Flower's run config (key `experiment`), because Flower's run-config values must be
scalars; the ServerApp then sends each site only what it needs for its round (model, preprocessing,
training and privacy settings) inside the round's ConfigRecord.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from shared_model.config import (
    ConfigError,
    PatientDPConfig,
    PreprocessConfig,
    Schema,
    TrainConfig,
    format_validation_error,
)
from shared_model.model.configuration import ModelConfig

__all__ = ["ConfigError", "ExperimentConfig", "load_config", "parse_config", "parse_set_options"]


class DataSection(Schema):
    # A folder of site folders (what `llnm-synth` writes); used by `simulate` and `baseline` only.
    # In a deployment each site's data path is set on its own SuperNode and never seen here.
    root: str | None = None
    sites: list[str] | None = None
    cache_dir: str | None = None


class ModelSection(Schema):
    preset: Literal["tiny", "paper", "feature-head"] = "tiny"
    overrides: dict[str, Any] = Field(default_factory=dict)


class FedAdamSection(Schema):
    eta: float = Field(default=1e-2, gt=0.0)
    eta_l: float = Field(default=1e-2, gt=0.0)
    beta_1: float = Field(default=0.9, ge=0.0, lt=1.0)
    beta_2: float = Field(default=0.99, ge=0.0, lt=1.0)
    tau: float = Field(default=1e-3, gt=0.0)


class SuperLinkSection(Schema):
    host: str = "127.0.0.1"
    port: int = Field(default=9093, ge=1, le=65535)
    # Secure by default: TLS and registered SuperNodes from a provisioning folder (`llnm-server provision`).
    # Plain HTTP (insecure: true) is accepted for a loopback development SuperLink only.
    insecure: bool = False
    provision_dir: str | None = None
    database: str | None = None


class SecureAggregationSection(Schema):
    """Flower's SecAgg+ (`SecAggPlusWorkflow`) for the train rounds when federation.secure_aggregation is on."""

    # Shares of each site's secrets: a fraction of the sampled sites or a count (Flower's num_shares).
    num_shares: float | int = Field(default=1.0, gt=0)
    # Shares needed to reconstruct (fraction of num_shares, or a count): fewer surviving sites abort the round.
    reconstruction_threshold: float | int = Field(default=0.6, gt=0)
    # Every coordinate of a site's scaled update must lie within +-clipping_range (else the site refuses the
    # round rather than let the quantizer clip it silently); quantization_range levels over that interval.
    clipping_range: float = Field(default=8.0, gt=0)
    quantization_range: int = Field(default=2**22, ge=2**8, le=2**28)
    modulus_range: int = Field(default=2**32, ge=2**16, le=2**62)
    # A site's update is multiplied by weight / weight_scale before masking (FedAvg's sample weights, at a
    # magnitude the quantizer resolves); the coordinator divides it out of the sum.
    weight_scale: float = Field(default=100.0, gt=0)


class FederationSection(Schema):
    strategy: Literal["fedavg", "fedprox", "fedadam"] = "fedavg"
    rounds: int = Field(default=10, ge=1, le=10000)
    # Rounds per pass over the data: with k > 1 each round trains every site on one of k disjoint parts of its
    # training split (a new partition every k rounds), so k rounds make train.local_epochs epochs. Averaging
    # more often at the same compute is what brought FedAvg level with pooled training
    # (benchmarks/results/federated.json). Not with patient-level DP-SGD.
    rounds_per_epoch: int = Field(default=1, ge=1, le=64)
    min_sites: int = Field(default=2, ge=1)
    round_timeout_s: float = Field(default=1800.0, gt=0.0)
    connect_timeout_s: float = Field(default=600.0, gt=0.0)
    eval_split: Literal["val", "test"] = "val"
    # Evaluate the global model every k-th round (and always after the last): every evaluation costs each site
    # a pass over its split. Rounds without one have no metrics and cannot be chosen as the best round.
    eval_every: int = Field(default=1, ge=1)
    final_eval_split: Literal["val", "test"] | None = "test"
    # Which global model the final evaluation uses: the round with the best pooled validation AUC
    # (model selection on validation, as the baselines do) or simply the last round.
    final_model: Literal["best", "last"] = "best"
    proximal_mu: float = Field(default=0.01, ge=0.0)
    fedadam: FedAdamSection = Field(default_factory=FedAdamSection)
    eval_bootstrap: int = Field(default=200, ge=0, le=100000)
    # Train replies screened before aggregation (fl_server/update_screen.py): an update longer than this
    # (absolute; None: no absolute bound) or than this many times the round's median update norm is rejected.
    max_update_norm: float | None = Field(default=None, gt=0.0)
    max_update_norm_ratio: float | None = Field(default=10.0, gt=1.0)
    # How sites upload their update: float32 weights, or float16 differences from the round's model (half the
    # bytes; shared_model/protocol/update_codec.py). Not with secure aggregation.
    update_transport: Literal["float32", "float16"] = "float32"
    # Train rounds with Flower's SecAgg+: the coordinator sees only the masked sum of the sites' updates.
    secure_aggregation: bool = False
    secagg: SecureAggregationSection = Field(default_factory=SecureAggregationSection)
    superlink: SuperLinkSection = Field(default_factory=SuperLinkSection)


class EvaluationSection(Schema):
    """What the final evaluation asks of the sites beyond metrics."""

    # Each site also returns explanation aggregates (shared_model.evaluation.explanation): integrated-gradients
    # feature-group shares and LLNM counts by capsule-distance bin and lobe third. Never a per-patient value;
    # a site whose policy says share-explanations=false sends none.
    explain: bool = False
    explain_steps: int = Field(default=32, ge=4, le=512)  # integrated-gradients steps


class TrackingSection(Schema):
    """Experiment tracking (fl_server.tracking): per-site metrics and privacy spent, every round."""

    backend: Literal["tensorboard", "none"] = "tensorboard"
    # Where the event files go; default RUN_DIR/tensorboard. Open with `tensorboard --logdir DIR`.
    log_dir: str | None = None


class SimulationSection(Schema):
    cpus_per_site: float = Field(default=1.0, gt=0.0)
    gpus_per_site: float = Field(default=0.0, ge=0.0)
    # Node config of every simulated site (what each hospital's own `llnm-site join` flags would set in a
    # deployment), e.g. {"exact-evaluation": true} for synthetic patients; site_node_config overrides it per site.
    node_config: dict[str, str | int | float | bool] = Field(default_factory=dict)
    # Per-site node config in simulation, keyed by site folder name, e.g. {"site-c": {"max-patient-epsilon": 1.0}}
    # (what each hospital's own `llnm-site join --max-patient-epsilon` would set in a deployment).
    site_node_config: dict[str, dict[str, str | int | float | bool]] = Field(default_factory=dict)


class BaselineSection(Schema):
    """Centralised reference training (`llnm-server baseline`)."""

    # None: train.local_epochs x federation.rounds / federation.rounds_per_epoch, the passes over each site's data
    # as the federation makes, so that pooled / local / federated compare at equal total local epochs.
    epochs: int | None = Field(default=None, ge=1)
    # Evaluate on the validation split after every epoch and keep the best epoch's model.
    select_on_val: bool = True


class SiteDPSection(Schema):
    """Site-level DP at the server (Flower's DP strategy wrappers)."""

    enabled: bool = False
    clipping: Literal["server-fixed", "client-fixed", "server-adaptive", "client-adaptive"] = "server-fixed"
    noise_multiplier: float = Field(default=1.0, gt=0.0)
    clipping_norm: float = Field(default=1.0, gt=0.0)
    delta: float = Field(default=1e-5, gt=0.0, lt=1.0)
    max_epsilon: float | None = Field(default=None, gt=0.0)
    clipped_count_stddev: float | None = Field(default=None, gt=0.0)
    target_clipped_quantile: float = Field(default=0.5, gt=0.0, lt=1.0)


class PrivacySection(Schema):
    patient: PatientDPConfig = Field(default_factory=PatientDPConfig)
    site: SiteDPSection = Field(default_factory=SiteDPSection)


class ExperimentConfig(Schema):
    name: str = Field(default="experiment", pattern=r"^[A-Za-z0-9._-]{1,80}$")
    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=ModelSection)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    federation: FederationSection = Field(default_factory=FederationSection)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    simulation: SimulationSection = Field(default_factory=SimulationSection)
    baseline: BaselineSection = Field(default_factory=BaselineSection)
    privacy: PrivacySection = Field(default_factory=PrivacySection)

    # ---- derived objects of shared_model -------------------------------------------------------
    def architecture(self) -> ModelConfig:
        """The model's architecture: the preset, the overrides, and what preprocessing fixes."""
        overrides = dict(self.model.overrides)
        overrides.setdefault("image_size", self.preprocess.image_size)
        overrides.setdefault("text_max_length", self.preprocess.text.num_positions)
        # The model holds the trainable top encoder layers; the site cache holds the frozen layers' output.
        overrides.setdefault("text_top_layers", self.preprocess.text.trainable_top_layers)
        # Which pathways exist and which scalar tokens there are: what preprocess.inputs declares.
        inputs = self.preprocess.inputs
        overrides.setdefault("images", inputs.images)
        overrides.setdefault("reports", inputs.reports)
        overrides.setdefault("num_clinical", len(inputs.token_levels))
        overrides.setdefault("clinical_levels", inputs.token_levels)
        return ModelConfig.preset(self.model.preset, **overrides)

    def data_epochs(self) -> int:
        """How many times the federation passes over each site's training data: what `baseline` trains for
        unless baseline.epochs says otherwise (equal compute)."""
        return self.train.local_epochs * self.federation.rounds // self.federation.rounds_per_epoch

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)


def parse_config(data: Any, source: str = "<config>", base_dir: Path | None = None) -> ExperimentConfig:
    """Validate a loaded mapping; relative data paths are resolved against `base_dir`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from None
    try:
        # Cross-section checks: unknown override keys, a bad preset, an architecture that does not fit.
        cfg.architecture().check_inputs(cfg.preprocess.inputs, "model.overrides")
    except (ConfigError, ValueError) as exc:
        raise ConfigError(f"{source}: model: {exc}") from None
    if cfg.evaluation.explain and cfg.architecture().architecture != "llnm-net":
        raise ConfigError(f"{source}: evaluation.explain: explanations need the LLNM-Net transformer, but "
                          f"model.preset is {cfg.model.preset!r}; set evaluation.explain: false")
    if cfg.evaluation.explain and not cfg.federation.final_eval_split:
        raise ConfigError(f"{source}: evaluation.explain: the sites explain the model in the final evaluation, "
                          "but federation.final_eval_split is null; set it to val or test")
    if base_dir is not None:
        if cfg.data.root and not Path(cfg.data.root).is_absolute():
            cfg.data.root = str((base_dir / cfg.data.root).resolve())
        if cfg.tracking.log_dir and not Path(cfg.tracking.log_dir).is_absolute():
            cfg.tracking.log_dir = str((base_dir / cfg.tracking.log_dir).resolve())
        if cfg.data.cache_dir and not Path(cfg.data.cache_dir).is_absolute():
            cfg.data.cache_dir = str((base_dir / cfg.data.cache_dir).resolve())
        link = cfg.federation.superlink
        if link.provision_dir and not Path(link.provision_dir).is_absolute():
            link.provision_dir = str((base_dir / link.provision_dir).resolve())
    site_dp = cfg.privacy.site
    if site_dp.enabled and site_dp.clipping.endswith("fixed") and cfg.federation.strategy == "fedadam":
        raise ConfigError(
            f"{source}: privacy.site.clipping: Flower's site-level accountant needs plain FedAvg aggregation; use "
            "federation.strategy fedavg or fedprox with fixed clipping (FedAdam's server optimiser changes what "
            "the noise protects)"
        )
    fed = cfg.federation
    if fed.rounds % fed.rounds_per_epoch:
        raise ConfigError(f"{source}: federation.rounds ({fed.rounds}) must be a multiple of "
                          f"federation.rounds_per_epoch ({fed.rounds_per_epoch}), so that every site passes over its "
                          "training data a whole number of times")
    if fed.rounds_per_epoch > 1 and cfg.privacy.patient.enabled:
        raise ConfigError(f"{source}: federation.rounds_per_epoch: patient-level DP-SGD samples each step from a "
                          "site's whole training split (that is what its accountant assumes); set "
                          "federation.rounds_per_epoch: 1 with privacy.patient.enabled")
    if fed.secure_aggregation and fed.update_transport != "float32":
        raise ConfigError(f"{source}: federation.update_transport: secure aggregation masks float32 updates as "
                          "integers; use float32 with federation.secure_aggregation")
    if fed.secure_aggregation:
        if site_dp.enabled and site_dp.clipping != "client-fixed":
            raise ConfigError(
                f"{source}: privacy.site.clipping: with federation.secure_aggregation the coordinator never sees a "
                "site's update, so it cannot clip one: use client-fixed (each site clips its update before "
                "masking; the coordinator adds the noise to the unmasked sum and accounts it)"
            )
        if fed.min_sites < 2:
            raise ConfigError(f"{source}: federation.min_sites: secure aggregation needs at least 2 sites")
        sa = fed.secagg
        if isinstance(sa.reconstruction_threshold, int) and sa.reconstruction_threshold > fed.min_sites:
            raise ConfigError(
                f"{source}: federation.secagg.reconstruction_threshold {sa.reconstruction_threshold} is above "
                f"federation.min_sites {fed.min_sites}: a round the quorum allows could never be unmasked"
            )
        if isinstance(sa.reconstruction_threshold, float) and sa.reconstruction_threshold > 1.0:
            raise ConfigError(f"{source}: federation.secagg.reconstruction_threshold: a fraction must be at most 1")
    if cfg.privacy.site.enabled and cfg.privacy.site.clipping.endswith("adaptive") and cfg.privacy.site.max_epsilon:
        raise ConfigError(
            f"{source}: privacy.site.max_epsilon: Flower has no accountant for adaptive clipping, so no budget "
            "can be enforced; use server-fixed or client-fixed clipping, or remove max_epsilon"
        )
    return cfg


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read, validate and resolve an experiment YAML file (paths relative to the current directory)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: experiment configuration file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if overrides:
        data = deep_merge(data or {}, overrides)
    return parse_config(data, source=str(path), base_dir=Path.cwd())


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_set_options(items: list[str] | None) -> dict[str, Any]:
    """`--set federation.rounds=3` style overrides (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. federation.rounds=3")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out
