"""The shared maths of domain adaptation, as plain functions on tensors.

Conventions: `logits` are (N, C) raw scores, features are (N, D); per-sample quantities come back as
(N,) and batch losses as 0-d tensors, so callers choose how to reduce and weigh them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _GradientReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, coeff: float) -> Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.coeff * grad, None


def grad_reverse(x: Tensor, coeff: float = 1.0) -> Tensor:
    """Identity forward; multiplies the gradient by `-coeff` backward (Ganin & Lempitsky 2015)."""
    return _GradientReverse.apply(x, coeff)


def warm_start_coeff(step: int, max_steps: int, lo: float = 0.0, hi: float = 1.0, alpha: float = 10.0) -> float:
    """TLlib's `WarmStartGradientReverseLayer` schedule: `lo` at step 0 rising smoothly towards `hi`.

    With `alpha=10` this is the DANN paper's 2/(1+exp(-10p)) - 1 over progress p = step/max_steps, so the
    noisy early discriminator cannot wreck the freshly initialised features.
    """
    p = step / max(max_steps, 1)
    return float(2.0 * (hi - lo) / (1.0 + math.exp(-alpha * p)) - (hi - lo) + lo)


def coral(a: Tensor, b: Tensor, weights: Tensor | None = None) -> Tensor:
    """Deep CORAL as DomainBed computes it: squared distance of means plus of covariances, both averaged.
    `weights` (Na,) >= 0 weigh the rows of `a` (class-weighted alignment: `adapt.priors.class_weights`)."""
    if weights is None:
        mean_a = a.mean(0, keepdim=True)
        cent_a = a - mean_a
        cov_a = cent_a.T @ cent_a / max(len(a) - 1, 1)  # (D, D)
    else:
        w = (weights / weights.sum().clamp_min(1e-12)).unsqueeze(1)  # (Na, 1), sums to 1
        mean_a = (w * a).sum(0, keepdim=True)
        cent_a = a - mean_a
        cov_a = (w * cent_a).T @ cent_a / (1 - w.pow(2).sum()).clamp_min(1e-6)  # unbiased weighted covariance
    mean_b = b.mean(0, keepdim=True)
    cent_b = b - mean_b
    cov_b = cent_b.T @ cent_b / max(len(b) - 1, 1)
    return (mean_a - mean_b).pow(2).mean() + (cov_a - cov_b).pow(2).mean()


def sq_dists(x: Tensor, y: Tensor) -> Tensor:
    """(Nx, Ny) squared Euclidean distances between the rows of `x` and `y`."""
    # ||x||^2 + ||y||^2 - 2<x, y>: unlike cdist it has a finite gradient at zero distance.
    d = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1) - 2.0 * x @ y.T
    return d.clamp_min(0.0)


def mmd(a: Tensor, b: Tensor, kernel_mul: float = 2.0, kernel_num: int = 5, weights: Tensor | None = None) -> Tensor:
    """Biased squared MMD under a sum of `kernel_num` Gaussian kernels (DAN, Long et al. 2015).

    Bandwidths are the mean pairwise squared distance times kernel_mul**k, k centred on 0, so the family
    spans scales around the data's own; the bandwidth is detached (a statistic, not a parameter).
    `a` and `b` may have different sizes. `weights` (Na,) >= 0 make `a` the weighted sample sum_i w_i
    delta(a_i) / sum(w): the distance to the re-weighted source (class-weighted alignment).
    """
    x = torch.cat([a, b])
    d = sq_dists(x, x)  # (Na+Nb, Na+Nb)
    n = len(x)
    base = d.detach().sum() / max(n * n - n, 1) / kernel_mul ** (kernel_num // 2)
    base = base.clamp_min(1e-12)
    k = sum(torch.exp(-d / (base * kernel_mul**i)) for i in range(kernel_num))
    na = len(a)
    if weights is None:
        return k[:na, :na].mean() + k[na:, na:].mean() - 2.0 * k[:na, na:].mean()
    w = weights / weights.sum().clamp_min(1e-12)  # (Na,)
    return w @ k[:na, :na] @ w + k[na:, na:].mean() - 2.0 * (w @ k[:na, na:]).mean()


def entropy(logits: Tensor) -> Tensor:
    """(N,) Shannon entropy, in nats, of each row's softmax."""
    logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(1)


def _prob_entropy(p: Tensor) -> Tensor:
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)


def information_maximization(logits: Tensor, diversity: float = 1.0, prior: Tensor | None = None) -> Tensor:
    """SHOT's IM loss, to minimise: mean per-sample entropy minus `diversity` x entropy of the mean
    prediction. Confident (low first term) and class-balanced (high second term) predictions score low;
    a model that predicts one class everywhere loses the diversity reward. With a `prior` (C,), the
    target's estimated class mix (`adapt.priors`), the diversity term is -KL(mean prediction || prior)
    instead: predictions spread as the target's classes are, not evenly (for a uniform prior the two
    differ by the constant log C)."""
    p = F.softmax(logits, dim=1)
    if prior is None:
        return entropy(logits).mean() - diversity * _prob_entropy(p.mean(0))
    mean = p.mean(0).clamp_min(1e-12)
    q = prior.to(mean).clamp_min(1e-12)
    return entropy(logits).mean() + diversity * (mean * (mean.log() - q.log())).sum()


def entropy_weights(logits: Tensor) -> Tensor:
    """(N,) detached weights 1 + exp(-H(p)), rescaled to mean 1: confident samples count more (CDAN-E, MCC)."""
    w = 1.0 + torch.exp(-entropy(logits.detach()))
    return len(w) * w / w.sum()


def mcc_loss(logits: Tensor, temperature: float = 2.5) -> Tensor:
    """Minimum Class Confusion (Jin et al. 2020) on target logits.

    The class-confusion matrix P^T diag(w) P of temperature-scaled predictions, entropy-weighted per
    sample, is row-normalised; the loss is its off-diagonal mass / C, in [0, 1).
    """
    c = logits.shape[1]
    p = F.softmax(logits / temperature, dim=1)  # (N, C)
    w = entropy_weights(logits / temperature).unsqueeze(1)  # (N, 1)
    confusion = (p * w).T @ p  # (C, C), symmetric
    confusion = confusion / confusion.sum(1, keepdim=True)
    return (confusion.sum() - confusion.trace()) / c


def multilinear_map(f: Tensor, g: Tensor) -> Tensor:
    """(N, D*C) outer product of features f (N, D) and predictions g (N, C): CDAN's conditioning."""
    return (f.unsqueeze(2) * g.unsqueeze(1)).flatten(1)


class RandomizedMultilinearMap(nn.Module):
    """CDAN's random-layer variant, (R_f f) * (R_g g) / sqrt(d): a d-dim unbiased estimate of the
    multilinear map's inner products when D*C is too large. The projections are fixed buffers."""

    def __init__(self, feature_dim: int, num_classes: int, output_dim: int = 1024):
        super().__init__()
        self.output_dim = output_dim
        self.register_buffer("rf", torch.randn(feature_dim, output_dim))
        self.register_buffer("rg", torch.randn(num_classes, output_dim))

    def forward(self, f: Tensor, g: Tensor) -> Tensor:
        return (f @ self.rf) * (g @ self.rg) / math.sqrt(self.output_dim)
