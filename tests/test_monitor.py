"""adaptflow.monitor.champion on real features: the shift check's verdicts and the scores it compares."""

import pyarrow as pa
import pytest

from adaptflow.config import MonitorConfig
from adaptflow.data.ingest import ingest
from adaptflow.manifests import Champion, ModelScores, RunData
from adaptflow.monitor.champion import judged_by, score_model
from adaptflow.monitor.gate import register_and_gate
from adaptflow.monitor.shift import check_shift
from adaptflow.store import storage


@pytest.fixture(scope="module")
def store(headed_store):
    return headed_store[1:]


def _data(source, target, target_labels, features) -> RunData:
    return RunData(source=source, target=target, target_labels=target_labels, features=features)


def _champion(reference: str | None, score: float | None = 0.5) -> Champion:
    return Champion(version=1, model_uri="unused", run_id="r0", selection_score=score, reference_index_uri=reference)


def _scores(selection: float, collapsed: bool = False) -> ModelScores:
    return ModelScores(
        model_uri="m", scores={}, selection_score=selection, target_accuracy=None, collapsed=collapsed, n_target=100
    )


def _first_half(index_uri: str, out_uri: str) -> str:
    """An index of the first half of `index_uri`'s images: the target a champion was trained with, before
    the other half arrived."""
    table = storage.read_table(index_uri)
    storage.write_table(out_uri, table.slice(0, len(table) // 2))
    return out_uri


def test_new_images_like_the_old_are_no_shift_and_another_domain_is(store, tmp_path):
    """The champion saw half the target; the other half arrived since, from the same domain: tested alone
    against the champion's half, no shift. A night with no new image tests nothing."""
    src, tgt, plan, _ = store
    cfg = MonitorConfig()
    half = _first_half(tgt.index_uri, str(tmp_path / "half.parquet"))
    same = check_shift(_champion(half), tgt, plan, _scores(0.5), cfg)
    assert not same.shift_detected and not same.retrain and same.reason.startswith("no shift")
    assert same.test.p_value >= cfg.alpha and same.score_drop == 0
    assert same.n_new == same.test.n_batch == n_images(tgt) - n_images(half)  # the new half, and only it
    nothing_new = check_shift(_champion(tgt.index_uri), tgt, plan, _scores(0.5), cfg)
    assert nothing_new.test is None and nothing_new.n_new == 0 and not nothing_new.retrain
    assert "no new target images since the champion's run r0" in nothing_new.reason
    # labels for training the champion's run did not have are a reason to retrain; the same ones are not
    labels = tgt.model_copy(update={"domain": "target_train_labels", "fingerprint": "L1", "n_images": 12})
    labelled = check_shift(_champion(tgt.index_uri), tgt, plan, _scores(0.5), cfg, labels=labels)
    assert (
        labelled.retrain
        and labelled.reason.startswith("no shift, new labels")
        and "12 target labels" in labelled.reason
    )
    seen = _champion(tgt.index_uri).model_copy(update={"labels_fingerprint": "L1"})
    assert not check_shift(seen, tgt, plan, _scores(0.5), cfg, labels=labels).retrain
    moved = check_shift(_champion(src.index_uri), tgt, plan, _scores(0.5), cfg)
    assert moved.shift_detected and moved.retrain and moved.test.p_value < 0.01 and moved.domain_auc > 0.9
    bounded = check_shift(_champion(src.index_uri), tgt, plan, _scores(0.5), MonitorConfig(max_samples=20))
    assert bounded.test.n_batch == bounded.test.n_reference == 20 and bounded.n_new == n_images(tgt)


def n_images(index) -> int:
    uri = index if isinstance(index, str) else index.index_uri
    return storage.read_table(uri, columns=["image_id"]).num_rows


def test_a_shift_of_a_few_new_images_is_not_diluted_by_the_old_ones(store, tmp_path):
    """The champion saw the whole target; tonight, images of another domain arrive (the source's, here):
    they are tested alone, so the shift shows however many old images there are."""
    src, tgt, plan, _ = store
    both = storage.join(str(tmp_path), "both.parquet")
    storage.write_table(both, pa.concat_tables([storage.read_table(tgt.index_uri), storage.read_table(src.index_uri)]))
    grown = tgt.model_copy(update={"index_uri": both})
    shifted = check_shift(_champion(tgt.index_uri), grown, plan, _scores(0.5), MonitorConfig())
    assert shifted.shift_detected and shifted.n_new == n_images(src) and shifted.test.n_batch == min(500, n_images(src))


def test_a_class_mix_change_on_the_same_looking_images_is_a_shift(store):
    """The same images (no MMD shift), but the champion now predicts one class for most of the batch: a
    new site that sees mostly one class. The class-mix test sends the run on to retraining."""
    from adaptflow.data.ingest import read_index
    from adaptflow.monitor.champion import reference_mix

    src, tgt, plan, head = store
    champion = Champion(
        version=1, model_uri=head.model_uri, run_id="r0", selection_score=0.5, reference_index_uri=tgt.index_uri
    )
    before = reference_mix(champion, plan)
    assert before is not None and len(before[0]) == len(src.classes) and before[1] == len(read_index(tgt))
    cfg = MonitorConfig()
    now = _scores(0.5).model_copy(update={"predicted_mix": before[0], "n_scored": before[1]})
    same = check_shift(champion, tgt, plan, now, cfg, reference_mix=before)
    assert not same.retrain and same.class_mix.p_value > 0.5 and not same.class_mix.detected
    skewed = [0.7] + [0.3 / (len(src.classes) - 1)] * (len(src.classes) - 1)
    moved = check_shift(
        champion, tgt, plan, now.model_copy(update={"predicted_mix": skewed}), cfg, reference_mix=before
    )
    assert moved.shift_detected and moved.retrain and moved.class_mix.detected and moved.test is None  # no new image
    assert "predicted class mix moved by" in moved.reason
    off = check_shift(
        champion,
        tgt,
        plan,
        now.model_copy(update={"predicted_mix": skewed}),
        MonitorConfig(class_mix=False),
        reference_mix=before,
    )
    assert not off.retrain and off.class_mix is None


def test_a_degraded_champion_retrains_without_a_shift(store):
    _, tgt, plan, _ = store
    cfg = MonitorConfig(score_drop=0.05)
    dropped = check_shift(_champion(tgt.index_uri, score=0.6), tgt, plan, _scores(0.5), cfg)
    assert not dropped.shift_detected and dropped.degraded and dropped.retrain
    assert dropped.reason.startswith("champion degraded") and "drop +0.100, limit 0.05" in dropped.reason
    collapsed = check_shift(_champion(tgt.index_uri), tgt, plan, _scores(0.5, collapsed=True), cfg)
    assert collapsed.retrain and "collapsed" in collapsed.reason
    unscorable = check_shift(_champion(tgt.index_uri), tgt, plan, None, cfg)
    assert unscorable.retrain and "cannot score this data" in unscorable.reason


def test_without_reference_images_the_run_retrains_and_says_why(store):
    _, tgt, plan, _ = store
    gone = check_shift(_champion(None), tgt, plan, _scores(0.5), MonitorConfig())
    assert gone.test is None and gone.retrain and "reference images (run r0) are gone" in gone.reason


def test_score_model_measures_a_saved_model_on_this_runs_data(store, demo_data):
    src, tgt, plan, head = store
    from adaptflow.config import IngestConfig

    labels = ingest(
        demo_data.target_labels_uri,
        "target_labels",
        "memory://monitor/labels",
        IngestConfig(workers=2),
        classes=src.classes,
    )
    scores = score_model(head.model_uri, _data(src, tgt, labels, plan), ["source_val_acc", "im", "bnm"])
    assert set(scores.scores) >= {"source_val_acc", "im", "bnm"} and scores.n_target == tgt.n_images
    assert scores.selection_score == pytest.approx(sum(scores.scores[k] for k in ("source_val_acc", "im", "bnm")) / 3)
    assert 0 <= scores.target_accuracy <= 1
    again = score_model(head.model_uri, _data(src, tgt, None, plan), ["source_val_acc", "im", "bnm"])
    assert again.target_accuracy is None and again.selection_score == scores.selection_score  # deterministic
    only = score_model(head.model_uri, _data(src, tgt, None, plan), ["bnm"])  # the policy decides what is scored
    assert set(only.scores) == {"source_val_acc", "bnm"} and only.selection_score == pytest.approx(scores.scores["bnm"])


def test_a_low_confidence_pick_never_replaces_a_champion_and_a_source_only_one_stands_in(store, fast_config, tmp_path):
    from adaptflow.manifests import SelectionManifest
    from adaptflow.models import registry

    src, tgt, plan, head = store
    reg, policy, datasets = str(tmp_path / "registry"), fast_config.promotion.policy, {"source": src, "target": tgt}
    scores = score_model(head.model_uri, _data(src, tgt, None, plan), policy)  # the pick's scores (any model's)
    better = scores.model_copy(update={"scores": {k: v + 0.5 for k, v in scores.scores.items()}})
    unsure = SelectionManifest(
        index=1,
        name="dann-images",
        reason="best mean rank",
        policy=policy,
        model_uri=head.model_uri,
        oracle_index=None,
        confident=False,
        confidence="source-only source_only-images scores higher on im",
        reference_index=0,
        reference_model_uri=head.model_uri,
    )

    # No champion yet: the pick waits as challenger, the source-only reference is registered and promoted.
    first = register_and_gate(reg, "r1", unsure, datasets, plan, fast_config, scores, None, 0.9)
    assert not first.promoted and first.reason == "low confidence: source-only source_only-images scores higher on im"
    assert (first.version, first.stand_in_version, first.champion_after) == (1, 2, 2)
    assert registry.aliases(reg) == {"champion": 2, "challenger": 1}
    # A champion is never replaced by a low-confidence pick, however good its numbers.
    second = register_and_gate(reg, "r2", unsure, datasets, plan, fast_config, better, scores, 0.9)
    assert not second.promoted and second.stand_in_version is None and registry.aliases(reg)["champion"] == 2
    # Unless the user opts in; and a confident pick goes through the gate as ever.
    opted = fast_config.model_copy(
        update={"promotion": fast_config.promotion.model_copy(update={"allow_low_confidence": True})}
    )
    third = register_and_gate(reg, "r3", unsure, datasets, plan, opted, better, scores, 0.9)
    assert third.promoted and third.compared["metric"] == "selection_score"
    sure = unsure.model_copy(update={"confident": True})
    fourth = register_and_gate(reg, "r4", sure, datasets, plan, fast_config, scores, better, 0.9)
    assert not fourth.promoted and fourth.reason.startswith("selection score")


def test_a_champion_is_never_replaced_by_a_model_of_other_classes(store, fast_config, tmp_path):
    """A class folder that could not be read, a class renamed: a model that predicts other classes than the
    champion's stays challenger whatever its numbers, unless the user says so."""
    from adaptflow.manifests import SelectionManifest
    from adaptflow.models import registry
    from adaptflow.store import storage

    src, tgt, plan, head = store
    reg, policy, datasets = str(tmp_path / "registry"), fast_config.promotion.policy, {"source": src, "target": tgt}
    scores = score_model(head.model_uri, _data(src, tgt, None, plan), policy)
    sure = SelectionManifest(
        index=0, name="head", reason="r", policy=policy, model_uri=head.model_uri, oracle_index=None, confident=True
    )
    first = register_and_gate(reg, "r1", sure, datasets, plan, fast_config, scores, None, 0.9)
    assert first.promoted and first.champion_after == 1  # the full class set is champion
    fewer = str(tmp_path / "fewer")  # the same model, its card naming one class less (a folder went missing)
    for name in ("weights.safetensors", "model.json"):
        storage.write_bytes(f"{fewer}/{name}", storage.read_bytes(f"{head.model_uri}/{name}"))
    card = storage.read_json(f"{fewer}/model.json")
    storage.write_json(f"{fewer}/model.json", {**card, "classes": card["classes"][:-1]})
    better = scores.model_copy(
        update={
            "model_uri": fewer,
            "scores": {k: v + 0.5 for k, v in scores.scores.items()},
            "selection_score": scores.selection_score + 0.5,
        }
    )
    pick = sure.model_copy(update={"model_uri": fewer})
    second = register_and_gate(reg, "r2", pick, datasets, plan, fast_config, better, None, 0.9)
    lost = card["classes"][-1]
    assert not second.promoted and registry.aliases(reg) == {"champion": 1, "challenger": 2}
    assert second.reason.startswith(f"classes changed: champion v1 predicts {len(card['classes'])} classes, this model")
    assert f"(without {lost})" in second.reason and "promotion.allow_class_change: true" in second.reason
    opted = fast_config.model_copy(
        update={"promotion": fast_config.promotion.model_copy(update={"allow_class_change": True})}
    )
    third = register_and_gate(reg, "r3", pick, datasets, plan, opted, better, None, 0.9)
    assert third.promoted and registry.aliases(reg)["champion"] == 3


def test_the_gate_judges_neither_model_by_what_it_optimised():
    assert judged_by(["source_val_acc", "im", "bnm"], "dann", "head") == ["source_val_acc", "im", "bnm"]
    assert judged_by(["source_val_acc", "im", "bnm"], "dann", "im") == ["source_val_acc"]
    assert judged_by(["source_val_acc", "bnm"], "mcc") == ["source_val_acc"]
