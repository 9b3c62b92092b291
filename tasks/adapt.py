from prefect import task, unmapped

from adaptflow import progress
from adaptflow.adapt import candidates as adaptation
from adaptflow.adapt import halving, labelled, plan
from adaptflow.config import Config
from adaptflow.data.ingest import read_index
from adaptflow.extract.devices import resolve_device
from adaptflow.manifests import (
    CandidateManifest,
    CandidateSpec,
    ExtractionPlan,
    IngestManifest,
    ModelManifest,
    RunData,
    SelectionManifest,
)
from adaptflow.store import accounting
from adaptflow.store.layout import training_uri
from adaptflow.store.storage import join
from tasks._work import measured
from tasks.runners import gpu_placement, limited


@task(name="plan-candidates")
def plan_candidates(cfg: Config, source: IngestManifest) -> list[CandidateSpec]:
    """The adaptation candidates to train: methods x modes x hyperparameter draws x seeds, with budgets
    (end to end: sized to the source's training images unless adapt.image_steps is set)."""
    cuda = resolve_device(cfg.extract.device).type == "cuda"
    return plan.plan_candidates(cfg, cuda, plan.training_images(source))


@task(name="split-labels")
def split_labels(
    train_labels: IngestManifest, cfg: Config, out_uri: str
) -> tuple[IngestManifest | None, IngestManifest | None]:
    """(the target labels every candidate trains on, those that judge them in selection): `adapt.labels_trained`
    of each class's, chosen by content; no image in both."""
    return labelled.split_labels(train_labels, cfg.adapt.labels_trained, cfg.seed, out_uri)


@task(name="train-candidate", task_run_name="train-{spec.name}")
@measured
def train_candidate(
    spec: CandidateSpec,
    data: RunData,
    cfg: Config,
    candidates_uri: str,
    until: int | None = None,
    fit_labels: IngestManifest | None = None,
) -> CandidateManifest:
    """Train one adaptation candidate into `candidates_uri/<name>` up to step `until` (resuming from its
    checkpoint), on the labelled target images `fit_labels` too if given, and score it without target
    labels."""
    device = str(resolve_device(cfg.extract.device))
    out_uri = join(candidates_uri, spec.name)
    rung = f" to step {until} (a rung of successive halving)" if until is not None and until < spec.steps else ""
    with progress.task(f"train {spec.name}{rung}", unit="steps"):
        return adaptation.train_candidate(spec, data, cfg, out_uri, device, until, fit_labels)


@task(name="stop-candidate", task_run_name="stop-{candidate.spec.name}")
def stop_candidate(candidate: CandidateManifest, rung: int, candidates_uri: str) -> CandidateManifest:
    """Record that successive halving left a candidate behind."""
    return adaptation.stop_candidate(candidate, rung, join(candidates_uri, candidate.spec.name))


@task(name="select-model")
@measured
def select_model(
    head: ModelManifest,
    candidates: list[CandidateManifest],
    cfg: Config,
    source: IngestManifest | None = None,
    corrected_uri: str | None = None,
    train_labels: IngestManifest | None = None,
    features: ExtractionPlan | None = None,
) -> SelectionManifest:
    """Pick the model without target labels; never a collapsed one, never one against the target's class mix
    where it is known (estimated against the `source`'s training class shares). Where that estimate is
    credible and `adapt.prior_correction` is on, the pick predicts under it, written to `corrected_uri`.
    With target images labelled for training (`train_labels`, their rows in `features`), the candidates
    are scored on them too, and that evidence revises the pick (`adapt.labelled`)."""
    prior = adaptation.training_prior(source) if source is not None else None
    out = corrected_uri if cfg.adapt.prior_correction else None
    labelled = (read_index(train_labels), features) if train_labels is not None and features is not None else None
    return adaptation.select_model(
        head, candidates, cfg.adapt.policy, cfg.adapt.class_mix, cfg.seed, prior, out, labelled
    )


def train_candidates(
    specs: list[CandidateSpec],
    data: RunData,
    cfg: Config,
    store: str,
    fit_labels: IngestManifest | None = None,
    judge_labels: IngestManifest | None = None,
) -> list[CandidateManifest]:
    """Every candidate, each its own task (on a GPU worker when configured), images-mode ones in rungs of
    successive halving (`adapt.halving.successive_halving`, `adapt.halving`); call it from a flow. Returns
    the candidates in `specs` order, those left behind marked `stopped_at_rung`, each with the work of
    all its rungs; with `judge_labels`, a rung keeps first those its labelled target images do not rank
    below the best (`halving.survivors`). They train in `store`'s folder for everything their training reads
    (`adapt.plan.training_key`), so the same command after an interruption resumes them."""
    source, features = data.source, data.features
    key = plan.training_key(cfg, source, data.target, data.target_labels, features, fit_labels, judge_labels)
    candidates_uri = training_uri(store, key)
    (train,) = limited(cfg.runtime, train_candidate)
    works: dict[str, list[accounting.Work]] = {}

    def train_all(batch: list[CandidateSpec], untils: list[int | None]) -> list[CandidateManifest]:
        with gpu_placement(cfg.runtime):
            futures = train.map(
                batch,
                unmapped(data),
                unmapped(cfg),
                unmapped(candidates_uri),
                untils,
                unmapped(fit_labels),
            )
        results = futures.result()
        for c in results:
            works.setdefault(c.spec.name, []).append(c.work)
        return results

    prior = adaptation.training_prior(source)
    judged = read_index(judge_labels) if judge_labels is not None else None
    judge = (lambda rung: labelled.labelled_outcomes(rung, judged, features)) if judged is not None else None
    trained = halving.successive_halving(
        specs,
        train_all,
        lambda c, rung: stop_candidate(c, rung, candidates_uri),
        cfg.adapt.policy,
        plan.budget(cfg).halving,
        lambda rung: adaptation.class_mix(rung, cfg.adapt.class_mix, cfg.seed, prior),
        judge,
    )
    return [c.model_copy(update={"work": accounting.merge(works[c.spec.name])}) for c in trained]
