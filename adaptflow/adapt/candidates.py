"""Domain adaptation in a run: plan candidates, train each for a fixed number of steps, and select one
without target labels.

A candidate is (method, mode, hyperparameters, seed). Mode `features` adapts a small bottleneck and
classifier on cached backbone features (seconds on a CPU); mode `images` trains through the backbone
on the store's cached training images (the large gains; minutes on a CPU at small image sizes). Both
read their rows in bounded memory (`adaptflow.store.rows`) and train for a budget in optimizer steps, so the
same data and seed give the same model whatever the dataset's size or the machine's load (`adapt.samples`). Images-mode
candidates are trained in rungs of successive halving (`halving_rungs`): each rung resumes from the
checkpoint the last one left. Each candidate's folder holds the model (`weights.safetensors`,
`model.json`), its predictions on the validation sample, and `candidate.json`, written last.

Candidates are scored on a fixed seeded sample of source-validation and target images, the same for
every candidate. Target labels, when given, are used only to report each candidate's target accuracy
on that sample next to its label-free scores; selection never reads them.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import torch

from adaptflow.adapt import domain_gap, selection, validators
from adaptflow.adapt.algorithms import get_algorithm
from adaptflow.adapt.checkpoint import checkpoint_step, load_checkpoint, save_checkpoint
from adaptflow.adapt.hparams import candidate_hparams
from adaptflow.adapt.samples import (
    FeatureData,
    ImageData,
    accuracy_on,
    save_embedding_sample,
    save_outputs,
    shared_features,
    validation_sample,
)
from adaptflow.adapt.seeding import seeded
from adaptflow.adapt.train import intra_op_threads
from adaptflow.config import Config
from adaptflow.data.ingest import read_index
from adaptflow.errors import DatasetError
from adaptflow.evaluate.metrics import classification_metrics
from adaptflow.manifests import (
    CandidateManifest,
    CandidateSpec,
    ExtractionPlan,
    IngestManifest,
    ModelManifest,
    SelectionManifest,
)
from adaptflow.models.card import ModelCard, predictions_table, save_model
from adaptflow.store import storage

# End to end on a CPU: the baseline and the two strongest in benchmarks/adaptation.py on the demo shift.
CPU_IMAGE_METHODS = ["source_only", "dann", "cdan"]
# End to end on a CPU at 48 px: on the demo shift (32 px digits; benchmarks/adaptation.py, 300 steps,
# partial, one thread) 0.550 / 0.777 / 0.737 target accuracy for source_only / dann / cdan at 48 px, at
# 0.18-0.31 s a step, against 0.347 for source_only at 64 px, at 0.21 s a step and more.
CPU_IMAGE_SIZE = 48
# adapt.image_steps when unset: IMAGE_EPOCHS passes over the source's training images, within the device's
# (fewest, most) steps. The same data gets the same budget on any machine, and past the cap a larger source
# costs nothing more. On benchmarks/cost.py's 5,000-image source (3,393 training images, one thread, 48 px,
# partial) cdan-images reached 0.708 target accuracy at 300 steps and 0.796-0.805 at 480-500; the demo's
# 630 training images stay at 300 steps.
IMAGE_EPOCHS = 5
CPU_IMAGE_STEPS, GPU_IMAGE_STEPS = (300, 500), (3000, 3000)
# adapt.strategy when unset on a CPU: the stem and first stages stay frozen, so no gradient flows through
# the high-resolution layers; measured on the demo shift (benchmarks/adaptation.py, 300 steps, 64 px) 1.55x
# the steps/s of `full` at the same or better target accuracy
CPU_STRATEGY = "partial"
# On a CPU every candidate trains and is scored on one intra-op thread, and as many run at once as the
# task runner allows: the thread count changes a model's bits (oneDNN splits its sums by thread), so a
# fixed count is what makes a candidate the same whatever else runs; and on 2 cores two end-to-end
# candidates at once on one thread each make 1.22x the steps of one on two (demo, 64 px: 0.36 s a step
# each against 0.22 s), while a features-mode step, many tiny ops, gains nothing from a second thread.
CPU_THREADS = 1
_DEVICE_LOCKS: dict[str, threading.Lock] = {}  # one images-mode candidate per GPU and process at a time
_LOCKS_LOCK = threading.Lock()


def default_image_steps(n_train: int | None, batch_size: int, cuda: bool) -> int:
    """adapt.image_steps when unset: IMAGE_EPOCHS passes over `n_train` source training images at
    `batch_size`, within the device's (fewest, most); the fewest when the count is unknown."""
    fewest, most = GPU_IMAGE_STEPS if cuda else CPU_IMAGE_STEPS
    if not n_train:
        return fewest
    return min(max(math.ceil(IMAGE_EPOCHS * n_train / batch_size), fewest), most)


def training_images(source: IngestManifest) -> int:
    """How many of the source's images are in its training split (what `default_image_steps` sizes to)."""
    return int((read_index(source).split == "train").sum())


def plan_candidates(cfg: Config, cuda: bool, n_train: int | None = None) -> list[CandidateSpec]:
    """methods x modes x hyperparameter draws x seeds, each with its budget in steps (end to end, unless
    `adapt.image_steps` is set: sized to the `n_train` source training images by `default_image_steps`).
    `method: auto` trains `adapt.methods` on features and `adapt.image_methods` end to end (by default
    sized to the hardware); a named method trains that one in both modes; `none` trains nothing (the
    source-only head stands alone)."""
    a = cfg.adapt
    if a.method == "none":
        return []
    if a.method == "auto":
        feature_methods = a.methods
        image_methods = a.image_methods if a.image_methods is not None else (a.methods if cuda else CPU_IMAGE_METHODS)
    else:
        feature_methods = image_methods = [a.method]
    image_size = a.image_size or (_own_size(cfg) if cuda and image_methods else CPU_IMAGE_SIZE)
    strategy = a.strategy or ("full" if cuda else CPU_STRATEGY)
    specs = []
    for mode, methods in (("features", feature_methods), ("images", image_methods)):
        for method in methods:
            for draw in range(a.hparam_draws + 1):
                hp = candidate_hparams(method, mode, draw)
                hp.update({k: v for k, v in a.hparams.items() if k in hp})  # knobs this method has
                for seed in a.seeds:
                    name = (
                        f"{method}-{mode}" + (f"-h{draw}" if draw else "") + (f"-s{seed}" if len(a.seeds) > 1 else "")
                    )
                    specs.append(
                        CandidateSpec(
                            name=name,
                            method=method,
                            mode=mode,
                            hparams=hp,
                            seed=seed,
                            steps=a.feature_steps
                            if mode == "features"
                            else a.image_steps or default_image_steps(n_train, int(hp["batch_size"]), cuda),
                            image_size=image_size if mode == "images" else None,
                            strategy=strategy if mode == "images" else None,
                        )
                    )
    return specs


def training_image_size(specs: list[CandidateSpec]) -> int | None:
    """The size the images-mode candidates train at, for the training-image cache; None: none trains end
    to end."""
    return next((s.image_size for s in specs if s.mode == "images"), None)


def _own_size(cfg: Config) -> int:
    """The backbone's own input size (on a GPU, images-mode candidates train at it by default)."""
    from adaptflow.extract.backbones import build_extractor

    return int(build_extractor(cfg.backbone.model_copy(update={"image_size": None})).data_config["input_size"][-1])


def halving_rungs(steps: int, candidates: int, eta: int) -> list[int]:
    """The step counts at which successive halving ranks `candidates` and keeps the best 1/eta: e.g.
    300 steps, 3 candidates, eta 3 -> [100, 300]. No halving (one rung) for eta < 2 or one candidate."""
    if eta < 2 or candidates < 2:
        return [steps]
    levels = math.ceil(math.log(candidates, eta))
    return [max(1, steps // eta**k) for k in range(levels, 0, -1)] + [steps]


def successive_halving(
    specs: list[CandidateSpec],
    train: Callable[[list[CandidateSpec], list[int | None]], list[CandidateManifest]],
    stop: Callable[[CandidateManifest, int], CandidateManifest],
    policy: list[str],
    eta: int,
) -> list[CandidateManifest]:
    """Train every candidate: features-mode ones to the end at once, images-mode ones in rungs
    (`halving_rungs`): all to the first rung's steps, then the best 1/eta of them by the selection policy
    (`survivors`) on to the next, resuming from their checkpoints. The source-only images candidate does
    not race: it is the reference selection's safety net compares the pick with and falls back to
    (`adapt.selection`), so it is never left behind — a reference stopped after a third of its steps
    would make every adapted pick look safe, or leave no healthy reference at all — but it trains in the
    rungs beside the racers, so that every rung has work for more than one worker (trained alone to the
    end in the first rung, it left the last rung's survivor alone on the machine).
    `train(specs, untils)` trains each spec up to its step (None: the end) — a loop here, a map over
    Prefect tasks in a flow; `stop` records a candidate left behind. Returns the candidates in `specs` order."""
    images = [s for s in specs if s.mode == "images" and s.method != "source_only"]
    reference = [s for s in specs if s.mode == "images" and s.method == "source_only"]
    rungs = halving_rungs(max((s.steps for s in images), default=0), len(images), eta)
    done: dict[str, CandidateManifest] = {}
    # the long end-to-end tasks first, the short features-mode ones after, filling the workers' gaps
    batch = reference + images + [s for s in specs if s not in images and s not in reference]
    for rung in range(len(rungs)):
        last = rung == len(rungs) - 1
        untils = [rungs[rung] if s in images or (s in reference and not last) else None for s in batch]
        results = train(batch, untils) if batch else []
        done.update({c.spec.name: c for c in results})
        racing = [c for c in results if c.spec in images]
        if last:
            break
        keep = survivors(racing, policy, math.ceil(len(racing) / eta))
        for i, c in enumerate(racing):
            if i not in keep:
                done[c.spec.name] = stop(c, rung)
        batch = reference + [racing[i].spec for i in keep]
    return [done[s.name] for s in specs]


def survivors(candidates: list[CandidateManifest], policy: list[str], keep: int) -> list[int]:
    """Indices of the `keep` best candidates by the selection policy's ranks (`adapt.selection`): healthy
    ones first, a collapsed one only if nothing else is left."""
    pool = selection_candidates(candidates)
    alive = [i for i, c in enumerate(pool) if not c.collapsed] or list(range(len(pool)))
    ranks = selection.mean_ranks(pool, alive, policy)
    order = sorted(range(len(candidates)), key=lambda i: (i not in alive, selection.preference(pool[i], ranks[i], i)))
    return sorted(order[:keep])


def train_candidate(
    spec: CandidateSpec,
    source: IngestManifest,
    target: IngestManifest,
    target_labels: IngestManifest | None,
    features: ExtractionPlan,
    cfg: Config,
    out_uri: str,
    device: str = "cpu",
    until: int | None = None,
) -> CandidateManifest:
    """Train `spec` up to step `until` (default: its whole budget), resuming from the checkpoint a
    previous rung left under `out_uri`, then score it on the validation sample and commit it. Safe to
    retry: a candidate already committed at `until` steps or more is returned as it is."""
    start = time.perf_counter()
    total = spec.steps or (
        cfg.adapt.feature_steps if spec.mode == "features" else cfg.adapt.image_steps or CPU_IMAGE_STEPS[0]
    )
    until = total if until is None else min(until, total)
    committed = storage.join(out_uri, "candidate.json")
    before = CandidateManifest.load(committed) if storage.exists(committed) else None
    if before is not None and before.steps >= until:
        return before

    classes = source.classes
    code = {c: i for i, c in enumerate(classes)}
    src, tgt = read_index(source), read_index(target)
    train, val, test = (src[src.split == s] for s in ("train", "val", "test"))
    if val.empty:
        val = train
    if train.empty:
        raise DatasetError(f"the source dataset {source.dataset_uri} has no training images")
    n, seed = cfg.adapt.validation_samples, cfg.seed
    samples = {
        "val": validation_sample(val, n, seed),
        "train": validation_sample(train, n, seed),
        "test": validation_sample(test, n, seed),
        "target": validation_sample(tgt, n, seed),
    }

    # The end of its budget: every validator, the test split, the domain gap, the report's embedding
    # sample. An earlier rung of successive halving only ranks the candidates (`survivors`): there it is
    # scored by what the ranking reads alone (the policy's validators, source_val_acc and the tie-break),
    # on the samples those need.
    final = until == total
    names = None if final else list(dict.fromkeys(["source_val_acc", *cfg.adapt.policy, selection.TIE_BREAK]))
    wanted = set(samples) if final else {"val", "target"} | ({"train"} if "dev" in names else set())
    shared = final or "iwa" in names
    data = ImageData(spec, cfg, features, device) if spec.mode == "images" else FeatureData(features, device)
    with seeded(spec.seed):
        algorithm = get_algorithm(spec.method)(data.featurizer, data.dim, len(classes), spec.hparams, max_steps=total)
    algorithm.to(device)
    checkpoint = storage.join(out_uri, "checkpoint")
    begin = load_checkpoint(checkpoint, algorithm) if checkpoint_step(checkpoint) else 0
    batch = int(spec.hparams.get("batch_size", 32))
    y_train = torch.tensor(train.label.map(code).to_numpy(), dtype=torch.long)
    cpu = str(device) == "cpu"
    with (
        _device_lock(device) if spec.mode == "images" and not cpu else nullcontext(),
        intra_op_threads(CPU_THREADS) if cpu else nullcontext(),
    ):
        draws = (until - begin) * batch  # rows this segment reads of each domain: streamed if fewer than all
        curve = data.fit(
            algorithm,
            data.rows(train, draws),
            y_train,
            data.rows(tgt, draws),
            total,
            batch,
            spec.seed,
            begin,
            until,
            cfg,
        )
        if until < total:
            save_checkpoint(checkpoint, algorithm, until)
        out = {name: data.infer(algorithm, data.sample(rows)) for name, rows in samples.items() if name in wanted}
    inputs = validators.ValidationInputs(
        source_logits=out["val"][0],
        source_labels=torch.tensor(samples["val"].label.map(code).to_numpy()),
        source_features=out["val"][1],
        target_logits=out["target"][0],
        target_features=out["target"][1],
        source_train_features=out["train"][1] if "train" in out else None,
        seed=spec.seed,
        **(shared_features(features, samples["train"], samples["val"], samples["target"]) if shared else {}),
    )
    scores = {k: float(v) for k, v in validators.score(inputs, names).items()}
    collapsed = validators.is_collapsed(out["target"][0], len(classes))

    card = ModelCard(
        kind=spec.mode,
        method=spec.method,
        hparams=spec.hparams,
        image_size=data.image_size,
        classes=classes,
        config=cfg,
        fingerprint=features.fingerprint,
        dim=data.dim,
        config_hash=cfg.fingerprint(),
        dataset_fingerprint=source.fingerprint,
        metrics={"source_val_accuracy": scores["source_val_acc"]},
    )
    model_uri = storage.join(out_uri, "model")
    save_model(model_uri, algorithm, card)
    predictions_uri = storage.join(out_uri, "predictions.parquet")
    storage.write_table(predictions_uri, predictions_table(samples["target"], out["target"][0], classes))
    test_rows = samples["test"]
    test_acc = (
        classification_metrics(test_rows.label.map(code).to_numpy(), out["test"][0].argmax(1).numpy(), classes)[
            "accuracy"
        ]
        if "test" in out and len(test_rows)
        else float("nan")
    )
    target_acc = accuracy_on(samples["target"], out["target"][0], target_labels, code)
    gap, embedding_uri = {}, None
    if final:
        gap = {
            "proxy_a_distance": domain_gap.proxy_a_distance(out["train"][1], out["target"][1], seed=spec.seed),
            "mmd": domain_gap.mmd_distance(out["train"][1], out["target"][1], seed=spec.seed),
        }
        embedding_uri = storage.join(out_uri, "embedding_sample.parquet")
        save_embedding_sample(embedding_uri, out["train"][1], out["target"][1], spec.seed)
    outputs_uri = storage.join(out_uri, "outputs.parquet")
    save_outputs(outputs_uri, samples["val"], out["val"][0], code)

    manifest = CandidateManifest(
        spec=spec,
        model_uri=model_uri,
        predictions_uri=predictions_uri,
        outputs_uri=outputs_uri,
        embedding_uri=embedding_uri,
        scores=scores,
        collapsed=collapsed,
        source_test_accuracy=test_acc,
        target_accuracy=target_acc,
        domain_gap=gap,
        curve=(before.curve if before else []) + curve,
        steps=until,
        total_steps=total,
        seconds=(before.seconds if before else 0.0) + time.perf_counter() - start,
    )
    manifest.commit(committed)
    return manifest


def stop_candidate(candidate: CandidateManifest, rung: int, out_uri: str) -> CandidateManifest:
    """Record that successive halving left `candidate` behind after `rung`; its checkpoint is deleted."""
    stopped = candidate.model_copy(update={"stopped_at_rung": rung})
    stopped.commit(storage.join(out_uri, "candidate.json"))
    for name in ("state.safetensors", "checkpoint.json"):
        uri = storage.join(out_uri, "checkpoint", name)
        if storage.exists(uri):
            storage.remove(uri)
    return stopped


def select_model(head: ModelManifest, candidates: list[CandidateManifest], policy: list[str]) -> SelectionManifest:
    """The label-free pick among the candidates (`adapt.selection.select`: no candidate judged by what it
    optimised, never a collapsed one, never one clearly less accurate on source validation than the
    source-only reference), how confident it is, and, for the report only, the oracle pick. Candidates
    successive halving stopped early take no part. With no candidates (`adapt.method: none`) the
    source-only head is the model."""
    if not candidates:
        return SelectionManifest(
            index=-1,
            name="head",
            reason="adaptation off (adapt.method: none)",
            policy=list(policy),
            model_uri=head.model_uri,
            oracle_index=None,
            confidence="no adaptation: the source-only head",
        )
    finished = [i for i, c in enumerate(candidates) if c.stopped_at_rung is None]
    pick = selection.select(selection_candidates([candidates[i] for i in finished]), policy)
    index = finished[pick.index]
    reference = None if pick.reference is None else finished[pick.reference]
    ranks: list[float | None] = [None] * len(candidates)
    for i, r in zip(finished, pick.scores, strict=True):
        ranks[i] = r
    known = [i for i, c in enumerate(candidates) if c.target_accuracy is not None]
    oracle = max(known, key=lambda i: candidates[i].target_accuracy) if known else None
    chosen = candidates[index]
    return SelectionManifest(
        index=index,
        name=chosen.spec.name,
        reason=pick.reason,
        policy=list(policy),
        model_uri=chosen.model_uri,
        oracle_index=oracle,
        confident=pick.confident,
        confidence=pick.confidence,
        reference_index=reference,
        ranks=ranks,
        reference_model_uri=None if reference is None else candidates[reference].model_uri,
    )


def selection_candidates(candidates: list[CandidateManifest]) -> list[selection.Candidate]:
    """What `adapt.selection.select` needs of each candidate: its scores, its algorithm's objectives, and
    whether it got each source-validation image right."""
    return [
        selection.Candidate(
            name=c.spec.name,
            scores=c.scores,
            collapsed=c.collapsed,
            objectives=get_algorithm(c.spec.method).objectives,
            source_only=c.spec.method == "source_only",
            val_correct=_val_correct(c),
        )
        for c in candidates
    ]


def _val_correct(c: CandidateManifest) -> np.ndarray | None:
    """(Ns,) bool in image_id order, or None for a candidate written before outputs were kept."""
    if c.outputs_uri is None or not storage.exists(c.outputs_uri):
        return None
    t = storage.read_table(c.outputs_uri).to_pandas().sort_values("image_id")
    return t.label.to_numpy() == t.prediction.to_numpy()


def _device_lock(device: str) -> threading.Lock:
    """End-to-end candidates take their whole GPU: two at once on one only slow each other. One lock per
    device and process: candidates on other workers (Dask) run at the same time. (A CPU has no lock:
    see CPU_THREADS.)"""
    with _LOCKS_LOCK:
        return _DEVICE_LOCKS.setdefault(str(device), threading.Lock())
