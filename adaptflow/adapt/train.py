"""One training loop for every candidate, and batched inference, over rows held in bounded memory.

Rows are cached features or cached training images (`adaptflow.store.rows.ShardedRows`), or a tensor in
memory (`TensorRows`, for small sets and tests). Step t draws its batches and every random number it
uses from (seed, t) alone, so a candidate trained for 100 steps, checkpointed and resumed for 100 more
is the one an uninterrupted 200-step run gives, and the machine's load changes nothing.
"""

from __future__ import annotations

import functools
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from adaptflow import progress
from adaptflow.adapt.contract import Algorithm
from adaptflow.seeding import draws_random, seeded


class Rows(Protocol):
    def __len__(self) -> int: ...
    def gather(self, index: np.ndarray) -> Tensor: ...
    def epoch_order(self, seed: int, epoch: int) -> np.ndarray: ...
    def prefetch(self, index: np.ndarray) -> None: ...
    def batches(self, size: int) -> Iterator[tuple[np.ndarray, Tensor]]: ...


class TensorRows:
    """Rows of a tensor in memory, behind the interface of `adaptflow.store.rows.ShardedRows`."""

    def __init__(self, x: Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def gather(self, index: np.ndarray) -> Tensor:
        return self.x[torch.as_tensor(np.asarray(index, dtype=np.int64))]

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([zlib.crc32(b"adaptflow-rows"), seed, epoch]).permutation(len(self.x))

    def prefetch(self, index: np.ndarray) -> None:
        pass

    def batches(self, size: int) -> Iterator[tuple[np.ndarray, Tensor]]:
        for i in range(0, len(self.x), size):
            yield np.arange(i, min(i + size, len(self.x))), self.x[i : i + size]


def as_rows(x: Tensor | Rows) -> Rows:
    return TensorRows(x) if isinstance(x, Tensor) else x


@functools.cache
def _per_thread_counts() -> bool:
    """Does torch keep its intra-op thread count per calling thread? Yes with its OpenMP backend (the
    count is an OpenMP per-thread setting), the one CPU builds of torch for Linux use."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


PROCESS_THREADS = torch.get_num_threads()  # torch's intra-op threads when this module was imported


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's ops on this thread use `n` threads for the block, other threads unchanged; a no-op where
    the count is process-wide. For small models trained beside others on a few cores: a features-mode
    step is many tiny ops, which gain nothing from a second thread but spin-wait on a core another
    candidate is using (measured: two DANN/CDAN features-mode candidates at once on 2 cores, 18.8 s with
    2 threads each, 2.8 s with 1). On exit the thread goes back to PROCESS_THREADS, not to what it had:
    torch gives a thread that first runs an op while another thread is inside this block that thread's
    count, and the count it would restore."""
    if not _per_thread_counts():
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(PROCESS_THREADS)


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A seed for step `step`'s random draws, distinct per stream (batches, augmentation, dropout)."""
    return zlib.crc32(f"{seed}/{step}/{stream}".encode())


class Sampler:
    """Step -> the rows of that step's batch: epochs of `batch_size` rows (a ragged tail is dropped:
    BatchNorm needs more than one sample), each epoch in `rows.epoch_order(seed, epoch)`."""

    def __init__(self, rows: Rows, batch_size: int, seed: int):
        if len(rows) == 0:
            raise ValueError("cannot sample batches from no rows")
        self.rows, self.seed = rows, seed
        self.batch = min(batch_size, len(rows))
        self.per_epoch = len(rows) // self.batch
        self._epoch, self._order = -1, np.empty(0, np.int64)

    def __call__(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self.rows.epoch_order(self.seed, epoch)
        return self._order[k * self.batch : (k + 1) * self.batch]


# (a batch as stored, draw) -> the model's input on its device; `draw` keys the batch's random numbers
# (2 * step for the source batch, 2 * step + 1 for the target's)
Prepare = Callable[[Tensor, int], Tensor]


@dataclass(frozen=True)
class Loop:
    """A training loop's settings, held in one place as a Trainer holds them: a schedule of `steps`
    updates on batches of `batch_size` rows whose random draws are keyed by `seed`; the part of it one
    call runs (updates `start` .. `stop - 1`; default stop: `steps`), so that training resumes from a
    checkpoint on the same schedule; the curve's resolution (`log_every` steps); and `time_budget_s`, an
    opt-in safety net after which training stops (the curve's last entry then has `budget_exceeded` = 1)."""

    steps: int
    batch_size: int
    seed: int
    start: int = 0
    stop: int | None = None
    log_every: int = 50
    time_budget_s: float | None = None


def fit(
    algorithm: Algorithm,
    source: Tensor | Rows,
    source_y: Tensor,
    target: Tensor | Rows,
    loop: Loop,
    prepare: Prepare | None = None,
    before_step: Callable[[int], None] | None = None,
    autocast: bool = False,
) -> list[dict[str, float]]:
    """Run `loop`'s part of its schedule on (source, source_y) and unlabelled target; returns the curve,
    one dict of losses per `loop.log_every` steps (and the last), each with `step` (1-based) and
    `elapsed_s`. `prepare` turns a gathered batch into the model's input (default: the parameters' device
    and dtype); `before_step(step)` may change what trains (fine-tuning strategies). Build the algorithm
    inside `seeded` to fix its initialisation."""
    steps, seed, log_every, time_budget_s = loop.steps, loop.seed, loop.log_every, loop.time_budget_s
    source, target = as_rows(source), as_rows(target)
    p = next(algorithm.parameters())
    prepare = prepare or (lambda x, draw: x.to(p.device, p.dtype, non_blocking=True))
    src, tgt = (Sampler(rows, loop.batch_size, step_seed(seed, 0, k)) for rows, k in ((source, 1), (target, 2)))
    ys = source_y.to(p.device)
    random_steps = draws_random(algorithm)
    algorithm.train()
    curve: list[dict[str, float]] = []
    began = time.perf_counter()
    stop = steps if loop.stop is None else min(loop.stop, steps)
    for step in range(loop.start, stop):
        if before_step is not None:
            before_step(step)
        i, j = src(step), tgt(step)
        source.prefetch(src(step + 1))
        target.prefetch(tgt(step + 1))
        xs, xt = prepare(source.gather(i), 2 * step), prepare(target.gather(j), 2 * step + 1)
        with (
            seeded(step_seed(seed, step, 3)) if random_steps else nullcontext(),  # dropout, any draw inside
            torch.autocast("cuda", dtype=torch.bfloat16) if autocast and p.device.type == "cuda" else nullcontext(),
        ):
            losses = algorithm.update((xs, ys[torch.from_numpy(i).to(ys.device)]), xt)
        progress.update(step + 1, steps)
        elapsed = time.perf_counter() - began
        over = time_budget_s is not None and elapsed > time_budget_s
        if (step + 1) % log_every == 0 or step + 1 == stop or over:
            curve.append(
                {"step": step + 1, **losses, "elapsed_s": elapsed, **({"budget_exceeded": 1.0} if over else {})}
            )
        if over:
            break
    return curve


@torch.no_grad()
def infer(
    model: nn.Module, x: Tensor | Rows, batch_size: int = 1024, prepare: Prepare | None = None, autocast: bool = False
) -> tuple[Tensor, Tensor]:
    """(logits (N, C), model features (N, d)) float32 on the CPU in row order, in eval mode, reading
    `batch_size` rows at a time; the training mode is restored. `model` is an `Algorithm` or a head:
    anything with `features(x)`, `classify(z)`, `num_classes` and `feature_dim`."""
    rows = as_rows(x)
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    prepare = prepare or (lambda batch, draw: batch.to(device, torch.float32, non_blocking=True))
    was_training = model.training
    model.eval()
    logits = torch.empty(len(rows), model.num_classes)
    feats = torch.empty(len(rows), model.feature_dim)
    with torch.autocast("cuda", dtype=torch.bfloat16) if autocast and device.type == "cuda" else nullcontext():
        for index, x in rows.batches(batch_size):
            z = model.features(prepare(x, 0))
            at = torch.from_numpy(index)
            feats[at] = z.float().cpu()
            logits[at] = model.classify(z).float().cpu()
            progress.advance(len(index), "images")
    model.train(was_training)
    return logits, feats


def predict_proba(algorithm: Algorithm, x: Tensor | Rows, batch_size: int = 1024) -> Tensor:
    """(N, C) softmax probabilities on the CPU."""
    return infer(algorithm, x, batch_size)[0].softmax(1)
