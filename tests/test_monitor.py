"""adaptflow.monitor on real features: the shift check's verdicts and the scores it compares."""

import pytest

from adaptflow import features, monitor
from adaptflow.config import MonitorConfig
from adaptflow.ingest import ingest
from adaptflow.monitor import Champion, ModelScores
from adaptflow.pipeline import fit_head


@pytest.fixture(scope="module")
def store(demo_data, fast_config, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("monitor"))
    src = ingest(demo_data.source_uri, "source", f"{root}/ingest/source", fast_config.ingest)
    tgt = ingest(demo_data.target_uri, "target", f"{root}/ingest/target", fast_config.ingest)
    plan = features.plan_extraction([src.index_uri, tgt.index_uri], root, fast_config.backbone, 10_000)
    for shard in plan.shards:
        features.extract_shard(shard, fast_config.backbone, fast_config.extract)
    head = fit_head(src, plan, fast_config, f"{root}/models/head")
    return src, tgt, plan, head


def _champion(reference: str | None, score: float | None = 0.5) -> Champion:
    return Champion(version=1, model_uri="unused", run_id="r0", selection_score=score, reference_index_uri=reference)


def _scores(selection: float, collapsed: bool = False) -> ModelScores:
    return ModelScores(model_uri="m", scores={}, selection_score=selection, target_accuracy=None,
                       collapsed=collapsed, n_target=100)


def test_the_same_images_are_no_shift_and_another_domain_is(store):
    src, tgt, plan, _ = store
    cfg = MonitorConfig()
    same = monitor.check_shift(_champion(tgt.index_uri), tgt, plan, _scores(0.5), cfg)
    assert not same.shift_detected and not same.retrain and same.reason.startswith("no shift")
    assert same.test.p_value >= cfg.alpha and same.score_drop == 0
    moved = monitor.check_shift(_champion(src.index_uri), tgt, plan, _scores(0.5), cfg)
    assert moved.shift_detected and moved.retrain and moved.test.p_value < 0.01 and moved.domain_auc > 0.9


def test_a_degraded_champion_retrains_without_a_shift(store):
    _, tgt, plan, _ = store
    cfg = MonitorConfig(score_drop=0.05)
    dropped = monitor.check_shift(_champion(tgt.index_uri, score=0.6), tgt, plan, _scores(0.5), cfg)
    assert not dropped.shift_detected and dropped.degraded and dropped.retrain
    assert dropped.reason.startswith("champion degraded") and "drop +0.100, limit 0.05" in dropped.reason
    collapsed = monitor.check_shift(_champion(tgt.index_uri), tgt, plan, _scores(0.5, collapsed=True), cfg)
    assert collapsed.retrain and "collapsed" in collapsed.reason
    unscorable = monitor.check_shift(_champion(tgt.index_uri), tgt, plan, None, cfg)
    assert unscorable.retrain and "cannot score this data" in unscorable.reason


def test_without_reference_images_the_run_retrains_and_says_why(store):
    _, tgt, plan, _ = store
    gone = monitor.check_shift(_champion(None), tgt, plan, _scores(0.5), MonitorConfig())
    assert gone.test is None and gone.retrain and "reference images (run r0) are gone" in gone.reason


def test_score_model_measures_a_saved_model_on_this_runs_data(store, demo_data):
    src, tgt, plan, head = store
    from adaptflow.config import IngestConfig

    labels = ingest(demo_data.target_labels_uri, "target_labels", "memory://monitor/labels", IngestConfig(workers=2),
                    classes=src.classes)
    scores = monitor.score_model(head.model_uri, src, tgt, labels, plan, ["source_val_acc", "im", "bnm"])
    assert set(scores.scores) >= {"source_val_acc", "im", "bnm"} and scores.n_target == tgt.n_images
    assert scores.selection_score == pytest.approx(sum(scores.scores[k] for k in ("source_val_acc", "im", "bnm")) / 3)
    assert 0 <= scores.target_accuracy <= 1
    again = monitor.score_model(head.model_uri, src, tgt, None, plan, ["source_val_acc", "im", "bnm"])
    assert again.target_accuracy is None and again.selection_score == scores.selection_score  # deterministic
