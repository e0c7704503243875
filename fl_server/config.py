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
from shared_model.model.segmenter import SegmenterConfig

__all__ = ["ConfigError", "ExperimentConfig", "load_config", "parse_config", "parse_set_options"]


class DataSection(Schema):
    """The sites' data for the research commands (`simulate`, `baseline`) only: in a deployment each site's data
    path is set on its own SuperNode and never seen here."""

    # A folder of site folders (what `llnm-synth` writes); `--data` overrides it.
    root: str | None = None
    # Which site folders under root take part (folder names); None: every folder that holds a patients.csv.
    sites: list[str] | None = None
    # Where preprocessed site tensors are cached; None: $LLNM_CACHE_DIR if set, else ~/.cache/llnm-fl.
    cache_dir: str | None = None


class ModelSection(Schema):
    """The model's architecture: a named `ModelConfig` preset and the fields that change it."""

    # tiny (CPU-sized LLNM-Net), paper (the paper's dimensions), feature-head (a small head on frozen public
    # features, what DP-SGD trains well) or dp-attention (a narrow LLNM-Net on frozen public tokens, the DP design
    # that keeps the bidirectional attention): `ModelConfig.PRESETS`.
    preset: Literal["tiny", "paper", "feature-head", "dp-attention"] = "tiny"
    # `ModelConfig` fields that replace the preset's values; the sizes, pathways and clinical tokens that
    # preprocessing fixes are filled in from the preprocess section unless given here (`architecture()`).
    overrides: dict[str, Any] = Field(default_factory=dict)


class SegmenterSection(Schema):
    """The nodule and thyroid segmenter that a `task: segment` experiment trains: a named `SegmenterConfig` preset
    and the fields that change it."""

    # unet-small (128 px, about 0.46M parameters, CPU-sized) or unet-256 (256 px, twice the widths, for a GPU):
    # `SegmenterConfig.PRESETS`.
    preset: Literal["unet-small", "unet-256"] = "unet-small"
    # `SegmenterConfig` fields that replace the preset's values.
    overrides: dict[str, Any] = Field(default_factory=dict)


class FedAdamSection(Schema):
    """Flower's FedAdam server optimiser (federation.strategy: fedadam)."""

    # Server-side learning rate: the step the coordinator takes along the Adam-scaled mean update.
    eta: float = Field(default=1e-2, gt=0.0)
    # Flower's client-side learning rate, shown in Flower's log only: the sites train with train.lr.
    eta_l: float = Field(default=1e-2, gt=0.0)
    # Decay of the running mean of the updates (Adam's momentum).
    beta_1: float = Field(default=0.9, ge=0.0, lt=1.0)
    # Decay of the running mean of the squared updates (Adam's second moment).
    beta_2: float = Field(default=0.99, ge=0.0, lt=1.0)
    # Added to the square root of the second moment: the larger, the less adaptive the per-parameter steps.
    tau: float = Field(default=1e-3, gt=0.0)


class SuperLinkSection(Schema):
    """Where the coordinator's SuperLink runs (`llnm-server start`) and where `llnm-server run` reaches it."""

    # Without a provisioning folder: the interface `llnm-server start` listens on and the host `llnm-server run`
    # connects to (0.0.0.0: this machine). With one, the consortium file's superlink.listen and address apply.
    host: str = "127.0.0.1"
    # The SuperLink's port, used like host (with a provisioning folder, the port of the consortium's address).
    port: int = Field(default=9093, ge=1, le=65535)
    # Secure by default: TLS and registered SuperNodes from a provisioning folder (`llnm-server provision`).
    # Plain HTTP (insecure: true) is accepted for a loopback development SuperLink only.
    insecure: bool = False
    # The provisioning folder of `llnm-server provision` (CA, SuperLink certificate, consortium file), used by
    # `start` and `run` when no --provision is given.
    provision_dir: str | None = None
    # SQLite file for the SuperLink's state (`flower-superlink --database`); None keeps it in memory.
    database: str | None = None


class SecureAggregationSection(Schema):
    """Flower's SecAgg+ (`SecAggPlusWorkflow`) for the train rounds when federation.secure_aggregation is on."""

    # Shares of each site's secrets: a fraction of the sampled sites or a count (Flower's num_shares).
    num_shares: float | int = Field(default=1.0, gt=0)
    # Shares needed to reconstruct (fraction of num_shares, or a count): fewer surviving sites abort the round.
    reconstruction_threshold: float | int = Field(default=0.6, gt=0)
    # Every coordinate of a site's scaled update must lie within +-clipping_range (else the site refuses the
    # round rather than let the quantizer clip it silently).
    clipping_range: float = Field(default=8.0, gt=0)
    # Integer levels the quantizer maps [-clipping_range, clipping_range] onto (Flower's quantization_range).
    quantization_range: int = Field(default=2**22, ge=2**8, le=2**28)
    # The masks' range: masked values and their sum are taken modulo modulus_range (Flower's modulus_range).
    modulus_range: int = Field(default=2**32, ge=2**16, le=2**62)
    # A site's update is multiplied by weight / weight_scale before masking (FedAvg's sample weights, at a
    # magnitude the quantizer resolves); the coordinator divides it out of the sum.
    weight_scale: float = Field(default=100.0, gt=0)


class FederationSection(Schema):
    """The federated rounds: aggregation, quorum, timeouts, evaluation and how updates travel."""

    # How the coordinator combines the sites' updates: Flower's FedAvg, FedProx (FedAvg, the sites' training
    # pulled towards the round's global model: proximal_mu) or FedAdam (an Adam step on the server: fedadam).
    strategy: Literal["fedavg", "fedprox", "fedadam"] = "fedavg"
    # Federated rounds the run makes (each: train at every site, aggregate, evaluate when eval_every says).
    rounds: int = Field(default=10, ge=1, le=10000)
    # Rounds per pass over the data: with k > 1 each round trains every site on one of k disjoint parts of its
    # training split (a new partition every k rounds), so k rounds make train.local_epochs epochs. Averaging
    # more often at the same compute brings FedAvg closer to pooled training (the held-out gap is in
    # benchmarks/results/federated.json). Not with patient-level DP-SGD.
    rounds_per_epoch: int = Field(default=1, ge=1, le=64)
    # Quorum: a round starts once this many sites are connected, and the run stops (resumable) when fewer
    # reply to a round.
    min_sites: int = Field(default=2, ge=1)
    # How long the coordinator waits for the sites' replies in each phase of a round; a site that has not
    # replied by then counts as failed for that round.
    round_timeout_s: float = Field(default=1800.0, gt=0.0)
    # How long the coordinator waits, before a round, for min_sites sites to be connected; then the run stops
    # (resumable).
    connect_timeout_s: float = Field(default=600.0, gt=0.0)
    # The split the sites evaluate the global model on during the rounds.
    eval_split: Literal["val", "test"] = "val"
    # Evaluate the global model every k-th round (and always after the last): every evaluation costs each site
    # a pass over its split. Rounds without one have no metrics and cannot be chosen as the best round.
    eval_every: int = Field(default=1, ge=1)
    # The split of the final evaluation after the last round; None: no final evaluation.
    final_eval_split: Literal["val", "test"] | None = "test"
    # Which global model the final evaluation uses: the round with the best pooled validation AUC
    # (model selection on validation, as the baselines do) or simply the last round.
    final_model: Literal["best", "last"] = "best"
    # Weight mu of FedProx's proximal term mu/2 * ||w - w_global||^2 (each site steps towards the round's global
    # model after every optimiser step); fedprox only.
    proximal_mu: float = Field(default=0.01, ge=0.0)
    fedadam: FedAdamSection = Field(default_factory=FedAdamSection)
    # Bootstrap resamples behind the confidence intervals of exactly evaluated metrics (0: no intervals); also
    # what `llnm-server baseline` uses.
    eval_bootstrap: int = Field(default=200, ge=0, le=100000)
    # Train replies screened before aggregation (fl_server/update_screen.py): an update longer than this
    # (absolute; None: no absolute bound) is rejected.
    max_update_norm: float | None = Field(default=None, gt=0.0)
    # A train reply whose update is longer than this many times the round's median update norm is rejected
    # (with three replies or more; None: no relative bound).
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

    # tensorboard: event files in log_dir, written every round; none: no tracking.
    backend: Literal["tensorboard", "none"] = "tensorboard"
    # Where the event files go; default RUN_DIR/tensorboard. Open with `tensorboard --logdir DIR`.
    log_dir: str | None = None


class SimulationSection(Schema):
    """Flower's simulation engine (`llnm-server simulate`): one virtual SuperNode per site folder."""

    # CPU cores Ray reserves for each simulated site; rounded down (at least 1), also its torch thread count.
    cpus_per_site: float = Field(default=1.0, gt=0.0)
    # GPUs Ray reserves for each simulated site (a fraction lets sites share one GPU; 0: none reserved).
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

    # Clip each site's whole model update and add Gaussian noise to their average (fl_server/privacy), so that
    # the global model hides any one hospital's contribution.
    enabled: bool = False
    # Who clips (the coordinator, or each site before sending: client-*, required with secure aggregation) and
    # whether the clipping norm is fixed or adapted each round (adaptive: no accountant, so no max_epsilon).
    clipping: Literal["server-fixed", "client-fixed", "server-adaptive", "client-adaptive"] = "server-fixed"
    # z: the average of K sites' updates gets Gaussian noise of standard deviation z * clipping_norm / K.
    noise_multiplier: float = Field(default=1.0, gt=0.0)
    # C: the norm each site's update is clipped to (with adaptive clipping, the initial norm).
    clipping_norm: float = Field(default=1.0, gt=0.0)
    # The delta of the site-level (epsilon, delta) guarantee that Flower's accountant reports (fixed clipping).
    delta: float = Field(default=1e-5, gt=0.0, lt=1.0)
    # Fixed clipping: the run stops before a round would take the site-level epsilon above this; None: no limit.
    max_epsilon: float | None = Field(default=None, gt=0.0)
    # Adaptive clipping: standard deviation of the noise on the count of clipped updates; None: Flower's default
    # (the number of sites / 20).
    clipped_count_stddev: float | None = Field(default=None, gt=0.0)
    # Adaptive clipping: the quantile of the sites' update norms that the clipping norm is adapted towards.
    target_clipped_quantile: float = Field(default=0.5, gt=0.0, lt=1.0)


class PrivacySection(Schema):
    """Differential privacy: per patient at every site (DP-SGD) and per site at the coordinator."""

    patient: PatientDPConfig = Field(default_factory=PatientDPConfig)
    site: SiteDPSection = Field(default_factory=SiteDPSection)


class ExperimentConfig(Schema):
    """One experiment: what `llnm-server simulate`, `run` and `baseline` read from `--config FILE`."""

    # The experiment's name: the start of the run's identity that the sites see and log, and the run's name in
    # its records and report.
    name: str = Field(default="experiment", pattern=r"^[A-Za-z0-9._-]{1,80}$")
    # What the run trains: llnm (LLNM-Net, from the sites' images, masks, reports and clinical values) or segment
    # (the nodule and thyroid segmenter of the `segmenter` section, on the views whose masks the sites have drawn;
    # `llnm-site segment` then predicts the masks the others lack).
    task: Literal["llnm", "segment"] = "llnm"
    segmenter: SegmenterSection = Field(default_factory=SegmenterSection)
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
        chosen = {**ModelConfig.PRESETS.get(self.model.preset, {}), **overrides}
        # public tokens come on the model's own grid, not the preprocessed image size
        if chosen.get("image_features") != "public-tokens":
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

    def segmenter_architecture(self) -> SegmenterConfig:
        """The segmenter of a `task: segment` run: the preset with the overrides."""
        return SegmenterConfig.preset(self.segmenter.preset, **self.segmenter.overrides)

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
    if cfg.task == "segment":
        _check_segment_task(cfg, source)
    elif cfg.evaluation.explain and (cfg.architecture().architecture != "llnm-net"
                                   or cfg.architecture().image_features != "maps"):
        raise ConfigError(f"{source}: evaluation.explain: explanations need the LLNM-Net transformer on the "
                          f"image feature maps, but model.preset is {cfg.model.preset!r}; set evaluation.explain: "
                          "false")
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


def _check_segment_task(cfg: ExperimentConfig, source: str) -> None:
    """What a segmentation run cannot do (yet), said before anything runs."""
    try:
        cfg.segmenter_architecture()
    except (ConfigError, ValueError) as exc:
        raise ConfigError(f"{source}: segmenter: {exc}") from None
    if cfg.evaluation.explain:
        raise ConfigError(f"{source}: evaluation.explain: explanations are LLNM-Net's (feature-group shares of a "
                          "risk); a task: segment run has none. Set evaluation.explain: false")
    if cfg.privacy.patient.enabled:
        raise ConfigError(
            f"{source}: privacy.patient.enabled: patient-level DP-SGD is not available for task: segment. A patient "
            "contributes several training samples (each view, whole and cropped around the nodule), which the "
            "DP-SGD plan, sampling one item per patient, does not account. Train the segmenter without it (the "
            "masks and pixels still never leave the sites), or with site-level DP (privacy.site)")


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
