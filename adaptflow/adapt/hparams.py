"""Hyperparameters beside their search spaces, as DomainBed's `hparams_registry.py`.

One table: algorithm name -> hparam name -> (default, sampler). `default_hparams` and `random_hparams`
read the same table. Each sampler draws from its own RNG seeded by (algorithm, seed, hparam name), so
adding a knob never changes what the others draw for an existing seed.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from adaptflow.errors import lookup

Sampler = Callable[[np.random.Generator], Any]


def _fixed(value: Any) -> tuple[Any, Sampler]:
    return value, lambda rng: value


def _log_uniform(default: float, lo: float, hi: float) -> tuple[float, Sampler]:
    """`default`, and 10**U(lo, hi) when searching."""
    return default, lambda rng: float(10 ** rng.uniform(lo, hi))


def _choice(default: Any, options: list[Any]) -> tuple[Any, Sampler]:
    return default, lambda rng: options[int(rng.integers(len(options)))]


_SHARED: dict[str, tuple[Any, Sampler]] = {
    "lr": _log_uniform(1e-2, -3.0, -1.5),  # SGD on the heads; the backbone gets lr * backbone_lr_mult
    "weight_decay": _log_uniform(5e-4, -6.0, -2.5),
    "batch_size": _choice(32, [16, 32, 64]),  # per domain: each step sees batch_size source + target
    "bottleneck_dim": _choice(256, [128, 256, 512]),  # 0: no bottleneck, the classifier reads the features
    "bottleneck_norm": _fixed("bn"),  # "bn" | "ln"
    "backbone_lr_mult": _choice(0.1, [0.01, 0.1, 1.0]),
    "l2sp": _choice(0.0, [0.0, 1e-3, 1e-2]),  # L2-SP pull towards the pretrained featurizer; 0 = off
    "optimizer": _fixed("sgd"),  # "sgd" (momentum 0.9, Nesterov) | "adamw"
    "lr_anneal": _fixed(True),  # DANN's lr / (1 + 10p)^0.75 over progress p
    "label_smoothing": _choice(0.0, [0.0, 0.1]),
}
# Class-weighted alignment for a target whose class mix differs from the source's (`Algorithm.use_class_mix`,
# `Algorithm._track_class_mix`): "none" aligns the source as it is; "online" re-estimates the weights from
# the model's own outputs as it trains (IWDAN / IWCDAN).
_CLASS_WEIGHTING: dict[str, tuple[Any, Sampler]] = {
    "class_weighting": _fixed("none"),  # "none" | "online"
    "iw_momentum": _fixed(0.98),  # of the running averages, per step: about the last 50 batches
    "iw_warmup": _fixed(0.2),  # share of the steps trained unweighted first
    "iw_max": _fixed(10.0),  # the largest weight a class gets
    "iw_classifier": _fixed(True),  # the classification loss weighted too (its predictions follow the target's mix)
}
_ADVERSARIAL: dict[str, tuple[Any, Sampler]] = {
    "lambda": _log_uniform(1.0, -1.0, 0.5),
    "disc_hidden": _choice(256, [256, 512, 1024]),
    "grl_alpha": _fixed(10.0),  # warm-start steepness of the gradient-reversal coefficient
    **_CLASS_WEIGHTING,
}

HPARAMS: dict[str, dict[str, tuple[Any, Sampler]]] = {
    "source_only": {**_SHARED},
    "dann": {**_SHARED, **_ADVERSARIAL},
    "cdan": {
        **_SHARED,
        **_ADVERSARIAL,
        "entropy_conditioning": _fixed(True),  # CDAN+E
        "randomized": _fixed(False),  # random multilinear layer instead of the (D*C) outer product
        "randomized_dim": _fixed(1024),
    },
    "coral": {**_SHARED, **_CLASS_WEIGHTING, "lambda": _log_uniform(1.0, -1.0, 1.0)},
    "mmd": {
        **_SHARED,
        **_CLASS_WEIGHTING,
        "lambda": _log_uniform(1.0, -1.0, 1.0),
        "kernel_num": _choice(5, [3, 5, 7]),
        "kernel_mul": _fixed(2.0),
    },
    "mcc": {
        **_SHARED,
        "lambda": _log_uniform(1.0, -0.5, 0.5),
        "temperature": _choice(2.5, [1.5, 2.0, 2.5, 3.0, 3.5]),
    },
    "im": {
        **_SHARED,
        "lambda": _log_uniform(1.0, -1.0, 0.5),
        "diversity": _choice(1.0, [0.5, 1.0, 2.0]),
    },
    "mme": {
        **_SHARED,
        "lambda": _log_uniform(0.1, -2.0, 0.0),  # the paper's 0.1
        "temperature": _choice(0.05, [0.05, 0.1]),  # of the cosine classifier
    },
    # nothing trains: no bottleneck between the image embeddings and the prompts' (`algorithms.ZeroShot`)
    "zero_shot": {**_SHARED, "bottleneck_dim": _fixed(0)},
    "adda": {
        **_SHARED,
        "lambda": _log_uniform(1.0, -1.0, 0.5),  # weight of the target encoder's fooling loss
        "disc_hidden": _choice(256, [256, 512, 1024]),
        "pretrain_fraction": _choice(0.5, [0.3, 0.5, 0.7]),  # of max_steps spent on the source encoder
        "source_cls": _choice(1.0, [0.0, 1.0]),  # source labels through the target encoder (0: as the paper)
    },
}


def check_hparam(name: str) -> str:
    """`name` if some algorithm has a hyperparameter of that name; else an UnknownNameError listing them."""
    known = {k: None for table in HPARAMS.values() for k in table}
    lookup(known, "hyperparameter", name)
    return name


def default_hparams(algorithm: str) -> dict[str, Any]:
    """The defaults of `algorithm`'s hyperparameters."""
    return {k: default for k, (default, _) in lookup(HPARAMS, "algorithm", algorithm).items()}


def random_hparams(algorithm: str, seed: int) -> dict[str, Any]:
    """One random-search draw, a pure function of (algorithm, seed)."""
    table = lookup(HPARAMS, "algorithm", algorithm)
    return {
        k: sampler(np.random.default_rng(zlib.crc32(f"{algorithm}/{seed}/{k}".encode())))
        for k, (_, sampler) in table.items()
    }


# End to end, the backbone needs a far larger step than on cached features: at the shared defaults
# (lr 0.01, backbone 0.001) four epochs of DANN at 64 px left the target at 0.16 and source-val at 0.65;
# lr 0.1 with the backbone at 0.3x reached 0.48 and 0.91 (benchmarks/adaptation.py, demo shift, CPU).
IMAGE_MODE_DEFAULTS: dict[str, Any] = {"lr": 0.1, "backbone_lr_mult": 0.3}


def candidate_hparams(algorithm: str, mode: str, draw: int) -> dict[str, Any]:
    """Draw 0: the defaults (with the end-to-end overrides in images mode); draw k > 0: random draw k."""
    if draw:
        return random_hparams(algorithm, draw)
    return {**default_hparams(algorithm), **(IMAGE_MODE_DEFAULTS if mode == "images" else {})}
