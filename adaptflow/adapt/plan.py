"""Planning a run's adaptation candidates: which (method, mode, hyperparameters, seed) to train, and how much
(`adapt.budget`: steps, image size and successive halving sized to the source and the device)."""

from __future__ import annotations

import hashlib
import json
import math
from typing import NamedTuple

from adaptflow.adapt.algorithms import candidate_hparams
from adaptflow.config import Config
from adaptflow.data.ingest import read_index
from adaptflow.errors import ConfigError, lookup
from adaptflow.manifests import CandidateSpec, ExtractionPlan, IngestManifest

# End to end on a CPU: the baseline and the two strongest in benchmarks/adaptation.py on the demo shift.
CPU_IMAGE_METHODS = ["source_only", "dann", "cdan"]


class Budget(NamedTuple):
    """How much training a run's candidates get (`adapt.budget`). End to end, a candidate trains
    `image_epochs` passes over the source's training images, within the device's (fewest, most) steps: the
    same data gets the same budget on any machine, and past the cap a larger source costs no more."""

    image_epochs: int
    cpu_steps: tuple[int, int]
    gpu_steps: tuple[int, int]
    cpu_image_size: int  # end to end on a CPU (a GPU trains at the backbone's own size)
    cpu_strategy: str  # what of the backbone fine-tunes end to end on a CPU (a GPU: full)
    halving: int  # successive halving's eta (0: none)
    feature_steps: int


# quick was the default of 2026-12-04 to 2026-12-08: on benchmarks/cost.py's 5,000-image source (3,393
# training images, one thread, 48 px, partial) cdan-images reached 0.708 target accuracy at 300 steps and
# 0.796-0.805 at 480-500; at 48 px on the demo shift (benchmarks/adaptation.py, 300 steps) source_only /
# dann / cdan reached 0.550 / 0.777 / 0.737 against 0.347 for source_only at 64 px. Its 300 steps left the
# suite's small sources (480 training images) up to 40 points below the release e291a31, which trained
# about 1,250 steps at 64 px (issue 22). default trains every source 600 steps on a CPU: on the fifteen
# shifts of benchmarks/suite.py (seed 0) a mean of 0.717 against quick's 0.633 and the release's 0.506, none
# more than 2 points below the release, at 2.50x the wall of `--method none` on cost.py (2.35x at quick). See
# docs/benchmarks.md for what each budget costs and reaches.
BUDGETS: dict[str, Budget] = {
    "quick": Budget(5, (300, 500), (3000, 3000), 48, "partial", 3, 1500),
    "default": Budget(5, (600, 600), (3000, 3000), 48, "partial", 3, 1500),
    "thorough": Budget(10, (600, 2000), (3000, 6000), 64, "full", 0, 3000),
}


def budget(cfg: Config) -> Budget:
    """The run's budget, with every adapt setting that is not null in its place."""
    b = lookup(BUDGETS, "budget", cfg.adapt.budget)
    a = cfg.adapt
    return b._replace(
        halving=b.halving if a.halving is None else a.halving,
        feature_steps=a.feature_steps or b.feature_steps,
        cpu_image_size=a.image_size or b.cpu_image_size,
        cpu_strategy=a.strategy or b.cpu_strategy,
    )


def default_image_steps(n_train: int | None, batch_size: int, cuda: bool, b: Budget = BUDGETS["default"]) -> int:
    """adapt.image_steps when unset: the budget's passes over `n_train` source training images at
    `batch_size`, within the device's (fewest, most); the fewest when the count is unknown."""
    fewest, most = b.gpu_steps if cuda else b.cpu_steps
    if not n_train:
        return fewest
    return min(max(math.ceil(b.image_epochs * n_train / batch_size), fewest), most)


def training_images(source: IngestManifest) -> int:
    """How many of the source's images are in its training split (what `default_image_steps` sizes to)."""
    return int((read_index(source).split == "train").sum())


def plan_candidates(cfg: Config, cuda: bool, n_train: int | None = None) -> list[CandidateSpec]:
    """methods x modes x hyperparameter draws x seeds, each with its budget in steps (end to end, unless
    `adapt.image_steps` is set: sized to the `n_train` source training images by `default_image_steps`).
    `method: auto` trains `adapt.methods` on features and `adapt.image_methods` end to end (by default
    sized to the hardware); a named method trains that one in both modes; `none` trains nothing (the
    source-only head stands alone). With a CLIP backbone (`clip:`), a `zero_shot` candidate joins `auto`,
    and candidates train on features only."""
    a, b = cfg.adapt, budget(cfg)
    if a.method == "none":
        return []
    clip = cfg.backbone.name.startswith("clip:")
    if a.method == "auto":
        feature_methods = [*a.methods, *(["zero_shot"] if clip and "zero_shot" not in a.methods else [])]
        default = [] if clip else a.methods if cuda else CPU_IMAGE_METHODS
        image_methods = a.image_methods if a.image_methods is not None else default
    else:
        feature_methods, image_methods = [a.method], [] if clip else [a.method]
    if not clip and "zero_shot" in [*feature_methods, *image_methods]:
        raise ConfigError(f"zero_shot needs a CLIP backbone (backbone.name: clip:ARCH/TAG), not {cfg.backbone.name!r}")
    # zero_shot trains nothing: one candidate on the features, no search, no seeds, no end to end
    zero_shot = "zero_shot" in feature_methods
    feature_methods = [m for m in feature_methods if m != "zero_shot"]
    image_methods = [m for m in image_methods if m != "zero_shot"]
    if clip and image_methods:
        raise ConfigError(
            "a CLIP backbone trains on its features only (set adapt.image_methods: []): end-to-end training of "
            "its image encoder is not supported yet"
        )
    image_size = a.image_size or (_own_size(cfg) if cuda and image_methods else b.cpu_image_size)
    strategy = a.strategy or ("full" if cuda else b.cpu_strategy)
    specs = []
    for mode, methods in (("features", feature_methods), ("images", image_methods)):
        for method in methods:
            for draw in range(a.hparam_draws + 1):
                hp = candidate_hparams(method, mode, draw)
                if a.class_weighting == "online" and "class_weighting" in hp:  # the alignment methods
                    hp["class_weighting"] = "online"
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
                            steps=b.feature_steps
                            if mode == "features"
                            else a.image_steps or default_image_steps(n_train, int(hp["batch_size"]), cuda, b),
                            image_size=image_size if mode == "images" else None,
                            strategy=strategy if mode == "images" else None,
                        )
                    )
    if zero_shot:  # after the features candidates (the only ones a CLIP backbone trains)
        hp = candidate_hparams("zero_shot", "features", 0)
        hp.update({k: v for k, v in a.hparams.items() if k in hp})
        name = "zero_shot-features" + (f"-s{a.seeds[0]}" if len(a.seeds) > 1 else "")
        specs.append(
            CandidateSpec(name=name, method="zero_shot", mode="features", hparams=hp, seed=a.seeds[0], steps=1)
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


# Settings that decide where a run goes, not what its candidates learn: a change of them keeps the training.
_NOT_TRAINING = {"runtime", "tracking", "monitor", "promotion", "links", "ingest", "labeling"}


def training_key(
    cfg: Config,
    source: IngestManifest,
    target: IngestManifest,
    target_labels: IngestManifest | None,
    features: ExtractionPlan,
    fit_labels: IngestManifest | None = None,
    judge_labels: IngestManifest | None = None,
) -> str:
    """16 hex characters naming everything the candidates' training reads: the datasets' snapshots (image
    ids, labels, splits; the target labels they train on and those that rank them between rungs), the
    features and the training-image cache, the config's training settings and the code's version. The same
    command run again after an interruption has the same key, so its candidates resume from their
    checkpoints; any change of data, settings or code starts afresh."""
    from adaptflow.models.registry import code_version

    parts = {
        "source": source.fingerprint,
        "target": target.fingerprint,
        "target_labels": target_labels.fingerprint if target_labels else None,
        **({"fit_labels": fit_labels.fingerprint} if fit_labels else {}),  # absent: the keys of stores before
        **({"judge_labels": judge_labels.fingerprint} if judge_labels else {}),
        "features": features.fingerprint,
        "cache": features.cache.fingerprint if features.cache else None,
        "config": cfg.model_dump(mode="json", exclude=_NOT_TRAINING),
        "code": code_version(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
