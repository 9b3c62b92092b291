"""Hyperparameters beside their search spaces, as DomainBed's `hparams_registry.py`: the samplers and
the spaces every algorithm shares. Each algorithm class holds its own space (`Algorithm.space`: hparam name
-> (default, sampler)), so its name is written once, on the class; `adapt.algorithms` reads defaults and
draws through it. Each sampler draws from its own RNG seeded by (algorithm, seed, hparam name), so adding a
knob never changes what the others draw for an existing seed.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

Sampler = Callable[[np.random.Generator], Any]


Hparam = tuple[Any, Sampler]  # (default, sampler)


def fixed(value: Any) -> Hparam:
    return value, lambda rng: value


def log_uniform(default: float, lo: float, hi: float) -> Hparam:
    """`default`, and 10**U(lo, hi) when searching."""
    return default, lambda rng: float(10 ** rng.uniform(lo, hi))


def choice(default: Any, options: list[Any]) -> Hparam:
    return default, lambda rng: options[int(rng.integers(len(options)))]


# Every algorithm's, the base of each one's `space` (`adapt.contract.Algorithm.space`)
SHARED: dict[str, Hparam] = {
    "lr": log_uniform(1e-2, -3.0, -1.5),  # SGD on the heads; the backbone gets lr * backbone_lr_mult
    "weight_decay": log_uniform(5e-4, -6.0, -2.5),
    "batch_size": choice(32, [16, 32, 64]),  # per domain: each step sees batch_size source + target
    "bottleneck_dim": choice(256, [128, 256, 512]),  # 0: no bottleneck, the classifier reads the features
    "bottleneck_norm": fixed("bn"),  # "bn" | "ln"
    "backbone_lr_mult": choice(0.1, [0.01, 0.1, 1.0]),
    "l2sp": choice(0.0, [0.0, 1e-3, 1e-2]),  # L2-SP pull towards the pretrained featurizer; 0 = off
    "optimizer": fixed("sgd"),  # "sgd" (momentum 0.9, Nesterov) | "adamw"
    "lr_anneal": fixed(True),  # DANN's lr / (1 + 10p)^0.75 over progress p
    "label_smoothing": choice(0.0, [0.0, 0.1]),
}
# Class-weighted alignment for a target whose class mix differs from the source's (`Algorithm.use_class_mix`,
# `Algorithm._track_class_mix`): "none" aligns the source as it is; "online" re-estimates the weights from
# the model's own outputs as it trains (IWDAN / IWCDAN).
CLASS_WEIGHTING: dict[str, Hparam] = {
    "class_weighting": fixed("none"),  # "none" | "online"
    "iw_momentum": fixed(0.98),  # of the running averages, per step: about the last 50 batches
    "iw_warmup": fixed(0.2),  # share of the steps trained unweighted first
    "iw_max": fixed(10.0),  # the largest weight a class gets
    "iw_classifier": fixed(True),  # the classification loss weighted too (its predictions follow the target's mix)
}


def defaults(space: dict[str, Hparam]) -> dict[str, Any]:
    """The defaults of a hyperparameter space."""
    return {k: default for k, (default, _) in space.items()}


def random_draw(key: str, space: dict[str, Hparam], seed: int) -> dict[str, Any]:
    """One random-search draw from the space of the algorithm `key`, a pure function of (key, seed)."""
    return {
        k: sampler(np.random.default_rng(zlib.crc32(f"{key}/{seed}/{k}".encode()))) for k, (_, sampler) in space.items()
    }


# End to end, the backbone needs a far larger step than on cached features: at the shared defaults
# (lr 0.01, backbone 0.001) four epochs of DANN at 64 px left the target at 0.16 and source-val at 0.65;
# lr 0.1 with the backbone at 0.3x reached 0.48 and 0.91 (benchmarks/adaptation.py, demo shift, CPU).
IMAGE_MODE_DEFAULTS: dict[str, Any] = {"lr": 0.1, "backbone_lr_mult": 0.3}
