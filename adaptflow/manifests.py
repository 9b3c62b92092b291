"""The small typed records that travel between stages. Data stays in the store; these carry URIs,
counts and fingerprints. Each is frozen and JSON-serialisable, and each output folder's manifest is
written last, as its commit."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

from adaptflow.errors import IncompatibleStoreError
from adaptflow.store import storage
from adaptflow.store.accounting import Work

SCHEMA_VERSION = 1
# what every registered model version records, so the gate can always compare two of them
REQUIRED_METRICS = ("selection_score", "source_val_accuracy", "target_accuracy", "source_test_accuracy")


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    schema_version: int = SCHEMA_VERSION
    work: Work | None = None  # set by the task that produced it (tasks._work.measured)

    def commit(self, uri: str) -> None:
        """Write this manifest to `uri`; call it after every file it names is written."""
        storage.write_json(uri, self.model_dump(mode="json"))

    @classmethod
    def load(cls, uri: str):
        data = storage.read_json(uri)
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version != SCHEMA_VERSION:
            raise IncompatibleStoreError(
                f"{uri} has schema version {version}, this adaptflow reads version {SCHEMA_VERSION}; "
                "use a new store or the adaptflow release that wrote it"
            )
        return cls.model_validate(data)


class Record(BaseModel):
    """A part of a manifest (a section of the run summary): frozen, and no key it does not declare."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class IngestManifest(Manifest):
    """One ingested dataset: `index_uri` lists valid images, `rejects_uri` the refused files."""

    domain: str  # "source", "target" or "target_labels"
    dataset_uri: str
    index_uri: str
    rejects_uri: str
    n_images: int
    n_rejected: int
    classes: list[str]  # sorted; empty for unlabeled data
    fingerprint: str  # hash of the sorted (image_id, label, split) rows: the dataset snapshot
    seconds: float
    bytes_read: int = 0  # every file read while validating (not those whose checks were reused)
    bytes_written: int = 0  # index and rejects
    n_read: int = 0  # files read, hashed and decoded
    n_reused: int = 0  # files unchanged since an earlier ingest, whose checks were reused unopened


class IngestListing(Manifest):
    """The commit of a dataset's listing cache (`adaptflow.data.listing_cache`): names the table of what
    each file held when last read, and the settings its checks were made with."""

    settings: dict  # what the checks depend on: dataset URI, domain, check settings, decoder version
    listing_uri: str
    n_files: int


class ShardManifest(Manifest):
    shard_key: str
    data_uri: str
    fingerprint: str
    n_rows: int
    dim: int  # values per image: D features, or 3 * S * S pixels
    dtype: str
    seconds: float
    bytes_read: int = 0  # encoded images read
    bytes_written: int = 0
    replaces: list[str] = []  # keys of the shards this one merged (compaction)


class CompactionManifest(Manifest):
    features_uri: str  # the store folder compacted (features or the image cache)
    shards_before: int
    shards_after: int
    rows: int
    bytes_read: int
    bytes_written: int
    orphans_removed: int
    seconds: float


class ImageCache(Manifest):
    """Where the training images of one size live, and the transform that made them."""

    uri: str
    fingerprint: str
    size: int
    geometry: dict  # GEOMETRY_KEYS of the backbone's data_config at `size`


class ShardPlan(Manifest):
    """One extraction task's work: rows [offset, offset+length) of the plan file, and what to make of them."""

    features_uri: str
    plan_uri: str
    offset: int
    length: int
    shard_key: str
    features: bool = True  # embed the rows into features_uri
    cache: ImageCache | None = None  # decode the rows into this training-image cache


class Coverage(Record):
    """The key of a plan's coverage record (`adaptflow.extract.coverage`) and the folders it covers."""

    key: str
    folders: list[str]


class ExtractionPlan(Manifest):
    features_uri: str
    fingerprint: str
    dim: int
    weights_sha256: str | None = None  # the backbone's weights file; None: random, none, or a plan written before
    n_requested: int  # distinct images asked for
    n_cached: int  # of those, already embedded for this extractor
    shards: list[ShardPlan]
    seconds: float
    cache: ImageCache | None = None  # the training-image cache also filled, if any
    n_cached_pixels: int = 0  # images already in it
    coverage: Coverage | None = None  # recorded once its shards are committed (`features.record_coverage`)


class RunData(Manifest):
    """What a run's stages share once its images are embedded: the source and target datasets, the target
    labels that score it (reporting only: they never train or choose), and the features planned for them.
    Stages take it whole and read what they use."""

    source: IngestManifest
    target: IngestManifest
    target_labels: IngestManifest | None = None
    features: ExtractionPlan


class ShardResult(Manifest):
    """What one extraction task committed: a features shard, a cache shard, or both, of the same rows."""

    shard_key: str
    n_rows: int
    outputs: list[ShardManifest]
    seconds: float
    bytes_read: int = 0  # encoded images read (once, whatever the outputs)
    bytes_written: int = 0


class ModelManifest(Manifest):
    model_uri: str
    classes: list[str]
    fingerprint: str
    val_accuracy: float
    epochs: int
    seconds: float


class ClassMix(Manifest):
    """The target's class shares estimated without labels: `adapt.priors.Estimate`, per class, and whose model."""

    classes: list[str]
    source: list[float]
    estimate: list[float]
    low: list[float]
    high: list[float]
    method: str
    level: float
    n_target: int
    model: str = ""


class CandidateSpec(Manifest):
    name: str
    method: str
    mode: str  # "features" | "images"
    hparams: dict
    seed: int
    steps: int = 0  # the full budget in optimizer steps (0: the mode's default, for specs written before)
    image_size: int | None = None  # images mode: the input size
    strategy: str | None = None  # images mode: what of the backbone fine-tunes (None: written before, "full")


class CandidateManifest(Manifest):
    spec: CandidateSpec
    model_uri: str
    predictions_uri: str  # its predictions on the target validation sample
    outputs_uri: str | None = None  # source-validation predictions (`samples.save_outputs`); None: older runs
    # a small sample of the model's own features per domain, for the report; None: not at the end of its
    # budget (a rung of successive halving), where it is scored by the selection policy alone
    embedding_uri: str | None = None
    scores: dict[str, float]  # label-free validators, higher is better
    collapsed: bool
    source_test_accuracy: float  # on a sample of the source test split
    target_accuracy: float | None  # on the target validation sample; reporting only: needs target labels
    domain_gap: dict[str, float]  # proxy A-distance and MMD of the model's own features; {} before the end
    curve: list[dict]
    steps: int  # steps trained so far
    total_steps: int = 0  # its budget; steps < total_steps: stopped early (halving) or still to resume
    stopped_at_rung: int | None = None  # successive halving left it behind after this rung (0-based)
    labelled_trained: int = 0  # labelled target images it trained on (`adapt.labelled.with_labelled`)
    seconds: float  # training and scoring time, over every rung


class SelectionManifest(Manifest):
    index: int  # into the candidates; -1: the source-only head
    name: str
    reason: str
    policy: list[str]
    model_uri: str
    oracle_index: int | None  # best target accuracy, when target labels were given
    confident: bool = True  # see adapt.selection: False when the evidence against the pick is not nil
    confidence: str = ""  # why (not), in words
    reference_index: int | None = None  # the source-only candidate a cautious run falls back to
    reference_model_uri: str | None = None
    ranks: list[float | None] = []  # each candidate's mean percentile rank (1 best); None: not ranked
    class_mix: ClassMix | None = None  # the target's class mix as the source-only reference estimates it
    # log q(y) / p(y) per class: where the estimate was credible, model_uri and reference_model_uri are copies
    # of the candidates' models predicting under it (`adapt.candidates.prior_corrected`); None: as trained
    prior_correction: list[float] | None = None
    # with target images labelled for training (`adapt.labelled`): each candidate's accuracy on them (None:
    # stopped early), and how many there were; the selection's reason says whether they decided
    labelled_accuracy: list[float | None] | None = None
    n_labelled: int = 0


class PredictShard(Manifest):
    model_uri: str
    model_key: str  # a hash of the model's card and weights
    order_uri: str  # the images in the order they are predicted: position (in the index), uri, image_id
    rows: list[int]  # [start, stop) of the order's rows
    split: str | None  # only rows of this split (e.g. the source's "test"); None: all
    parts_uri: str
    key: str
    domain: str = ""  # the dataset's, for progress and logs


class PredictionPlan(Manifest):
    out_uri: str
    parts_uri: str
    shards: list[PredictShard]
    n_images: int
    order_uri: str | None = None  # None: no images


class PredictionPart(Manifest):
    key: str
    part_uri: str
    n_rows: int
    seconds: float
    reused: bool = False  # committed by an earlier attempt (a killed run) and not predicted again


class PredictionManifest(Manifest):
    predictions_uri: str
    n_predictions: int
    seconds: float
    parts: int = 1  # shards it was predicted in


class SplitScores(Record):
    """A model's headline scores on one labelled split (`evaluate.predict.evaluate`)."""

    accuracy: float  # NaN for an empty split
    macro_f1: float
    n: int


class EvaluationManifest(Manifest):
    metrics_uri: str
    source_test: SplitScores
    target: SplitScores | None  # when target labels were given
    seconds: float


class Lineage(BaseModel):
    """What a model was made from: enough to tell whether two models saw the same data and code."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    dataset_snapshot: str  # hash of the ingested image indexes (see `dataset_snapshot`)
    extractor_fingerprint: str
    config_hash: str
    code_version: str  # see `code_version()`
    weights_sha256: str | None = None  # the backbone's weights file (None: random or none, or registered before)


class ModelVersion(Manifest):
    """One registered model. Immutable: aliases point at versions, versions never change."""

    version: int
    model_uri: str
    run_id: str
    created_at: str
    lineage: Lineage
    metrics: dict[str, float | None]  # REQUIRED_METRICS at least; target_accuracy is None without labels
    method: str

    @field_validator("metrics")
    @classmethod
    def _has_required_metrics(cls, metrics: dict[str, float | None]) -> dict[str, float | None]:
        missing = [k for k in REQUIRED_METRICS if k not in metrics]
        if missing:
            raise ValueError(f"metrics lack {', '.join(missing)} (required: {', '.join(REQUIRED_METRICS)})")
        return metrics


class ExportManifest(Manifest):
    """One exported model file, recorded in `{store}/registry/exports/` when it came from the registry."""

    format: str  # onnx | torchscript
    uri: str  # the model file
    metadata_uri: str  # the JSON beside it: `uri` + ".json"
    bytes: int
    sha256: str
    model_uri: str  # the adaptflow model it was made from
    version: int | None  # its registry version, if it came from the registry
    kind: str
    method: str
    classes: list[str]
    input_size: int
    max_abs_diff: float  # probabilities, exported file vs adaptflow model, on the check batches
    checked_batch_sizes: list[int]
    exported_at: str
    code_version: str
    seconds: float


class Champion(Manifest):
    """The registry's champion and the target images it was trained with (the shift reference)."""

    version: int
    model_uri: str
    run_id: str
    selection_score: float | None  # as registered
    reference_index_uri: str | None  # its run's target index; None if that run's summary is gone
    reference_fingerprint: str | None = None  # that index's ingest fingerprint (its images), when known
    labels_fingerprint: str | None = None  # the target labels its run used for training, if any

    @property
    def reference_keys(self) -> list[str]:
        """What identifies the reference images (`extract.coverage`): the fingerprint (a quiet night's
        target has the same), else the index's URI (no run rewrites an index); none when they are gone."""
        if self.reference_index_uri is None:
            return []
        return [self.reference_fingerprint or self.reference_index_uri]


class ModelScores(Manifest):
    """One model's validator scores on one run's data (source validation + target batch)."""

    model_uri: str
    method: str = "head"  # the model card's: what it optimised decides which validators may judge it
    scores: dict[str, float]
    selection_score: float | None  # the policy's validators that may judge it, averaged (`judged_by`)
    target_accuracy: float | None  # with target labels (reporting and the gate only)
    collapsed: bool
    n_target: int
    predicted_mix: list[float] = []  # its predicted class shares on the target sample of n_scored images
    n_scored: int = 0
    class_mix: ClassMix | None = None  # the target's class mix as this model's outputs estimate it
    reused: float | None = None  # kept from an earlier run that measured this share of the target sample


class ShiftTest(Manifest):
    """The outcome of `mmd_permutation_test`; `detected` is `p_value < alpha`."""

    statistic: float  # unbiased MMD², may be slightly negative when the samples agree
    p_value: float  # in [1 / (1 + n_permutations), 1]
    n_reference: int  # rows used after subsampling
    n_batch: int
    n_permutations: int
    detected: bool
    alpha: float


class ClassMixChange(Record):
    """The champion's predicted class mix before and on the new batch (`monitor.shift.class_mix_test`)."""

    before: list[float]  # predicted class shares on the champion's reference images
    after: list[float]  # on the new batch
    sizes: tuple[int, int]  # images behind `before` and `after`
    total_variation: float
    p_value: float
    detected: bool  # p < alpha and total variation >= monitor.min_mix_change


class ShiftManifest(Manifest):
    champion_version: int
    test: ShiftTest | None  # None when the champion's reference images are gone
    domain_auc: float | None
    champion: ModelScores | None  # None when the champion cannot read this run's data (other classes)
    score_drop: float | None  # registered selection score minus today's; positive = worse
    shift_detected: bool
    degraded: bool
    retrain: bool
    reason: str
    class_mix: ClassMixChange | None = None  # None: not tested (no reference images, or no champion scores)
    n_new: int | None = None  # target images the champion's run did not see (tested first); None: not counted


class PromotionManifest(Manifest):
    """The selected model registered as `version`, and what the gate decided for it. A low-confidence pick
    with no champion to keep leaves the champion to the source-only `stand_in_version`."""

    version: int
    promoted: bool
    reason: str
    champion_version: int | None  # before the decision
    champion_after: int | None
    compared: dict
    stand_in_version: int | None = None


class ReportManifest(Manifest):
    report_uri: str


class TrackingManifest(Manifest):
    status: Literal["logged", "off"]
    tracking_uri: str | None = None  # without credentials
    experiment: str | None = None
    run_id: str | None = None  # the MLflow run
    model_name: str | None = None
    model_version: str | None = None  # this run's model in MLflow's registry
    aliases: dict[str, str] = {}  # MLflow's aliases after mirroring: alias -> MLflow version


class LabelRequest(Manifest):
    """Target images a run asks a person to label (`label.suggest`): the ask file and its contact sheet,
    each image's uri by id, and the classes a label may name."""

    ask_uri: str
    sheet_uri: str
    images: dict[str, str]  # image id (content hash) -> uri
    classes: list[str]
