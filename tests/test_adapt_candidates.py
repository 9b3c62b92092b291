"""Adaptation inside a run: candidate planning, one candidate per mode, selection."""

import json
import math
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from adaptflow.adapt import candidates as adaptation
from adaptflow.adapt import halving, samples
from adaptflow.adapt import plan as planning
from adaptflow.config import AdaptConfig, load_config
from adaptflow.data.preprocess import make_loader
from adaptflow.extract import backbones
from adaptflow.manifests import ModelManifest, RunData
from adaptflow.seeding import seeded
from adaptflow.store import storage

POLICY = AdaptConfig().policy


def _cfg(*overrides):
    return load_config(None, list(overrides))


def test_candidate_plan_is_sized_to_the_hardware():
    names = lambda specs: [s.name for s in specs]  # noqa: E731
    cpu = planning.plan_candidates(_cfg(), cuda=False)
    assert names(cpu) == [f"{m}-features" for m in _cfg().adapt.methods] + [
        "source_only-images",
        "dann-images",
        "cdan-images",
    ]
    assert len(planning.plan_candidates(_cfg(), cuda=True)) == 2 * len(_cfg().adapt.methods)
    assert names(planning.plan_candidates(_cfg("adapt.method=coral"), cuda=False)) == [
        "coral-features",
        "coral-images",
    ]
    assert planning.plan_candidates(_cfg("adapt.method=none"), cuda=False) == []
    grid = planning.plan_candidates(_cfg("adapt.method=mcc", "adapt.hparam_draws=2", "adapt.seeds=[0, 1]"), cuda=False)
    assert len(grid) == 2 * 3 * 2 and len({s.name for s in grid}) == 12
    assert grid[0].hparams != grid[2].hparams  # a random draw differs from the defaults
    l2sp = planning.plan_candidates(_cfg("adapt.method=dann", "adapt.hparams={l2sp: 0.01, lambda: 0.5}"), cuda=False)
    assert all(s.hparams["l2sp"] == 0.01 and s.hparams["lambda"] == 0.5 for s in l2sp)
    assert (
        "lambda"
        not in planning.plan_candidates(_cfg("adapt.method=source_only", "adapt.hparams={lambda: 2}"), cuda=False)[
            0
        ].hparams
    )


def test_the_end_to_end_budget_is_sized_to_the_source_within_the_devices_bounds():
    steps = lambda n, cuda=False, *o: {  # noqa: E731
        s.steps for s in planning.plan_candidates(_cfg(*o), cuda, n) if s.mode == "images"
    }
    quick = "adapt.budget=quick"
    assert steps(None, False, quick) == steps(630, False, quick) == {300}  # unknown, or 630 images: the fewest
    assert steps(2_400, False, quick) == {375}  # 5 passes of 2,400 images at batch 32
    assert steps(3_393, False, quick) == steps(1_000_000, False, quick) == {500}  # past the cap, nothing more
    assert steps(None) == steps(630) == steps(3_393) == steps(1_000_000) == {600}  # the default: 600 on a CPU
    assert steps(3_393, True) == {3000}
    assert steps(3_393, False, "adapt.image_steps=40") == {40}  # set: whatever the source
    assert {s.steps for s in planning.plan_candidates(_cfg(), False, 3_393) if s.mode == "features"} == {1500}


def test_a_budget_sets_steps_size_strategy_and_halving_and_explicit_settings_win():
    def planned(*o, n=3_393):
        specs = planning.plan_candidates(_cfg(*o), False, n)
        images = [s for s in specs if s.mode == "images"]
        b = planning.budget(_cfg(*o))
        return (
            {s.steps for s in images},
            {s.image_size for s in images},
            {s.strategy for s in images},
            b.halving,
            {s.steps for s in specs if s.mode == "features"},
        )

    quick, default, thorough = (planned(f"adapt.budget={b}") for b in ("quick", "default", "thorough"))
    assert quick[0] == {500} and quick[1] == {48} and quick[3] == 3
    assert thorough == ({1061}, {64}, {"full"}, 0, {3000})  # 10 passes of 3,393 images, no halving
    assert planned("adapt.budget=thorough", n=630)[0] == {600}  # its fewest steps
    assert default[0] == {600} and default[1:] == quick[1:]  # the default trains longer, nothing else differs
    pinned = planned(
        "adapt.budget=thorough",
        "adapt.image_steps=40",
        "adapt.image_size=32",
        "adapt.strategy=partial",
        "adapt.halving=2",
        "adapt.feature_steps=7",
    )
    assert pinned == ({40}, {32}, {"partial"}, 2, {7})  # a setting that is not null wins over the budget
    from adaptflow.errors import ConfigError

    with pytest.raises(ConfigError, match="adapt.budget: Input should be 'quick', 'default' or 'thorough'"):
        _cfg("adapt.budget=lavish")


@pytest.mark.parametrize("mode", ["features", "images"])
def test_a_candidate_trains_scores_and_commits(run_inputs, mode):
    cfg, d, plan, root = run_inputs
    spec = next(
        s
        for s in planning.plan_candidates(
            cfg.model_copy(update={"adapt": cfg.adapt.model_copy(update={"method": "dann"})}), cuda=False
        )
        if s.mode == mode
    )
    out = f"{root}/candidates/{spec.name}"
    c = adaptation.train_candidate(spec, _data(d, plan), cfg, out)
    assert set(c.scores) >= set(POLICY) and all(v == v for v in c.scores.values())
    assert 0 <= c.target_accuracy <= 1 and c.steps > 0 and c.curve
    assert storage.exists(f"{out}/candidate.json") and storage.exists(f"{c.model_uri}/model.json")
    assert storage.read_table(c.predictions_uri).num_rows == d["target"].n_images
    assert set(c.domain_gap) == {"proxy_a_distance", "mmd"}
    outputs = storage.read_table(c.outputs_uri).to_pandas()  # what selection compares candidates on
    assert list(outputs.columns) == ["image_id", "label", "prediction", "probabilities"] and len(outputs) > 0
    proba = np.stack(outputs.probabilities.to_numpy())  # what the class-mix estimate calibrates on
    assert proba.shape == (len(outputs), len(d["source"].classes)) and np.allclose(proba.sum(1), 1, atol=1e-5)
    assert (proba.argmax(1) == outputs.prediction.to_numpy()).all()
    target = storage.read_table(c.predictions_uri).to_pandas()  # and the target side of selection
    assert np.allclose(np.stack(target.probabilities.to_numpy()).max(1), target.confidence, atol=1e-6)


@pytest.mark.parametrize("mode", ["features", "images"])
def test_a_candidate_is_the_same_while_another_thread_draws_random_numbers(run_inputs, mode):
    """The flow trains candidates at once on threads that share torch's global generator. A neighbour
    seeding it and drawing from it as fast as it can (as another candidate does at every step) must
    change nothing: unlocked, it landed between a candidate's seed and its initialisation."""
    cfg, d, plan, root = run_inputs
    spec = next(
        s
        for s in planning.plan_candidates(
            cfg.model_copy(update={"adapt": cfg.adapt.model_copy(update={"method": "dann"})}), cuda=False
        )
        if s.mode == mode
    )

    def train(name: str):
        out = f"{root}/race-{mode}-{name}"
        return adaptation.train_candidate(spec, _data(d, plan), cfg, out)

    alone = train("alone")
    stop = threading.Event()

    def neighbour():
        k = 0
        while not stop.is_set():
            with seeded(k):
                torch.randn(64)
            k += 1

    thread = threading.Thread(target=neighbour)
    thread.start()
    try:
        crowded = train("crowded")
    finally:
        stop.set()
        thread.join()
    assert crowded.scores == alone.scores and crowded.target_accuracy == alone.target_accuracy


def _build_a_module():
    backbones._create(SimpleNamespace(create=lambda: torch.nn.Linear(4, 4)))  # as build_extractor does


def _iterate_a_loader():
    for _ in make_loader([], None, 1, 0, "cpu"):  # iterating draws the loader's base seed
        pass


@pytest.mark.parametrize("neighbour", [_build_a_module, _iterate_a_loader])
def test_a_candidate_is_the_same_while_another_thread_builds_models_or_reads_images(run_inputs, neighbour):
    """Two other users of torch's global generator on the flow's threads: building a backbone (seeded,
    for the same "random" weights everywhere) and iterating a DataLoader (extraction, prediction). Neither
    may move the generator under a candidate that is initialising."""
    cfg, d, plan, root = run_inputs
    spec = next(s for s in planning.plan_candidates(cfg, cuda=False) if s.name == "dann-features")

    def train(name: str):
        out = f"{root}/neighbour-{neighbour.__name__}-{name}"
        return adaptation.train_candidate(spec, _data(d, plan), cfg, out)

    alone = train("alone")
    stop = threading.Event()
    thread = threading.Thread(target=lambda: [neighbour() for _ in iter(stop.is_set, True)])
    thread.start()
    try:
        crowded = [train(f"crowded-{k}") for k in range(3)]
    finally:
        stop.set()
        thread.join()
    assert all(c.scores == alone.scores and c.target_accuracy == alone.target_accuracy for c in crowded)


def test_candidates_trained_at_once_on_threads_equal_those_trained_one_by_one(run_inputs):
    """What the flow does with `runtime.max_workers` threads: every features-mode candidate and an
    images-mode one, all at once, must give exactly what each gives trained alone."""
    cfg, d, plan, root = run_inputs
    specs = [s for s in planning.plan_candidates(cfg, cuda=False) if s.mode == "features"]
    specs += [next(s for s in planning.plan_candidates(cfg, cuda=False) if s.mode == "images")]

    def train(spec, where):
        out = f"{root}/{where}-{spec.name}"
        return adaptation.train_candidate(spec, _data(d, plan), cfg, out)

    alone = [train(s, "alone") for s in specs]
    at_once: dict[str, object] = {}
    threads = [threading.Thread(target=lambda s=s: at_once.update({s.name: train(s, "at-once")})) for s in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [(c.spec.name, c.scores, c.target_accuracy) for c in alone] == [
        (s.name, at_once[s.name].scores, at_once[s.name].target_accuracy) for s in specs
    ]


def test_without_candidates_the_head_is_the_model():
    head = ModelManifest(
        model_uri="memory://head", classes=["a"], fingerprint="f", val_accuracy=0.5, epochs=1, seconds=0.1
    )
    alone = adaptation.select_model(head, [], list(POLICY))
    assert (alone.index, alone.model_uri) == (-1, "memory://head")


def _data(d, plan) -> RunData:
    return RunData(source=d["source"], target=d["target"], target_labels=d["target_labels"], features=plan)


def _images_spec(cfg, method="dann", steps=8):
    spec = next(
        s
        for s in planning.plan_candidates(
            cfg.model_copy(update={"adapt": cfg.adapt.model_copy(update={"method": method})}), cuda=False
        )
        if s.mode == "images"
    )
    return spec.model_copy(update={"steps": steps})


@pytest.mark.parametrize("method", ["dann", "adda"])  # ADDA: its target encoder takes over at the rung's step
def test_training_resumed_from_a_checkpoint_equals_an_uninterrupted_run(run_inputs, method):
    """Same data, same seed: the same model, whether trained in one go or in two rungs with a checkpoint in
    the store between them (and whatever else the machine is doing: budgets are steps)."""
    from safetensors.torch import load

    cfg, d, plan, root = run_inputs
    spec = _images_spec(cfg, method)
    args = (RunData(source=d["source"], target=d["target"], features=plan), cfg)
    straight = adaptation.train_candidate(spec, *args, f"{root}/straight-{method}")
    half = adaptation.train_candidate(spec, *args, f"{root}/rungs-{method}", until=4)
    assert (half.steps, half.total_steps) == (4, 8)
    assert storage.exists(f"{root}/rungs-{method}/checkpoint/checkpoint.json")
    # a rung only ranks: the policy's validators, source_val_acc and the tie-break; no test split, domain gap
    # or embedding sample
    assert set(half.scores) == {"source_val_acc", *cfg.adapt.policy, "im"} != set(straight.scores)
    assert half.embedding_uri is None and half.domain_gap == {} and math.isnan(half.source_test_accuracy)
    assert half.scores["source_val_acc"] >= 0 and half.target_accuracy is None
    resumed = adaptation.train_candidate(spec, *args, f"{root}/rungs-{method}", until=8)
    assert resumed.steps == straight.steps == 8
    a, b = (load(storage.read_bytes(f"{c.model_uri}/weights.safetensors")) for c in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.scores == straight.scores and resumed.embedding_uri and resumed.domain_gap == straight.domain_gap
    assert adaptation.train_candidate(spec, *args, f"{root}/rungs-{method}", until=8) == resumed  # a retry: nothing
    # the same command again: each rung gets what it ranked on then, not the finished candidate's scores
    again = adaptation.train_candidate(spec, *args, f"{root}/rungs-{method}", until=4)
    same = [json.dumps(c.model_dump(mode="json"), sort_keys=True) for c in (again, half)]
    assert same[0] == same[1]  # (as JSON text: a rung's test accuracy is NaN, never equal to itself)


def test_an_interrupted_segment_resumes_from_its_last_checkpoint_to_the_same_model(run_inputs, monkeypatch):
    """Ctrl-C mid-training, then the same command: the candidate carries on from the checkpoint a part of its
    segment left (one at least every CHECKPOINT_EVERY_S seconds), not from step 0, and ends as the
    uninterrupted run ends."""
    from safetensors.torch import load

    from adaptflow.adapt import checkpoint

    cfg, d, plan, root = run_inputs
    spec = _images_spec(cfg, "dann")
    args = (RunData(source=d["source"], target=d["target"], features=plan), cfg)
    straight = adaptation.train_candidate(spec, *args, f"{root}/straight-interrupted")
    monkeypatch.setattr(adaptation, "CHECKPOINT_EVERY_S", 0.0)  # a checkpoint after every part (1 step of 8)
    real_fit, calls, resuming = samples.ImageData.fit, [], False

    def interrupted(self, algorithm, x, y, xt, loop):
        calls.append((loop.start, loop.stop))
        if loop.start == 5 and not resuming:
            raise KeyboardInterrupt
        return real_fit(self, algorithm, x, y, xt, loop)

    monkeypatch.setattr(samples.ImageData, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        adaptation.train_candidate(spec, *args, f"{root}/interrupted")
    assert calls[-1] == (5, 6) and checkpoint.checkpoint_step(f"{root}/interrupted/checkpoint") == 5
    calls.clear()
    resuming = True
    resumed = adaptation.train_candidate(spec, *args, f"{root}/interrupted")
    assert calls[0] == (5, 6) and resumed.steps == 8  # steps 0-4 were not trained again
    a, b = (load(storage.read_bytes(f"{c.model_uri}/weights.safetensors")) for c in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_training_folder_is_keyed_by_what_training_reads(run_inputs):
    """The same command again finds its candidates (and their checkpoints); other data or settings do not."""
    cfg, d, plan, _ = run_inputs
    key = planning.training_key(cfg, d["source"], d["target"], None, plan)
    assert key == planning.training_key(cfg, d["source"], d["target"], None, plan) and len(key) == 16
    where = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"max_workers": 7})})
    assert planning.training_key(where, d["source"], d["target"], None, plan) == key  # where it runs: same work
    other = cfg.model_copy(update={"adapt": cfg.adapt.model_copy(update={"feature_steps": 7})})
    assert planning.training_key(other, d["source"], d["target"], None, plan) != key
    assert planning.training_key(cfg, d["target"], d["source"], None, plan) != key
    assert planning.training_key(cfg, d["source"], d["target"], d["target_labels"], plan) != key


def test_images_mode_trains_and_scores_from_the_cache_within_a_memory_ceiling(run_inputs, monkeypatch):
    """With room for 2 shards of 64 images, a candidate trains and predicts on 150 source and 150 target
    images without ever holding a whole split: the rows held at once stay under the ceiling."""
    from adaptflow.store import rows

    cfg, d, plan, root = run_inputs
    opened = []

    class Watched(rows.ShardedRows):
        def __init__(self, *a, **kw):
            super().__init__(*a, **{**kw, "resident_bytes": 0, "max_shards": 2})
            opened.append(self)

    monkeypatch.setattr(samples, "ShardedRows", Watched)
    c = adaptation.train_candidate(_images_spec(cfg, "source_only"), _data(d, plan), cfg, f"{root}/bounded")
    assert c.steps == 8 and 0 <= c.target_accuracy <= 1
    # the training images' pixels; beside them, unless an earlier test of this process already read and
    # kept them (`samples.sample_rows`), the frozen features of the fixed validation samples
    pixels = [r for r in opened if r.column == "pixels"]
    assert pixels and {r.column for r in opened} <= {"pixels", "embedding"}
    splits = max(len(r) for r in pixels)
    assert splits >= 100 and max(r.peak_rows for r in opened) <= 2 * 64 < splits


def test_successive_halving_keeps_the_best_third_and_records_who_stopped():
    assert halving.halving_rungs(300, 3, 3) == [100, 300]
    assert halving.halving_rungs(300, 9, 3) == [33, 100, 300]
    assert halving.halving_rungs(300, 3, 0) == halving.halving_rungs(300, 1, 3) == [300]
    cfg = _cfg(
        "adapt.budget=quick",  # 300 steps: rungs of 100 and 300
        "adapt.methods=[source_only, coral]",
        "adapt.image_methods=[source_only, dann, cdan]",
    )
    specs = planning.plan_candidates(cfg, cuda=False)
    quality = {
        "source_only-images": 0.5,
        "dann-images": 0.9,
        "cdan-images": 0.7,
        "source_only-features": 0.6,
        "coral-features": 0.4,
    }
    calls = []

    def train(batch, untils):
        calls.append([(s.name, u) for s, u in zip(batch, untils, strict=True)])
        return [_fake(s, u or s.steps, quality[s.name]) for s, u in zip(batch, untils, strict=True)]

    done = halving.successive_halving(
        specs, train, lambda c, rung: c.model_copy(update={"stopped_at_rung": rung}), ["source_val_acc", "im"], eta=3
    )
    # the source-only images candidate (selection's reference) is never left behind: it trains in the
    # rungs beside the racers, so the last rung is not one survivor alone
    assert calls == [
        [
            ("source_only-images", 100),
            ("dann-images", 100),
            ("cdan-images", 100),
            ("source_only-features", None),
            ("coral-features", None),
        ],
        [("source_only-images", None), ("dann-images", 300)],
    ]
    assert [(c.spec.name, c.steps, c.stopped_at_rung) for c in done] == [
        ("source_only-features", 1500, None),
        ("coral-features", 1500, None),
        ("source_only-images", 300, None),
        ("dann-images", 300, None),
        ("cdan-images", 100, 0),
    ]
    head = ModelManifest(model_uri="m", classes=["a"], fingerprint="f", val_accuracy=0.5, epochs=1, seconds=0.0)
    picked = adaptation.select_model(head, done, ["source_val_acc", "im"])
    assert picked.name == "dann-images" and picked.ranks[4] is None  # stopped: unranked
    assert picked.ranks[2] is not None  # the source-only images candidate finished: ranked, a possible reference

    # labelled target images rank a rung first: cdan right on 40 of 50 where dann is on 20, so cdan goes on
    # though every label-free score prefers dann; ten labels cannot tell them apart, and dann goes on
    def judge(n_right, n):
        def outcomes(racing):
            return [np.arange(n) < n_right[c.spec.name] for c in racing]

        return outcomes

    for right, n, kept in (
        ({"dann-images": 20, "cdan-images": 40}, 50, "cdan-images"),
        ({"dann-images": 4, "cdan-images": 6}, 10, "dann-images"),
    ):
        calls.clear()
        stop = lambda c, rung: c.model_copy(update={"stopped_at_rung": rung})  # noqa: E731
        halving.successive_halving(specs, train, stop, ["source_val_acc", "im"], eta=3, judge=judge(right, n))
        assert calls[-1] == [("source_only-images", None), (kept, 300)]


def _fake(spec, steps, quality):
    """A committed-looking candidate whose validators all read `quality`."""
    scores = {"source_val_acc": quality, "im": quality}
    return adaptation.CandidateManifest(
        spec=spec,
        model_uri=f"m/{spec.name}",
        predictions_uri="p",
        embedding_uri="e",
        scores=scores,
        collapsed=False,
        source_test_accuracy=quality,
        target_accuracy=None,
        domain_gap={},
        curve=[],
        steps=steps,
        total_steps=spec.steps,
        seconds=0.0,
    )
