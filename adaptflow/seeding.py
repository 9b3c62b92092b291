"""Seeding torch's global random generator when several candidates train at once on one process's threads.

torch has one global CPU generator per process, and the flow trains candidates at once on its threads:
whoever seeds it holds `seeded`'s lock until the draws that seed is for are done (a model's
initialisation, the dropout of a step that has any: `draws_random`). Unlocked, one candidate's seed
landing between another's seed and its draws changed that one's model with the machine's timing
(tests/test_adapt_candidates.py shows it). The library's other users of the generator take the lock too
(building a backbone, `extract.backbones`) or keep their own (DataLoaders, `data.preprocess.make_loader`).
A step that draws nothing takes no lock, so a features-mode candidate never waits on an end-to-end step.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

_GLOBAL_RNG = threading.Lock()
_DRAWING_MODULES = (nn.modules.dropout._DropoutNd, nn.RReLU)
_DRAW_RATES = ("drop_rate", "drop_prob")  # timm: a model's functional head dropout, DropPath


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's global generator seeded with `seed` and drawn from by this thread alone for the block."""
    with _GLOBAL_RNG:
        manual_seed(seed)
        yield


def manual_seed(seed: int) -> None:
    """`torch.manual_seed` without its cost when CUDA is not in use: torch.manual_seed also queues a lazy
    seeding of every accelerator backend (CUDA, XPU, MTIA), each formatting a stack trace, ~1 ms a call:
    a sixth of a features-mode step, seeded at every step. Seeds CUDA too once it is initialised."""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


def draws_random(model: nn.Module) -> bool:
    """Does a training step of `model` draw from torch's global generator? True for dropout-like modules
    (torch's, timm's DropPath, a timm model's head dropout) with a rate above 0, and for a model that says
    so (`draws_random = True`, e.g. an algorithm whose update samples). A step that draws nothing needs
    neither a seed nor the lock, so it never waits on another thread's candidate;
    tests/test_seeding.py runs every algorithm's step and checks that the generator did not move."""
    for m in model.modules():
        if getattr(m, "draws_random", False) is True:
            return True
        if isinstance(m, _DRAWING_MODULES) and (not hasattr(m, "p") or m.p > 0):
            return True
        if any(isinstance(getattr(m, a, None), float | int) and getattr(m, a) > 0 for a in _DRAW_RATES):
            return True
    return False
