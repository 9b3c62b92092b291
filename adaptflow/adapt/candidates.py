"""Domain adaptation in a run: train each planned candidate for a fixed number of steps, and select one
without target labels.

A candidate is (method, mode, hyperparameters, seed), planned by `adapt.plan`. Mode `features` adapts a
small bottleneck and classifier on cached backbone features (seconds on a CPU); mode `images` trains
through the backbone on the store's cached training images (the large gains; minutes on a CPU at small
image sizes). Both read their rows in bounded memory (`adaptflow.store.rows`) and train for a budget in
optimizer steps, so the same data and seed give the same model whatever the dataset's size or the
machine's load (`adapt.samples`). Images-mode candidates are trained in rungs of successive halving
(`adapt.halving`): each rung resumes from the checkpoint the last one left, and a long segment leaves one
about every minute, so an interrupted run's candidates resume too (their folders are keyed by what their
training reads, `adapt.plan.training_key`). Each candidate's folder holds the model (`weights.safetensors`,
`model.json`), its predictions on the validation sample, and `candidate.json`, written last.

Candidates are scored on a fixed seeded sample of source-validation and target images, the same for
every candidate. Target labels, when given, are used only to report each candidate's target accuracy
on that sample next to its label-free scores; selection never reads them.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext

import numpy as np
import pandas as pd
import torch

from adaptflow import state
from adaptflow.adapt import domain_gap, priors, selection, validators
from adaptflow.adapt.algorithms import get_algorithm
from adaptflow.adapt.checkpoint import checkpoint_step, load_checkpoint, save_checkpoint
from adaptflow.adapt.inference import load_model
from adaptflow.adapt.labelled import by_labels, labelled_outcomes, with_labelled
from adaptflow.adapt.plan import budget
from adaptflow.adapt.samples import (
    FeatureData,
    ImageData,
    accuracy_on,
    save_embedding_sample,
    save_outputs,
    shared_features,
    validation_sample,
)
from adaptflow.adapt.train import Loop, intra_op_threads
from adaptflow.config import Config
from adaptflow.data.ingest import read_index
from adaptflow.errors import DatasetError
from adaptflow.extract.backbones import zero_shot_classifier
from adaptflow.manifests import (
    CandidateManifest,
    CandidateSpec,
    ClassMix,
    ExtractionPlan,
    IngestManifest,
    ModelManifest,
    RunData,
    SelectionManifest,
)
from adaptflow.models.card import ModelCard, load_card, predictions_table, save_model
from adaptflow.seeding import seeded
from adaptflow.store import storage

# On a CPU every candidate trains and is scored on one intra-op thread, and as many run at once as the
# task runner allows: the thread count changes a model's bits (oneDNN splits its sums by thread), so a
# fixed count is what makes a candidate the same whatever else runs; and on 2 cores two end-to-end
# candidates at once on one thread each make 1.22x the steps of one on two (demo, 64 px: 0.36 s a step
# each against 0.22 s), while a features-mode step, many tiny ops, gains nothing from a second thread.
CPU_THREADS = 1
# A segment trains in CHECKPOINT_PARTS parts of its candidate's budget; after a part that ends a minute or more
# after the last checkpoint, it saves one: Ctrl-C (or a lost worker) costs at most about a minute of training.
CHECKPOINT_PARTS = 8
CHECKPOINT_EVERY_S = 60.0


def train_candidate(
    spec: CandidateSpec,
    data: RunData,
    cfg: Config,
    out_uri: str,
    device: str = "cpu",
    until: int | None = None,
    fit_labels: IngestManifest | None = None,
) -> CandidateManifest:
    """Train `spec` up to step `until` (default: its whole budget), resuming from the checkpoint a
    previous rung left under `out_uri`, then score it on the validation sample and commit it. Safe to
    retry: a candidate already committed at `until` steps or more is returned as it is. With `fit_labels`,
    labelled target images join its supervised rows (`labelled.with_labelled`). The steps of a
    candidate's life are `CandidateRun`'s methods."""
    start = time.perf_counter()
    total = spec.steps or (
        budget(cfg).feature_steps if spec.mode == "features" else cfg.adapt.image_steps or budget(cfg).cpu_steps[0]
    )
    until = total if until is None else min(until, total)
    committed = storage.join(out_uri, "candidate.json")
    before = CandidateManifest.load(committed) if storage.exists(committed) else None
    if before is not None and before.steps >= until:
        return _committed_at(before, until, out_uri)

    run = CandidateRun(spec, data, cfg, out_uri, device, until, total, fit_labels)
    algorithm, begin = run.resume()
    curve, out = run.fit(algorithm, begin)
    scores, collapsed = run.score(out)
    manifest = run.commit(algorithm, out, scores, collapsed, data.target_labels)
    manifest = manifest.model_copy(
        update={
            "curve": (before.curve if before else []) + curve,
            "seconds": (before.seconds if before else 0.0) + time.perf_counter() - start,
        }
    )
    manifest.commit(committed)
    if until < total:  # what this rung ranked on, for the same command run again (`_committed_at`)
        manifest.commit(storage.join(out_uri, f"rung-{until}.json"))
    return manifest


class CandidateRun:
    """One training segment of a candidate, from step `begin` (its last checkpoint) to `until` of its
    `total`, with what every step of it reads held once: the source's splits, the target's images, and the
    fixed seeded samples every candidate is scored on (`adapt.validation_samples`).

    At the end of its budget every validator, the test split, the domain gap and the report's embedding
    sample are measured; an earlier rung of successive halving only ranks the candidates
    (`halving.survivors`), so it is scored by what the ranking reads alone (the policy's validators,
    source_val_acc and the tie-break), on the samples those need."""

    def __init__(self, spec, data: RunData, cfg: Config, out_uri: str, device, until: int, total: int, fit_labels=None):
        source, target, features = data.source, data.target, data.features
        self.spec, self.features, self.cfg, self.out_uri, self.device = spec, features, cfg, out_uri, device
        self.until, self.total, self.final = until, total, until == total
        self.source_fingerprint = source.fingerprint
        self.classes = source.classes
        self.code = {c: i for i, c in enumerate(self.classes)}
        src, self.target = read_index(source), read_index(target)
        self.train, val, test = (src[src.split == s] for s in ("train", "val", "test"))
        if val.empty:
            val = self.train
        if self.train.empty:
            raise DatasetError(f"the source dataset {source.dataset_uri} has no training images")
        self.labelled = read_index(fit_labels) if fit_labels is not None else None
        self.fit_rows = with_labelled(self.train, self.labelled)
        n, seed = cfg.adapt.validation_samples, cfg.seed
        self.samples = {
            "val": validation_sample(val, n, seed),
            "train": validation_sample(self.train, n, seed),
            "test": validation_sample(test, n, seed),
            "target": validation_sample(self.target, n, seed),
        }
        self.names = (
            None if self.final else list(dict.fromkeys(["source_val_acc", *cfg.adapt.policy, selection.TIE_BREAK]))
        )
        wanted = {"val", "target"} | ({"train"} if not self.final and "dev" in self.names else set())
        self.wanted = set(self.samples) if self.final else wanted
        self.data = ImageData(spec, cfg, features, device) if spec.mode == "images" else FeatureData(features, device)
        self.checkpoint = storage.join(out_uri, "checkpoint")

    def resume(self):
        """The candidate's model, initialised with its seed, on its device, with the weights of the last
        checkpoint if there is one: (model, the step it resumes at)."""
        spec, data = self.spec, self.data
        with seeded(spec.seed):
            algorithm = get_algorithm(spec.method)(
                data.featurizer, data.dim, len(self.classes), spec.hparams, max_steps=self.total
            )
        if spec.method == "zero_shot":  # its classifier is the text encoder's: the classes' prompts
            algorithm.use_text(*zero_shot_classifier(self.cfg.backbone, self.classes))
        algorithm.to(self.device)
        return algorithm, (load_checkpoint(self.checkpoint, algorithm) if checkpoint_step(self.checkpoint) else 0)

    def fit(self, algorithm, begin: int) -> tuple[list, dict]:
        """Train from `begin` to `until` in parts, with a checkpoint at least every CHECKPOINT_EVERY_S
        seconds, then infer on the wanted samples; on one thread on a CPU, alone on its GPU: (the training
        curve, {sample: (logits, features)})."""
        spec, data, cfg, until, total = self.spec, self.data, self.cfg, self.until, self.total
        batch = int(spec.hparams.get("batch_size", 32))
        y_train = torch.tensor(self.fit_rows.label.map(self.code).to_numpy(), dtype=torch.long)
        cpu = str(self.device) == "cpu"
        with (
            state.CANDIDATE_DEVICES.lock(self.device) if spec.mode == "images" and not cpu else nullcontext(),
            intra_op_threads(CPU_THREADS) if cpu else nullcontext(),
        ):
            draws = (until - begin) * batch  # rows this segment reads of each domain: streamed if fewer than all
            rows, target_rows = data.rows(self.fit_rows, draws), data.rows(self.target, draws)
            curve, step, saved = [], begin, time.monotonic()
            while step < until:
                stop = until if cfg.adapt.time_budget_s else min(until, step + math.ceil(total / CHECKPOINT_PARTS))
                loop = Loop(total, batch, spec.seed, start=step, stop=stop, time_budget_s=cfg.adapt.time_budget_s)
                part = data.fit(algorithm, rows, y_train, target_rows, loop)
                curve += part
                over = part and part[-1].get("budget_exceeded")  # the opt-in time budget ran out: segment ends
                step = until if over else stop
                if step < total and (step == until or time.monotonic() - saved >= CHECKPOINT_EVERY_S):
                    save_checkpoint(self.checkpoint, algorithm, step)
                    saved = time.monotonic()
            wanted = {name: s for name, s in self.samples.items() if name in self.wanted}
            return curve, {name: data.infer(algorithm, data.sample(s)) for name, s in wanted.items()}

    def score(self, out: dict) -> tuple[dict[str, float], bool]:
        """The label-free validators' scores, and whether its target predictions collapsed."""
        s = self.samples
        inputs = validators.ValidationInputs(
            source_logits=out["val"][0],
            source_labels=torch.tensor(s["val"].label.map(self.code).to_numpy()),
            source_features=out["val"][1],
            target_logits=out["target"][0],
            target_features=out["target"][1],
            source_train_features=out["train"][1] if "train" in out else None,
            seed=self.spec.seed,
            **(
                shared_features(self.features, s["train"], s["val"], s["target"])
                if self.final or "iwa" in self.names
                else {}
            ),
        )
        scores = {k: float(v) for k, v in validators.score(inputs, self.names).items()}
        return scores, validators.is_collapsed(out["target"][0], len(self.classes))

    def commit(self, algorithm, out: dict, scores: dict[str, float], collapsed: bool, target_labels):
        """Write the model, its predictions and outputs on the samples and the report's measures; with
        `target_labels`, its target accuracy (reporting only). The manifest is returned, not yet committed."""
        spec, classes, code, out_uri = self.spec, self.classes, self.code, self.out_uri
        card = ModelCard(
            kind=spec.mode,
            method=spec.method,
            hparams=spec.hparams,
            image_size=self.data.image_size,
            classes=classes,
            config=self.cfg,
            fingerprint=self.features.fingerprint,
            dim=self.data.dim,
            weights_sha256=self.features.weights_sha256,
            config_hash=self.cfg.fingerprint(),
            dataset_fingerprint=self.source_fingerprint,
            metrics={"source_val_accuracy": scores["source_val_acc"]},
        )
        model_uri = storage.join(out_uri, "model")
        save_model(model_uri, algorithm, card)
        target = self.samples["target"]
        predictions_uri = storage.join(out_uri, "predictions.parquet")
        storage.write_table(predictions_uri, predictions_table(target, out["target"][0], classes, probabilities=True))
        test_rows = self.samples["test"]
        test_acc = (
            float((out["test"][0].argmax(1).numpy() == test_rows.label.map(code).to_numpy()).mean())
            if "test" in out and len(test_rows)
            else float("nan")
        )
        gap, embedding_uri = {}, None
        if self.final:
            gap = {
                "proxy_a_distance": domain_gap.proxy_a_distance(out["train"][1], out["target"][1], seed=spec.seed),
                "mmd": domain_gap.mmd_distance(out["train"][1], out["target"][1], seed=spec.seed),
            }
            embedding_uri = storage.join(out_uri, "embedding_sample.parquet")
            save_embedding_sample(embedding_uri, out["train"][1], out["target"][1], spec.seed)
        outputs_uri = storage.join(out_uri, "outputs.parquet")
        save_outputs(outputs_uri, self.samples["val"], out["val"][0], code)
        return CandidateManifest(
            spec=spec,
            model_uri=model_uri,
            predictions_uri=predictions_uri,
            outputs_uri=outputs_uri,
            embedding_uri=embedding_uri,
            scores=scores,
            collapsed=collapsed,
            source_test_accuracy=test_acc,
            target_accuracy=accuracy_on(target, out["target"][0], target_labels, code),
            domain_gap=gap,
            curve=[],
            steps=self.until,
            total_steps=self.total,
            labelled_trained=len(self.labelled) if self.labelled is not None else 0,
            seconds=0.0,
        )


def _committed_at(before: CandidateManifest, until: int, out_uri: str) -> CandidateManifest:
    """The candidate as it was committed at step `until`: a run repeated after this training finished asks
    each rung for the scores that rung ranked on, not the final ones, and so keeps the same survivors."""
    rung = storage.join(out_uri, f"rung-{until}.json")
    return CandidateManifest.load(rung) if before.steps > until and storage.exists(rung) else before


def stop_candidate(candidate: CandidateManifest, rung: int, out_uri: str) -> CandidateManifest:
    """Record that successive halving left `candidate` behind after `rung`; its checkpoint is deleted."""
    stopped = candidate.model_copy(update={"stopped_at_rung": rung})
    stopped.commit(storage.join(out_uri, "candidate.json"))
    for name in ("state.safetensors", "checkpoint.json"):
        uri = storage.join(out_uri, "checkpoint", name)
        if storage.exists(uri):
            storage.remove(uri)
    return stopped


def select_model(
    head: ModelManifest,
    candidates: list[CandidateManifest],
    policy: list[str],
    mix_method: str = "em",
    seed: int = 0,
    source_prior: list[float] | None = None,
    corrected_uri: str | None = None,
    labelled: tuple[pd.DataFrame, ExtractionPlan] | None = None,
) -> SelectionManifest:
    """The label-free pick among the candidates (`adapt.selection.select`: no candidate judged by what it
    optimised, never a collapsed one, never one clearly less accurate on source validation than the
    source-only reference, nor one the target's side says is worse than it), how confident it is, the
    target's class mix as the source-only reference estimates it (`adapt.priors`, by `mix_method`, against
    the class shares it trained on, `source_prior`: `training_prior`) and, for the report only, the oracle
    pick. Candidates successive halving stopped early take no part. With
    no candidates (`adapt.method: none`) the source-only head is the model.

    With `corrected_uri`, where the estimate is credible (`selection.credible`), the pick and the reference
    are written there corrected to it (`prior_corrected`), and the selection names those copies. With
    `labelled` (target images labelled for training and the features plan their rows are in), the finished
    candidates are scored on them and the pick revised by that evidence (`adapt.labelled.by_labels`)."""
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
    done = [candidates[i] for i in finished]
    mix = class_mix(done, mix_method, seed, source_prior)
    judged = selection_candidates(done)
    pick = selection.select(judged, policy, mix=mix)
    accuracy = None
    if labelled is not None:
        labels, features = labelled
        outcomes = labelled_outcomes(done, labels, features)
        pick = by_labels(pick, judged, outcomes)
        accuracy = [None] * len(candidates)
        for i, o in zip(finished, outcomes, strict=True):
            accuracy[i] = float(o.mean())
    index = finished[pick.index]
    reference = None if pick.reference is None else finished[pick.reference]
    ranks: list[float | None] = [None] * len(candidates)
    for i, r in zip(finished, pick.scores, strict=True):
        ranks[i] = r
    known = [i for i, c in enumerate(candidates) if c.target_accuracy is not None]
    oracle = max(known, key=lambda i: candidates[i].target_accuracy) if known else None
    chosen = candidates[index]
    correcting = corrected_uri is not None and pick.mix is not None
    models = {i: candidates[i].model_uri for i in (index, reference) if i is not None}
    if correcting:
        out = {i: storage.join(corrected_uri, candidates[i].spec.name) for i in models}
        models = {i: prior_corrected(uri, out[i], mix) for i, uri in models.items()}
    return SelectionManifest(
        index=index,
        name=chosen.spec.name,
        reason=pick.reason,
        policy=list(policy),
        model_uri=models[index],
        oracle_index=oracle,
        confident=pick.confident,
        confidence=pick.confidence,
        reference_index=reference,
        ranks=ranks,
        reference_model_uri=models.get(reference),
        class_mix=mix,
        prior_correction=[float(v) for v in priors.log_ratio(mix)] if correcting else None,
        labelled_accuracy=accuracy,
        n_labelled=len(labelled[0]) if labelled is not None else 0,
    )


def prior_corrected(model_uri: str, out_uri: str, mix: ClassMix) -> str:
    """Write the model at `model_uri` to `out_uri` predicting under the target's estimated class mix: its
    output layer's bias plus log q(y) / p(y) (`priors.correct`), the correction recorded on its card. Under a
    label shift alone this is Bayes' rule with the target's prior (Saerens et al. 2002); a model that already
    predicts the target's mix moves little. Returns `out_uri`."""
    model, card = load_model(model_uri)
    correction = [float(v) for v in priors.log_ratio(mix)]
    save_model(out_uri, priors.correct(model, mix), card.model_copy(update={"prior_correction": correction}))
    return out_uri


def class_mix(
    candidates: list[CandidateManifest], method: str = "em", seed: int = 0, source_prior: list[float] | None = None
) -> ClassMix | None:
    """The target's class mix as estimated from the outputs of the source-only candidate with the best
    source-validation accuracy (`adapt.priors.estimate`), against the class shares it trained on
    (`source_prior`; None: its validation images', a noisier count); None without one, or for
    candidates written before their outputs kept probabilities."""
    pool = [c for c in candidates if c.spec.method == "source_only"]
    if not pool:
        return None
    best = max(pool, key=lambda c: (c.scores.get("source_val_acc", -1.0), c.spec.mode == "images"))
    outputs = _outputs(best)
    if outputs is None:
        return None
    val_proba, val_labels, target_proba = outputs
    log = lambda p: torch.from_numpy(np.log(np.clip(p, 1e-12, None)))  # noqa: E731  logits up to a constant
    classes = load_card(best.model_uri).classes
    prior = None if source_prior is None else np.asarray(source_prior, np.float64)
    estimate = priors.estimate(
        log(val_proba), torch.from_numpy(val_labels), log(target_proba), len(classes), prior, method, seed
    )
    return ClassMix(classes=classes, model=best.spec.name, **estimate._asdict())


def training_prior(source: IngestManifest) -> list[float]:
    """The class shares of the source's training split, in the order of its classes: what every candidate
    trained on, and what a class-mix estimate is measured against."""
    labels = read_index(source).query("split == 'train'").label
    counts = labels.value_counts()
    return [float(counts.get(c, 0)) / max(len(labels), 1) for c in source.classes]


def selection_candidates(candidates: list[CandidateManifest]) -> list[selection.Candidate]:
    """What `adapt.selection.select` needs of each candidate: its scores, its algorithm's objectives,
    whether it got each source-validation image right, its probabilities on the target sample and how sure
    it is of each class on source validation (what the target's class mix is judged by)."""
    out = []
    for c in candidates:
        outputs = _outputs(c)
        out.append(
            selection.Candidate(
                name=c.spec.name,
                scores=c.scores,
                collapsed=c.collapsed,
                objectives=get_algorithm(c.spec.method).objectives,
                source_only=c.spec.method == "source_only",
                val_correct=_val_correct(c),
                target_proba=None if outputs is None else outputs[2],
                source_confidence=None if outputs is None else _confidence_by_class(outputs[0], outputs[1]),
                val_predictions=None if outputs is None else outputs[0].argmax(1),
                val_labels=None if outputs is None else outputs[1],
            )
        )
    return out


def _confidence_by_class(proba: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(C,) the mean top probability on each class's source-validation images (the overall mean for a class
    with none)."""
    top = proba.max(1)
    return np.array([top[labels == k].mean() if (labels == k).any() else top.mean() for k in range(proba.shape[1])])


def _val_correct(c: CandidateManifest) -> np.ndarray | None:
    """(Ns,) bool in image_id order, or None for a candidate written before outputs were kept."""
    if c.outputs_uri is None or not storage.exists(c.outputs_uri):
        return None
    t = storage.read_table(c.outputs_uri, columns=["image_id", "label", "prediction"]).to_pandas()
    t = t.sort_values("image_id")
    return t.label.to_numpy() == t.prediction.to_numpy()


def _outputs(c: CandidateManifest) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(source-validation probabilities (Ns, C), their labels (Ns,), target-sample probabilities (Nt, C)),
    each in image_id order; None for a candidate written before its outputs kept probabilities."""
    if c.outputs_uri is None or not storage.exists(c.outputs_uri) or not storage.exists(c.predictions_uri):
        return None
    val = storage.read_table(c.outputs_uri).to_pandas()
    target = storage.read_table(c.predictions_uri).to_pandas()
    if "probabilities" not in val or "probabilities" not in target:
        return None
    val, target = val.sort_values("image_id"), target.sort_values("image_id")
    return (
        np.stack(val.probabilities.to_numpy()).astype(np.float64),
        val.label.to_numpy(dtype=np.int64),
        np.stack(target.probabilities.to_numpy()).astype(np.float64),
    )
