"""Seeding torch's global random generator when several candidates train at once on one process's threads.

torch has one global CPU generator per process, and the flow trains candidates at once on its threads:
whoever seeds it holds `seeded`'s lock until the draws that seed is for are done (a model's
initialisation, a step's dropout). Unlocked, one candidate's seed landing between another's seed and its
draws changed that one's model with the machine's timing (measured: three features-mode candidates of
the demo scored differently from one run to the next, while each trained alone gave the same numbers).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_GLOBAL_RNG = threading.Lock()


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's global generator seeded with `seed` and drawn from by this thread alone for the block."""
    with _GLOBAL_RNG:
        torch.manual_seed(seed)
        yield
