"""Classifier heads trained on cached source features: the source-only baseline of every run."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from adaptflow import progress
from adaptflow.config import HeadConfig
from adaptflow.seeding import seeded


class Head(nn.Module):
    """Standardise features with source statistics, then a linear layer or a one-hidden-layer MLP."""

    def __init__(self, dim: int, num_classes: int, kind: str = "linear", hidden_dim: int = 512, dropout: float = 0.0):
        super().__init__()
        self.num_classes, self.feature_dim = num_classes, dim
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        if kind == "linear":
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_classes))
        else:
            self.net = nn.Sequential(
                nn.Linear(dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, num_classes)
            )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised input: what validators and domain-gap measures read for a head."""
        return (x - self.mean) / self.std

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """Logits from `features(x)`."""
        return self.net(z)

    @property
    def classifier(self) -> nn.Linear:
        """The output layer, named as an adaptation `Algorithm` names its own (`adapt.priors.correct`)."""
        return self.net[-1]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict(x)


def train_head(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    num_classes: int,
    cfg: HeadConfig,
    seed: int = 0,
) -> tuple[Head, list[dict]]:
    """Train with AdamW and keep the epoch with the best source-validation accuracy (ties: lower loss);
    stop after `cfg.patience` epochs without a better accuracy. Returns the head and its per-epoch curve."""
    with seeded(seed):  # its initialisation and dropout draw from torch's global generator: a few seconds
        xt, yt = torch.tensor(x_train, dtype=torch.float32), torch.tensor(y_train, dtype=torch.long)
        xv, yv = torch.tensor(x_val, dtype=torch.float32), torch.tensor(y_val, dtype=torch.long)
        head = Head(xt.shape[1], num_classes, cfg.kind, cfg.hidden_dim, cfg.dropout)
        head.mean.copy_(xt.mean(0))
        head.std.copy_(xt.std(0).clamp_min(1e-6))
        opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(seed)

        best, best_state, stale, curve = (-1.0, float("inf")), None, 0, []
        for epoch in range(cfg.max_epochs):
            head.train()
            for batch in torch.randperm(len(xt), generator=gen).split(cfg.batch_size):
                loss = nn.functional.cross_entropy(head(xt[batch]), yt[batch])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            val_acc, val_loss = _score(head, xv, yv)
            progress.update(epoch + 1, cfg.max_epochs)
            curve.append({"epoch": epoch, "train_loss": loss.item(), "val_acc": val_acc, "val_loss": val_loss})
            # Patience runs on accuracy alone: on well-separated data the loss creeps down for ever.
            stale = 0 if val_acc > best[0] else stale + 1
            if (val_acc, -val_loss) > (best[0], -best[1]):
                best, best_state = (val_acc, val_loss), copy.deepcopy(head.state_dict())
            if stale >= cfg.patience:
                progress.update(epoch + 1, epoch + 1)  # stopped early: this is all there is to do
                break
        head.load_state_dict(best_state)
        return head.eval(), curve


@torch.inference_mode()
def _score(head: Head, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    head.eval()
    logits = head(x)
    return float((logits.argmax(-1) == y).float().mean()), float(nn.functional.cross_entropy(logits, y))
