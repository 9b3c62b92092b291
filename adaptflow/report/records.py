"""The record a run leaves in `runs/{run_id}/summary.json`, written last: what it ingested, extracted,
trained, picked and promoted, with each stage's time and bytes. The report, the history page, the CLI and
MLflow tracking read it (`report.summary` writes it)."""

from __future__ import annotations

from typing import Literal

from adaptflow.config import Config
from adaptflow.manifests import ClassMix, Manifest, PromotionManifest, Record, ShiftManifest, SplitScores


class DatasetSummary(Record):
    uri: str
    images: int
    rejected: int
    classes: list[str]  # empty for unlabeled data
    fingerprint: str
    index_uri: str
    rejects_uri: str
    files_read: int = 0  # read, hashed and decoded by this run's ingest
    files_reused: int = 0  # unchanged since an earlier ingest: its checks reused, the files unopened


class ExtractionSummary(Record):
    """The extract stage of a run (`report.summary.summarize_extraction`)."""

    fingerprint: str
    features_uri: str
    images_requested: int
    images_cached: int  # already in the feature store
    images_extracted: int  # embedded and/or decoded into the training-image cache
    image_cache_uri: str | None
    images_cached_pixels: int
    shards: int
    bytes_read: int
    bytes_written: int
    shards_compacted: int
    orphans_removed: int
    wall_seconds: float
    plan_seconds: float
    images_per_second: float | None  # the stage's: planning and model loading included
    shard_images_per_second: float | None  # inside the shard tasks only
    orchestration_share: float | None


class StageStats(Record):
    """One stage's wall time, images, bytes and orchestration share (`store.accounting.stage_stats`)."""

    seconds: float
    images: int | None = None
    images_per_second: float | None = None
    bytes_read: int = 0
    bytes_written: int = 0
    task_seconds: float | None = None
    orchestration_share: float | None = None


class ModelMetrics(Record):
    """A model's scores in a run; all None in a run that trained nothing (`no_shift`)."""

    source_val_accuracy: float | None = None
    source_test: SplitScores | None = None
    target: SplitScores | None = None  # with target labels only


class BaselineMetrics(ModelMetrics):
    model_uri: str = ""  # the source-only head


class CandidateSummary(Record):
    name: str
    method: str
    mode: str
    scores: dict[str, float]  # label-free validators, higher is better
    collapsed: bool
    rank: float | None  # the policy's mean percentile rank; None for a candidate that took no part
    source_test_accuracy: float | None
    target_accuracy: float | None  # with target labels: reporting only
    labelled_accuracy: float | None = None  # on the target images labelled for training (`adapt.labelled`)
    steps: int
    total_steps: int
    stopped_at_rung: int | None
    seconds: float
    model_uri: str


class AdaptationSummary(Record):
    """What selection picked, why, and how sure it is; every candidate; with target labels (scoring only)
    the oracle pick and the regret. Empty in a run that trained nothing (`no_shift`)."""

    selected: str = ""  # a candidate's name, or "head" (the source-only head, adaptation off)
    method: str = ""
    mode: str = ""
    reason: str = ""
    policy: list[str] = []
    scores: dict[str, float] = {}  # the selected candidate's
    confident: bool = True
    confidence: str = ""
    reference: str | None = None  # the source-only candidate selection compared the pick with
    oracle: str | None = None
    oracle_target_accuracy: float | None = None
    selected_target_accuracy: float | None = None
    regret: float | None = None  # oracle minus selected target accuracy
    candidates: list[CandidateSummary] = []
    class_mix: ClassMix | None = None  # the target's class mix, estimated without labels (`adapt.priors`)
    prior_corrected: bool = False  # the selected model predicts under class_mix (`adapt.priors.correct`)
    labelled: int = 0  # target images labelled for training that judged the candidates (`adapt.labelled`)
    labelled_trained: int = 0  # target images labelled for training that every candidate trained on


class RunSummary(Manifest):
    run_id: str
    run_uri: str
    finished_at: str
    status: Literal["trained", "no_shift"] = "trained"  # no_shift: stopped after the shift check
    config: Config
    config_hash: str
    datasets: dict[str, DatasetSummary]  # domain -> what was ingested
    extraction: ExtractionSummary
    shift: ShiftManifest | None = None  # the shift check against the champion; None without one
    promotion: PromotionManifest | None = None  # the registry's decision on this run's model
    model_uri: str = ""  # the selected model ("" when no model was trained)
    predictions_uri: str = ""
    metrics_uri: str = ""
    report_uri: str = ""
    metrics: ModelMetrics = ModelMetrics()  # the selected model's
    baseline: BaselineMetrics = BaselineMetrics()  # the source-only head's
    adaptation: AdaptationSummary = AdaptationSummary()
    timings: dict[str, float]  # stage -> wall seconds
    stages: dict[str, StageStats] = {}
