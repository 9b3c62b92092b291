"""The promotion gate after a retrain: register the selected model, then make it champion only if it beats
the champion re-scored on this run's data and selection is confident in it; with no champion yet, a pick
selection is not confident about gives way to the source-only reference (`promotion.allow_low_confidence`)."""

from __future__ import annotations

from adaptflow.config import Config
from adaptflow.manifests import (
    ExtractionPlan,
    IngestManifest,
    ModelScores,
    PromotionManifest,
    RunData,
    SelectionManifest,
)
from adaptflow.models import registry
from adaptflow.models.card import load_card
from adaptflow.monitor.champion import judged_by, score_model


# Nine parameters, on purpose: the registry records the run (store, run_id, every dataset, features, cfg)
# and the gate weighs what this run measured (selection, challenger, champion, source_test_accuracy).
def register_and_gate(
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
    """Register the run's selected model, then let the gate compare it with the champion re-scored on the
    same data (`champion`; None: the champion's stored metrics, or no champion at all), on the validators
    that neither optimised. A pick selection is not confident about never replaces a champion
    (`promotion.allow_low_confidence` lifts this); with no champion yet, the source-only reference is
    registered and promoted in its place."""
    lineage = registry.Lineage(
        dataset_snapshot=registry.dataset_snapshot({d: m.fingerprint for d, m in datasets.items()}),
        extractor_fingerprint=features.fingerprint,
        config_hash=cfg.fingerprint(),
        code_version=registry.code_version(),
        weights_sha256=features.weights_sha256,
    )
    policy, margin = cfg.promotion.policy, cfg.promotion.margin
    version = registry.register(
        store, challenger.model_uri, run_id, lineage, _metrics(challenger, source_test_accuracy), challenger.method
    )
    held = (
        None if selection.confident or cfg.promotion.allow_low_confidence else f"low confidence: {selection.confidence}"
    )
    changed = _class_change(store, challenger.model_uri)
    if changed and not cfg.promotion.allow_class_change:
        held = f"{changed}; set promotion.allow_class_change: true to let it replace the champion"
    rescored = ours = None
    if champion is not None:
        common = judged_by(policy, challenger.method, champion.method)
        rescored, ours = _metrics(champion, None, common), _metrics(challenger, source_test_accuracy, common)
    decision = registry.gate(store, version.version, rescored, margin, challenger_metrics=ours, hold=held)
    stand_in = None
    if held and decision.champion_version is None and selection.reference_model_uri:
        data = RunData(
            source=datasets["source"],
            target=datasets["target"],
            target_labels=datasets.get("target_labels"),
            features=features,
        )
        reference = score_model(selection.reference_model_uri, data, policy, cfg.seed, cfg.adapt.validation_samples)
        stand_in = registry.register(
            store, reference.model_uri, run_id, lineage, _metrics(reference, None), reference.method
        ).version
        registry.gate(store, stand_in, None, margin)  # no champion: promoted
    return PromotionManifest(
        version=version.version,
        promoted=decision.promoted,
        reason=decision.reason,
        champion_version=decision.champion_version,
        champion_after=registry.aliases(store).get(registry.CHAMPION),
        compared=decision.compared,
        stand_in_version=stand_in,
    )


def _class_change(store: str, model_uri: str) -> str | None:
    """How the classes of the model at `model_uri` differ from the champion's, in words; None when they are
    the same or there is no champion. A model that predicts other classes cannot be compared with the
    champion on one data set, and a class that disappeared from the source (a folder the process could not
    read, say) must not quietly leave production."""
    if registry.CHAMPION not in registry.aliases(store):
        return None
    champion = registry.resolve(store, registry.CHAMPION)
    before, after = load_card(champion.model_uri).classes, load_card(model_uri).classes
    if before == after:
        return None
    lost, new = sorted(set(before) - set(after)), sorted(set(after) - set(before))
    parts = [f"without {', '.join(lost)}" if lost else "", f"with {', '.join(new)}" if new else ""]
    return (
        f"classes changed: champion v{champion.version} predicts {len(before)} classes, this model {len(after)} "
        f"({'; '.join(p for p in parts if p) or 'in another order'})"
    )


def _metrics(
    s: ModelScores, source_test_accuracy: float | None, over: list[str] | None = None
) -> dict[str, float | None]:
    """Registry metrics; `over`: the selection score over these validators instead of the model's own."""
    score = s.selection_score if over is None else registry.selection_score(s.scores, over)
    return {
        "selection_score": score,
        "source_val_accuracy": s.scores["source_val_acc"],
        "target_accuracy": s.target_accuracy,
        "source_test_accuracy": source_test_accuracy,
    }
