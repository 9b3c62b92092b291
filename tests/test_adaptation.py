"""Adaptation inside a run: candidate planning, one candidate per mode, selection."""

import pytest

from adaptflow import adaptation, features, storage
from adaptflow.config import AdaptConfig, load_config
from adaptflow.ingest import ingest
from adaptflow.pipeline import ModelManifest

POLICY = AdaptConfig().policy


def _cfg(*overrides):
    return load_config(None, list(overrides))


def test_candidate_plan_is_sized_to_the_hardware():
    names = lambda specs: [s.name for s in specs]  # noqa: E731
    cpu = adaptation.plan_candidates(_cfg(), cuda=False)
    assert names(cpu) == [f"{m}-features" for m in _cfg().adapt.methods] + ["source_only-images", "dann-images", "cdan-images"]
    assert len(adaptation.plan_candidates(_cfg(), cuda=True)) == 2 * len(_cfg().adapt.methods)
    assert names(adaptation.plan_candidates(_cfg("adapt.method=coral"), cuda=False)) == ["coral-features", "coral-images"]
    assert adaptation.plan_candidates(_cfg("adapt.method=none"), cuda=False) == []
    grid = adaptation.plan_candidates(_cfg("adapt.method=mcc", "adapt.hparam_draws=2", "adapt.seeds=[0, 1]"), cuda=False)
    assert len(grid) == 2 * 3 * 2 and len({s.name for s in grid}) == 12
    assert grid[0].hparams != grid[2].hparams  # a random draw differs from the defaults
    l2sp = adaptation.plan_candidates(_cfg("adapt.method=dann", "adapt.hparams={l2sp: 0.01, lambda: 0.5}"), cuda=False)
    assert all(s.hparams["l2sp"] == 0.01 and s.hparams["lambda"] == 0.5 for s in l2sp)
    assert "lambda" not in adaptation.plan_candidates(_cfg("adapt.method=source_only", "adapt.hparams={lambda: 2}"),
                                                      cuda=False)[0].hparams


def test_unknown_methods_are_config_errors():
    from adaptflow.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown method 'gan'; valid methods: auto, "):
        _cfg("adapt.method=gan")
    with pytest.raises(ConfigError, match="unknown algorithm 'gan'"):
        _cfg("adapt.methods=[dann, gan]")
    with pytest.raises(ConfigError, match="unknown validator 'vibes'; valid validators: bnm, dev, entropy"):
        _cfg("adapt.policy=[im, vibes]")
    with pytest.raises(ConfigError, match="unknown hyperparameter 'lamda'"):
        _cfg("adapt.hparams={lamda: 1}")


@pytest.fixture
def run_inputs(demo_data, fast_config, memory_uri):
    cfg = fast_config.model_copy(update={"adapt": fast_config.adapt.model_copy(
        update={"feature_steps": 200, "image_epochs": 1, "image_size": 32})})
    d = {dom: ingest(uri, dom, f"{memory_uri}/ingest/{dom}", cfg.ingest)
         for dom, uri in [("source", demo_data.source_uri), ("target", demo_data.target_uri),
                          ("target_labels", demo_data.target_labels_uri)]}
    plan = features.plan_extraction([d["source"].index_uri, d["target"].index_uri], memory_uri, cfg.backbone, 512)
    for shard in plan.shards:
        features.extract_shard(shard, cfg.backbone, cfg.extract)
    return cfg, d, plan, memory_uri


@pytest.mark.parametrize("mode", ["features", "images"])
def test_a_candidate_trains_scores_and_commits(run_inputs, mode):
    cfg, d, plan, root = run_inputs
    spec = next(s for s in adaptation.plan_candidates(cfg.model_copy(update={"adapt": cfg.adapt.model_copy(
        update={"method": "dann"})}), cuda=False) if s.mode == mode)
    out = f"{root}/candidates/{spec.name}"
    c = adaptation.train_candidate(spec, d["source"], d["target"], d["target_labels"], plan, cfg, out)
    assert set(c.scores) >= set(POLICY) and all(v == v for v in c.scores.values())
    assert 0 <= c.target_accuracy <= 1 and c.steps > 0 and c.curve
    assert storage.exists(f"{out}/candidate.json") and storage.exists(f"{c.model_uri}/model.json")
    assert storage.read_table(c.predictions_uri).num_rows == d["target"].n_images
    assert set(c.domain_gap) == {"proxy_a_distance", "mmd"}
    outputs = storage.read_table(c.outputs_uri).to_pandas()  # what selection compares candidates on
    assert list(outputs.columns) == ["image_id", "label", "prediction"] and len(outputs) > 0


def test_without_candidates_the_head_is_the_model():
    head = ModelManifest(model_uri="memory://head", classes=["a"], fingerprint="f", val_accuracy=0.5, epochs=1,
                         seconds=0.1)
    alone = adaptation.select_model(head, [], list(POLICY))
    assert (alone.index, alone.model_uri) == (-1, "memory://head")


def test_end_to_end_candidates_get_a_cpu_time_budget_by_default():
    assert adaptation._image_budget(_cfg(), "cpu") == adaptation.CPU_IMAGE_BUDGET_S
    assert adaptation._image_budget(_cfg(), "cuda") is None
    assert adaptation._image_budget(_cfg("adapt.time_budget_s=30"), "cuda") == 30
