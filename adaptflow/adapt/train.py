"""A flat training loop over in-memory tensors (the cached-feature mode), and batched inference.

The image mode feeds `Algorithm.update` from DataLoaders instead; nothing here is needed for it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from adaptflow import progress
from adaptflow.adapt.algorithms import Algorithm


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless shuffled index batches of one size; each epoch drops its ragged tail (BatchNorm needs > 1)."""
    b = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - b + 1, b):
            yield perm[i : i + b]


def fit(
    algorithm: Algorithm,
    source_x: Tensor,
    source_y: Tensor,
    target_x: Tensor,
    steps: int,
    batch_size: int,
    seed: int,
    log_every: int = 50,
) -> list[dict[str, float]]:
    """Run `steps` updates on (source_x, source_y) and unlabelled target_x; returns the training curve,
    one dict of losses per `log_every` steps (and the last). `seed` fixes the batch order only: seed
    torch yourself before building the algorithm to fix its initialisation."""
    g = torch.Generator().manual_seed(seed)
    src, tgt = _batches(len(source_x), batch_size, g), _batches(len(target_x), batch_size, g)
    p = next(algorithm.parameters())  # features may be cached as float16: compute in the model's dtype
    algorithm.train()
    curve = []
    for step in range(1, steps + 1):
        i, j = next(src), next(tgt)
        xs, xt = source_x[i].to(p.device, p.dtype), target_x[j].to(p.device, p.dtype)
        losses = algorithm.update((xs, source_y[i].to(p.device)), xt)
        progress.update(step, steps)
        if step % log_every == 0 or step == steps:
            curve.append({"step": step, **losses})
    return curve


@torch.no_grad()
def infer(algorithm: Algorithm, x: Tensor, batch_size: int = 1024) -> tuple[Tensor, Tensor]:
    """(logits (N, C), bottleneck features (N, d)) on the CPU, in eval mode; the mode is restored."""
    was_training = algorithm.training
    algorithm.eval()
    p = next(algorithm.parameters())
    logits, feats = [], []
    for chunk in x.split(batch_size):
        z = algorithm.features(chunk.to(p.device, p.dtype))
        feats.append(z.cpu())
        logits.append(algorithm.classifier(z).cpu())
    algorithm.train(was_training)
    return torch.cat(logits), torch.cat(feats)


def predict_proba(algorithm: Algorithm, x: Tensor, batch_size: int = 1024) -> Tensor:
    """(N, C) softmax probabilities on the CPU."""
    return infer(algorithm, x, batch_size)[0].softmax(1)
