"""The one configuration model. Loaded from YAML, overridden by `--set key=value`, validated once at
the edge: everything past `load_config` may trust its types and ranges, and past `adaptflow.names` its
names (resolved by the stages' registries: this module imports no stage)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from adaptflow.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IngestConfig(_Section):
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of labeled images held out for early stopping")
    test_fraction: float = Field(0.2, ge=0, lt=1, description="share of labeled images held out for scoring")
    max_image_pixels: int = Field(
        89_478_485, gt=0, description="larger images are rejected as decompression bombs (capped by Pillow's own limit)"
    )
    workers: int = Field(8, ge=1, description="threads that read and decode images while validating")
    check_extension: bool = Field(
        True,
        description="reject a file whose image extension names another "
        "format than its content (a PNG named .jpg): a sign of a broken export",
    )
    rehash: bool = Field(
        False,
        description="read, hash and decode every file again; by default a file the store's listing cache "
        "holds with the same size and version (mtime, ETag) keeps its earlier check unopened",
    )
    full_check_days: float | None = Field(
        None,
        gt=0,
        description="a file last read longer ago than this is read again, changed or not; null: never (the "
        "retrain deployment's weekly run rehashes everything instead of a share of the files every night)",
    )

    @model_validator(mode="after")
    def _room_for_training(self) -> IngestConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave images for training (sum below 1)")
        return self


class BackboneConfig(_Section):
    name: str = Field(
        "efficientnet_lite0",
        description="a shortcut of adaptflow.extract.backbones.BACKBONES, any timm model (convnext_tiny.fb_in22k, "
        "timm:NAME, hf-hub:ORG/MODEL) or torchvision classification model (tv:NAME, tv:NAME.WEIGHTS)",
    )
    weights: str | None = Field(
        None,
        description="null: the backbone's default (EfficientNet-Lite0's from its package; others from the "
        "Hugging Face or torch hub cache, downloaded there only where download is true); a path or URI to a "
        "weights file; 'random'",
    )
    download: bool = Field(
        False,
        description="may a backbone's default weights missing from the local caches be downloaded (honouring "
        "HF_HUB_OFFLINE, HF_HOME, HF_ENDPOINT)? Off: a run never reaches the network",
    )
    layer: str | None = Field(None, description="null: pooled penultimate features; else a module name, pooled")
    image_size: int | None = Field(None, ge=8, le=1024, description="null: the backbone's own input size")


class ExtractConfig(_Section):
    batch_size: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="images per forward pass; null: 256 on "
        "CUDA, 8 on a CPU (small channels-last batches run fastest there: measured)",
    )
    shard_size: int = Field(4096, ge=1, description="images per extraction task")
    num_workers: int = Field(2, ge=0, le=64, description="DataLoader processes that decode and resize")
    dtype: Literal["float16", "float32"] = "float16"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    decode_on: Literal["workers", "device"] = Field(
        "workers",
        description="workers: DataLoader processes decode and resize; device: JPEGs are decoded "
        "and resized on the extraction device (nvJPEG on CUDA), the workers only read files",
    )
    compile: bool = Field(False, description="torch.compile the backbone on CUDA (pays off on large datasets)")
    compact_min_shards: int = Field(
        8, ge=0, description="merge small shards (under half of shard_size rows) once there are this many; 0: never"
    )


class HeadConfig(_Section):
    kind: Literal["linear", "mlp"] = "linear"
    hidden_dim: int = Field(512, ge=1)
    dropout: float = Field(0.2, ge=0, lt=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(256, ge=1)
    max_epochs: int = Field(200, ge=1)
    patience: int = Field(20, ge=1, description="epochs without a better source-validation score before stopping")


class AdaptConfig(_Section):
    """Domain adaptation: which candidates to train, and how; the champion is chosen without target labels."""

    method: str = Field(
        "auto",
        description="auto: train the candidate set and select; an algorithm name; or none: only the source-only head",
    )
    methods: list[str] = Field(
        default_factory=lambda: ["source_only", "dann", "cdan", "coral", "mmd", "mcc", "im"],
        description="the algorithms tried in features mode by method=auto",
    )
    image_methods: list[str] | None = Field(
        None,
        description="algorithms also trained end to end (images mode); null: sized to the hardware "
        "(source_only, dann and cdan on CPU, every method on GPU)",
    )
    hparam_draws: int = Field(0, ge=0, description="random hyperparameter draws per method beside the defaults")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    budget: Literal["quick", "default", "thorough"] = Field(
        "default",
        description="how much training the candidates get (adaptflow.adapt.candidates.BUDGETS): end-to-end "
        "steps as passes over the source's training images within bounds per device, the end-to-end image size "
        "on a CPU, successive halving and features-mode steps; a setting below that is not null wins over it",
    )
    feature_steps: int | None = Field(None, ge=1, description="updates per features-mode candidate; null: the budget's")
    image_steps: int | None = Field(
        None,
        ge=1,
        description="updates per images-mode candidate, whatever the machine's load; null: the budget's "
        "passes over the source's training images, within its bounds for the device",
    )
    image_size: int | None = Field(
        None,
        ge=16,
        le=1024,
        description="images-mode input size; null: the budget's on a CPU, the backbone's own on GPU",
    )
    strategy: Literal["full", "partial", "lp_ft", "gradual"] | None = Field(
        None,
        description="which part of the backbone fine-tunes in images mode: full | partial (the first "
        "frozen_fraction of its blocks stay frozen) | lp_ft (linear probe, then fine-tune) | gradual "
        "(unfreeze block by block); null: partial on a CPU, full on a GPU",
    )
    frozen_fraction: float = Field(
        0.5, ge=0.0, lt=1.0, description="partial: the share of the backbone's blocks, from the input on, kept frozen"
    )
    halving: int | None = Field(
        None,
        ge=0,
        description="successive halving of the images-mode candidates: train all to "
        "1/halving of the steps, keep the best 1/halving by the selection policy, and so on; "
        "0 or 1: train every candidate to the end; null: the budget's",
    )
    class_mix: Literal["em", "bbse"] = Field(
        "em",
        description="how the target's class mix is estimated without labels (adaptflow.adapt.priors): em "
        "(Saerens' EM on calibrated predictions) or bbse (black-box shift estimation)",
    )
    labels_trained: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="the share of the target images labelled for training (--target-train-labels) that every "
        "candidate also trains on, a supervised loss beside its own; the rest judge the candidates in selection, "
        "never having been trained on (adaptflow.data.labels.split). 0: selection only",
    )
    prior_correction: bool = Field(
        True,
        description="where the target's estimated class mix is credible (a label shift seen by a source-only "
        "model as sure of the target as of the source), the chosen model's output layer is corrected to it: "
        "p(y|x) re-weighted by the estimated q(y) / p(y) (adaptflow.adapt.priors.correct)",
    )
    class_weighting: Literal["off", "online"] = Field(
        "off",
        description="class-weighted alignment for a target whose class mix differs from the source's: online "
        "re-estimates each class's weight from the candidate's own outputs as it trains (IWDAN/IWCDAN; "
        "adaptflow.adapt.algorithms); off by default: on the suite it cost a covariate shift more than it "
        "gained a label shift (docs/benchmarks.md)",
    )
    open_set: bool = Field(
        False,
        description="the target may hold classes the source never had: a prediction whose confidence is "
        "below unknown_threshold is written as the class 'unknown'",
    )
    unknown_threshold: float = Field(
        0.5, gt=0, lt=1, description="open_set: the confidence below which a prediction is 'unknown'"
    )
    validation_samples: int = Field(
        2000,
        ge=10,
        description="source-validation and target images each "
        "candidate is scored on: a fixed seeded sample, the same for every candidate",
    )
    time_budget_s: float | None = Field(
        None,
        gt=0,
        description="an opt-in safety net: stop an images-mode "
        "candidate after this many seconds (the result then depends on the "
        "machine's load); null: none",
    )
    hparams: dict[str, Any] = Field(
        default_factory=dict,
        description="hyperparameters set for every candidate, e.g. {l2sp: 0.01, backbone_lr_mult: 0.1}",
    )
    policy: list[str] = Field(
        default_factory=lambda: ["source_val_acc"],
        min_length=1,
        description="validators whose mean rank selects the model among a run's candidates and ranks them "
        "for successive halving (collapsed ones never); chosen by benchmarks/selection.py",
    )

    @field_validator("class_weighting", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        return "off" if value is False else value  # YAML reads a bare `off` (as --set passes it) as false


class MonitorConfig(_Section):
    """Scheduled runs against a store with a champion: retrain only when the target moved or the champion
    got worse on it; otherwise stop after extraction and record "no shift"."""

    enabled: bool = Field(True, description="test each new target batch for shift; false: always retrain")
    alpha: float = Field(0.01, gt=0, lt=1, description="MMD permutation-test level: p below it is a shift")
    permutations: int = Field(200, ge=10, description="permutations for the p-value")
    max_samples: int = Field(500, ge=5, description="images per side in the test (subsampled, seeded)")
    score_drop: float = Field(
        0.05,
        ge=0,
        description="the champion's selection score on the new batch falling "
        "this much below its score at registration also triggers retraining",
    )
    rescore_after: float = Field(
        0.05,
        ge=0,
        le=1,
        description="measure the champion's scores again once this share of the target sample is images they "
        "were not measured on (each run tests its new images for shift); 0: whenever the sample changed",
    )
    class_mix: bool = Field(
        True,
        description="also test whether the champion predicts another class mix on the new batch than on "
        "its own target images (chi-square at alpha): a class-mix change is a shift too",
    )
    min_mix_change: float = Field(
        0.1, ge=0, le=1, description="the smallest change of the predicted class mix (total variation) that counts"
    )

    @model_validator(mode="after")
    def _alpha_reachable(self) -> MonitorConfig:
        if self.alpha * (1 + self.permutations) <= 1:  # the smallest p-value is 1 / (1 + permutations)
            raise ValueError(
                f"alpha {self.alpha} needs more than {1 / self.alpha - 1:.0f} permutations, got {self.permutations}"
            )
        return self


class PromotionConfig(_Section):
    margin: float = Field(
        0.01,
        ge=0,
        description="a challenger must beat the champion's gate score on the "
        "same data (and its target accuracy, when target labels exist) by this much",
    )
    allow_low_confidence: bool = Field(
        False,
        description="let a pick that selection is not confident about replace a champion (or become the "
        "first one); false: it stays challenger, and with no champion the source-only reference is promoted",
    )
    allow_class_change: bool = Field(
        False,
        description="let a model that predicts other classes than the champion's replace it; false: it stays "
        "challenger, with the classes lost and gained as the reason",
    )
    policy: list[str] = Field(
        default_factory=lambda: ["source_val_acc", "im", "bnm"],
        min_length=1,
        description="validators whose mean the gate compares champion and challenger by, both scored on the "
        "run's data (and the champion's drop that triggers retraining): unlike adapt.policy it must see the "
        "target, since a champion and a challenger for a new target can be equally accurate on the source",
    )


class RuntimeConfig(_Section):
    max_workers: int = Field(2, ge=1, description="Prefect tasks run at once (threads), in deployments too")
    task_runner: Literal["threads", "dask"] = Field("threads", description="threads, or Dask through prefect-dask")
    dask_address: str | None = Field(None, description="an existing Dask scheduler; null: a LocalCluster")
    dask_workers: int = Field(2, ge=1, description="LocalCluster worker processes")
    gpu_resource: bool = Field(
        False,
        description="extraction, training and prediction tasks ask Dask for a GPU=1 resource, so they "
        "land only on workers started with --resources GPU=1",
    )
    credentials_block: str | None = Field(
        None,
        description="the name of a Prefect Secret block holding store credentials as a JSON object of "
        "environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...); the name "
        "only: credentials never live in the config",
    )
    flow_timeout_s: float | None = Field(
        43_200,
        gt=0,
        description="a run still going after this many seconds fails as TimedOut, so one hung "
        "scheduled run cannot hold a deployment's concurrency slot for ever (12 h); null: no limit",
    )
    task_timeout_s: float | None = Field(
        14_400,
        gt=0,
        description="limit for each long task (ingest, extraction shard, training, scoring): a "
        "task past it fails the run (4 h); on worker threads it can stop only between Python steps, not inside "
        "a blocking read; null: no limit",
    )


class TrackingConfig(_Section):
    """Runs mirrored to MLflow (adaptflow[mlflow]); adaptflow's own registry stays the source of truth."""

    mlflow_uri: str | None = Field(
        None,
        description="MLflow tracking URI (sqlite:///mlflow.db, http://host:5000, databricks, ...): each run "
        "logs params, metrics and artifacts there and registers its model, with the champion/challenger aliases "
        "kept in step; null: the MLFLOW_TRACKING_URI environment variable if set, else no tracking",
    )
    mlflow_experiment: str = Field("adaptflow", min_length=1, description="the MLflow experiment runs are logged to")
    mlflow_model: str = Field("adaptflow", min_length=1, description="the registered model name in MLflow")


class LinksConfig(_Section):
    expiry_s: int | None = Field(
        604_800,
        ge=1,
        le=604_800,
        description="the report and history links a run puts on the Prefect UI are, on "
        "an S3 store, presigned HTTPS URLs valid this many seconds (at most 7 days, S3's limit); null: the s3:// "
        "URIs themselves (a presigned URL carries the access key ID, never the secret)",
    )


class LabelingConfig(_Section):
    """A person in the loop (flows/label.py): after a run, ask for labels of a few target images in the
    Prefect UI, then train again with them; the store keeps every label given."""

    ask: int = Field(0, ge=0, description="target images to ask a person to label after a run (0: none)")
    timeout_s: int = Field(3600, ge=1, description="how long a run waits for the labels before it ends without")


class Config(_Section):
    seed: int = 0
    ingest: IngestConfig = IngestConfig()
    backbone: BackboneConfig = BackboneConfig()
    extract: ExtractConfig = ExtractConfig()
    head: HeadConfig = HeadConfig()
    adapt: AdaptConfig = AdaptConfig()
    monitor: MonitorConfig = MonitorConfig()
    promotion: PromotionConfig = PromotionConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    tracking: TrackingConfig = TrackingConfig()
    links: LinksConfig = LinksConfig()
    labeling: LabelingConfig = LabelingConfig()

    def fingerprint(self) -> str:
        """A short, stable hash of every setting."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:12]


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at `path`, then `key.sub=value` overrides, validated together."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {path} is a folder; give the path of a YAML file") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not text (not UTF-8): give the path of a YAML file") from None
        except OSError as e:
            raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(data).__name__}")
    for item in overrides:
        _apply_override(data, item)
    return validate_config(data)


def validate_config(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError("invalid config:\n" + "\n".join(_describe(err) for err in e.errors())) from None


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value (e.g. backbone.image_size=64), got {item!r}")
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
    try:
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        problem = str(getattr(e, "problem", None) or e).splitlines()[0]
        raise ConfigError(
            f"--set {key}: the value {raw!r} is not valid YAML ({problem}); quote it for a string, "
            "e.g. --set 'adapt.hparams={lambda: 0.5}'"
        ) from None


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        section = _section_at(err["loc"][:-1])
        valid = ", ".join(section.model_fields) if section else "?"
        return f"  {loc}: unknown key (valid keys here: {valid})"
    msg = err["msg"].removeprefix("Value error, ")
    return f"  {loc}: {msg} (got {err.get('input')!r})"


def _section_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model
