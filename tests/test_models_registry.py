"""The model registry: versions, the promotion gate, aliases, rollback, on a folder and on memory://."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from adaptflow.errors import ConfigError, StoreError, UnknownNameError
from adaptflow.models import registry
from adaptflow.store import storage

LINEAGE = registry.Lineage(
    dataset_snapshot="d" * 16, extractor_fingerprint="f" * 16, config_hash="c" * 16, code_version="0.1.0"
)


def _metrics(score: float, target: float | None = None) -> dict:
    return {
        "selection_score": score,
        "source_val_accuracy": 0.9,
        "target_accuracy": target,
        "source_test_accuracy": 0.88,
    }


def _register(store: str, score: float, target: float | None = None, run_id: str = "run") -> registry.ModelVersion:
    return registry.register(
        store, storage.join(store, "models", run_id), run_id, LINEAGE, _metrics(score, target), "dann"
    )


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path, memory_uri):
    return str(tmp_path / "store") if request.param == "local" else memory_uri


def test_first_model_is_champion_worse_stays_challenger_better_by_margin_wins(store):
    v1 = _register(store, 0.43, run_id="r1")
    assert v1.version == 1 and storage.exists(storage.join(store, "registry", "versions", "000001.json"))
    first = registry.gate(store, 1, None, margin=0.01)
    assert first.promoted and first.reason == "no champion yet" and first.champion_version is None

    _register(store, 0.412, run_id="r2")
    worse = registry.gate(store, 2, None, margin=0.01)
    assert not worse.promoted and worse.champion_version == 1
    assert "selection score 0.412 < champion 0.43 + margin 0.01" in worse.reason
    assert registry.aliases(store) == {"champion": 1, "challenger": 2}

    _register(store, 0.45, run_id="r3")
    better = registry.gate(store, 3, None, margin=0.01)
    assert better.promoted and better.compared["metric"] == "selection_score"
    assert registry.aliases(store) == {"champion": 3, "challenger": 2}
    assert registry.resolve(store, "champion").run_id == "r3"
    assert (
        registry.resolve(store, "v2").version
        == registry.resolve(store, 2).version
        == registry.resolve(store, "2").version
        == 2
    )
    assert [e.action for e in registry.events(store)] == ["promoted", "rejected", "promoted"]
    assert [v.version for v in registry.list_versions(store)] == [1, 2, 3]


def test_gate_uses_the_champion_metrics_it_is_given(store):
    _register(store, 0.40)
    registry.gate(store, 1, None, margin=0.0)
    _register(store, 0.45)
    # Stored champion score 0.40 would lose; re-scored on this run's data the champion is at 0.50.
    decision = registry.gate(store, 2, _metrics(0.50), margin=0.0)
    assert not decision.promoted and "champion 0.5 " in decision.reason
    assert decision.compared["champion_metrics"] == "rescored"


def test_margin_is_met_exactly_at_the_boundary():
    assert registry.decide(_metrics(0.44), _metrics(0.43), margin=0.01) == (
        True,
        "selection score 0.44 >= champion 0.43 + margin 0.01 (no target accuracy for both)",
    )
    promoted, reason = registry.decide(_metrics(0.4399), _metrics(0.43), margin=0.01)
    assert not promoted and "0.4399 < champion 0.43 + margin 0.01" in reason
    with pytest.raises(ConfigError, match="margin must be >= 0"):
        registry.decide(_metrics(0.5), _metrics(0.4), margin=-0.1)


def test_target_accuracy_decides_when_both_have_labels():
    # Better on selection score, worse on target labels: the labels win.
    promoted, reason = registry.decide(_metrics(0.9, target=0.70), _metrics(0.4, target=0.75), margin=0.01)
    assert not promoted and reason == "target accuracy 0.7 < champion 0.75 + margin 0.01"
    promoted, reason = registry.decide(_metrics(0.1, target=0.80), _metrics(0.4, target=0.75), margin=0.01)
    assert promoted and reason.startswith("target accuracy 0.8 >= champion 0.75")
    # Labels on one side only: the selection score decides.
    promoted, reason = registry.decide(_metrics(0.5, target=0.80), _metrics(0.4), margin=0.01)
    assert promoted and reason.startswith("selection score")
    assert registry.decide(_metrics(0.5), None, margin=0.01) == (True, "no champion yet")


def test_rollback_restores_the_previous_champion_and_records_it(store):
    for score in (0.4, 0.5):
        registry.gate(store, _register(store, score).version, None, margin=0.0)
    assert registry.aliases(store)["champion"] == 2
    event = registry.rollback(store)
    assert (event.champion_before, event.champion_after, event.action) == (2, 1, "rolled_back")
    assert registry.resolve(store, "champion").version == 1
    assert registry.events(store)[-1] == event
    with pytest.raises(StoreError, match="nothing to roll back to .*v1 is the only champion"):
        registry.rollback(store)


def test_rollback_without_history_and_empty_registry_errors_are_clear(store):
    with pytest.raises(StoreError, match="nothing to roll back to .*there is no champion"):
        registry.rollback(store)
    with pytest.raises(StoreError, match="no models registered in"):
        registry.resolve(store, "champion")
    _register(store, 0.4)
    with pytest.raises(StoreError, match="no champion in .* yet; registered versions: v1"):
        registry.resolve(store, "champion")
    with pytest.raises(StoreError, match="no model version 7 .*; versions: v1"):
        registry.resolve(store, "v7")


def test_manual_promotion_moves_champion_and_clears_its_challenger_alias(store):
    for score in (0.5, 0.4):
        registry.gate(store, _register(store, score).version, None, margin=0.0)
    assert registry.aliases(store) == {"champion": 1, "challenger": 2}
    decision = registry.promote(store, 2, reason="ops override")
    assert decision.promoted and decision.champion_version == 1 and decision.margin is None
    assert registry.aliases(store) == {"champion": 2}
    assert registry.events(store)[-1].reason == "ops override"
    assert registry.rollback(store).champion_after == 1


def test_concurrent_registrations_get_distinct_versions(store):
    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(lambda i: _register(store, 0.1 * i, run_id=f"r{i}").version, range(16)))
    assert sorted(versions) == list(range(1, 17))
    assert storage.list_uris(storage.join(store, "registry", "versions"), ".tmp") == []
    assert sorted(v.run_id for v in registry.list_versions(store)) == sorted(f"r{i}" for i in range(16))


def test_unknown_alias_lists_the_valid_ones(store):
    with pytest.raises(UnknownNameError, match="unknown alias name 'best'; valid alias names: challenger, champion"):
        registry.resolve(store, "best")


def test_versions_are_validated_and_lineage_records_code_version(store):
    with pytest.raises(StoreError, match="metrics lack target_accuracy"):
        registry.register(
            store,
            "m",
            "r",
            LINEAGE,
            {"selection_score": 0.1, "source_val_accuracy": 0.1, "source_test_accuracy": 0.1},
            "dann",
        )
    assert registry.code_version().startswith("0.1.0")
    assert registry.is_ref("champion") and registry.is_ref("v3") and registry.is_ref("12")
    assert not registry.is_ref("models/v3") and not registry.is_ref("/tmp/x")


def test_a_held_version_is_not_promoted_whatever_its_numbers(store):
    _register(store, 0.40)
    held = registry.gate(store, 1, None, margin=0.0, hold="low confidence: because")
    assert (
        not held.promoted and held.reason == "low confidence: because" and registry.aliases(store) == {"challenger": 1}
    )
    _register(store, 0.30)
    assert registry.gate(store, 2, None, margin=0.0).promoted  # the first unheld one becomes champion
    _register(store, 0.10)
    # the comparison may use metrics other than the registered ones (e.g. on validators both may be judged by)
    decision = registry.gate(store, 3, _metrics(0.30), margin=0.0, challenger_metrics=_metrics(0.5))
    assert decision.promoted and decision.compared["challenger"] == 0.5


@pytest.mark.parametrize("content", [[1, 2], {"champion": "abc"}, {"aliases": {"champion": "abc"}}, {"aliases": [1]}])
def test_an_aliases_file_of_the_wrong_shape_is_a_store_error_that_says_what_to_do(store, content):
    storage.write_json(storage.join(store, "registry", "aliases.json"), content)
    with pytest.raises(StoreError, match="is not a registry's aliases file .* remove it to start the aliases afresh"):
        registry.aliases(store)
