from prefect import get_run_logger, task
from prefect.events import emit_event

from adaptflow.config import Config
from adaptflow.errors import StoreError, StoreUnavailableError
from adaptflow.manifests import (
    Champion,
    ExtractionPlan,
    IngestManifest,
    ModelScores,
    PromotionManifest,
    RunData,
    SelectionManifest,
    ShiftManifest,
)
from adaptflow.monitor import champion as scoring
from adaptflow.monitor import gate
from adaptflow.monitor import shift as shift_test
from tasks._retry import IO_TASK
from tasks._work import measured


@task(name="find-champion", **IO_TASK)
def find_champion(store: str) -> Champion | None:
    """The registry's champion and the target images it was trained with, if there is one."""
    return scoring.find_champion(store)


@task(name="score-model")
@measured
def score_model(model_uri: str, data: RunData, cfg: Config, store: str | None = None) -> ModelScores:
    """A saved model's label-free scores (and target accuracy, for reporting) on this run's data; with
    `store`, kept by its monitor for the runs after, should the model become champion."""
    p, seed, n = cfg.promotion.policy, cfg.seed, cfg.adapt.validation_samples
    return scoring.score_model(model_uri, data, p, seed, n, keep_in=store)


@task(name="score-champion")
@measured
def score_champion(
    store: str, champion: Champion, data: RunData, cfg: Config, exact: bool = False
) -> ModelScores | None:
    """The champion's scores on this run's data (kept from an earlier run while its samples barely moved;
    `exact`: only if they were measured on this very sample); None when it cannot read it (other classes or
    features)."""
    try:
        p, seed, n, reuse = cfg.promotion.policy, cfg.seed, cfg.adapt.validation_samples, cfg.monitor.rescore_after
        return scoring.score_champion(store, champion, data, p, seed, n, reuse=1.0 if exact else 1 - reuse)
    except StoreUnavailableError:
        raise  # the store is away, not the champion unfit: fail (and retry) rather than retrain without it
    except StoreError as e:
        get_run_logger().warning("champion v%s cannot be scored on this run's data: %s", champion.version, e)
        return None


@task(name="check-shift")
@measured
def check_shift(
    store: str,
    champion: Champion,
    target: IngestManifest,
    features: ExtractionPlan,
    scores: ModelScores | None,
    cfg: Config,
    train_labels: IngestManifest | None = None,
) -> ShiftManifest:
    """Has the target moved away from the champion's data (its images or its class mix), or the champion got
    worse on it, or are there new target labels for training?"""
    before = None
    if scores is not None and cfg.monitor.class_mix:
        before = scoring.reference_mix(champion, features, cfg.seed, cfg.adapt.validation_samples, store)
    shift = shift_test.check_shift(
        champion, target, features, scores, cfg.monitor, cfg.seed, before, store, train_labels
    )
    payload = {
        "reason": shift.reason,
        "champion_version": shift.champion_version,
        "p_value": shift.test.p_value if shift.test else None,
        "statistic": shift.test.statistic if shift.test else None,
        "domain_auc": shift.domain_auc,
        "class_mix_p_value": shift.class_mix.p_value if shift.class_mix else None,
        "class_mix_change": shift.class_mix.total_variation if shift.class_mix else None,
    }
    if shift.shift_detected:
        _emit("adaptflow.shift.detected", store, payload)
    if shift.degraded:
        _emit("adaptflow.run.degraded", store, {**payload, "score_drop": shift.score_drop})
    return shift


@task(name="promote-if-better")  # not retried: a retry would register the model twice
@measured
def promote_if_better(
    store: str,
    run_id: str,
    selection: SelectionManifest,
    datasets: dict[str, IngestManifest],
    features: ExtractionPlan,
    cfg: Config,
    challenger: ModelScores,
    champion: ModelScores | None,
    source_test_accuracy: float | None,
) -> PromotionManifest:
    """Register the selected model; the gate makes it champion only if it beats the champion on this data
    and selection is confident in it (with no champion yet, the source-only reference stands in)."""
    decision = gate.register_and_gate(
        store, run_id, selection, datasets, features, cfg, challenger, champion, source_test_accuracy
    )
    _emit(
        "adaptflow.model.promoted" if decision.promoted else "adaptflow.model.rejected",
        store,
        {
            "version": decision.version,
            "reason": decision.reason,
            "champion_before": decision.champion_version,
            "champion_after": decision.champion_after,
            "run_id": run_id,
        },
    )
    if decision.stand_in_version is not None:
        _emit(
            "adaptflow.model.promoted",
            store,
            {
                "version": decision.stand_in_version,
                "reason": "source-only stand-in for a low-confidence pick",
                "champion_before": None,
                "champion_after": decision.champion_after,
                "run_id": run_id,
            },
        )
    return decision


def _emit(event: str, store: str, payload: dict) -> None:
    """An event automations can match on; the resource is the store (its URI names no secret)."""
    emit_event(
        event=event,
        resource={"prefect.resource.id": f"adaptflow.store.{store}", "prefect.resource.name": store},
        payload=payload,
    )
