"""The shared maths of domain adaptation, as plain functions on tensors.

Conventions: `logits` are (N, C) raw scores, features are (N, D); per-sample quantities come back as
(N,) and batch losses as 0-d tensors, so callers choose how to reduce and weigh them.

Each docstring gives the formula, the paper, the shapes and an example (tests/test_docs_examples.py runs
them). By the methods of `adapt.algorithms` that use them:
- DANN, CDAN: `grad_reverse` and its schedule `warm_start_coeff` (Ganin & Lempitsky 2015);
  CDAN's conditioning `multilinear_map`, `RandomizedMultilinearMap` and `entropy_weights` (Long et al. 2018)
- CORAL: `coral` (Sun & Saenko 2016, as DomainBed computes it)
- MMD: `mmd` over `sq_dists` (DAN, Long et al. 2015; Gretton et al. 2012)
- MCC: `mcc_loss` (Jin et al. 2020)
- IM: `information_maximization` over `entropy` (SHOT, Liang et al. 2020; Shi & Sha 2012)
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
    """Identity forward; multiplies the gradient by `-coeff` backward (Ganin & Lempitsky 2015).

    The gradient reversal layer R of Ganin & Lempitsky 2015, "Unsupervised Domain Adaptation by
    Backpropagation" (ICML), and Ganin et al. 2016, "Domain-Adversarial Training of Neural Networks" (JMLR):
    R(x) = x forward, dR/dx = -coeff * I backward. One backward pass then trains the domain discriminator
    above it to tell the domains apart and the features below it to make them indistinguishable.

    Input: x, any shape; output: the same values, same shape.

    >>> x = torch.ones(3, requires_grad=True)
    >>> y = grad_reverse(x, coeff=0.5)
    >>> bool(torch.equal(y, x))
    True
    >>> y.sum().backward()
    >>> x.grad
    tensor([-0.5000, -0.5000, -0.5000])
    """
    return _GradientReverse.apply(x, coeff)


def warm_start_coeff(step: int, max_steps: int, lo: float = 0.0, hi: float = 1.0, alpha: float = 10.0) -> float:
    """TLlib's `WarmStartGradientReverseLayer` schedule: `lo` at step 0 rising smoothly towards `hi`.

    With `alpha=10` this is the DANN paper's 2/(1+exp(-10p)) - 1 over progress p = step/max_steps, so the
    noisy early discriminator cannot wreck the freshly initialised features.

    coeff(p) = 2 (hi - lo) / (1 + exp(-alpha p)) - (hi - lo) + lo = lo + (hi - lo) tanh(alpha p / 2), as in
    tllib/modules/grl.py; the DANN schedule is Ganin & Lempitsky 2015 (ICML) and Ganin et al. 2016 (JMLR).

    Inputs: step >= 0 and max_steps (0 counts as 1); output: a Python float, `lo` at step 0 and below `hi`.

    >>> warm_start_coeff(0, 1000)
    0.0
    >>> round(warm_start_coeff(500, 1000), 4)  # tanh(2.5)
    0.9866
    >>> round(warm_start_coeff(1000, 1000, hi=2.0), 4)  # 2 tanh(5)
    1.9998
    """
    p = step / max(max_steps, 1)
    return float(2.0 * (hi - lo) / (1.0 + math.exp(-alpha * p)) - (hi - lo) + lo)


def coral(a: Tensor, b: Tensor, weights: Tensor | None = None) -> Tensor:
    """Deep CORAL as DomainBed computes it: squared distance of means plus of covariances, both averaged.
    `weights` (Na,) >= 0 weigh the rows of `a` (class-weighted alignment: `adapt.priors.class_weights`).

    loss = mean_d (mu_a - mu_b)_d^2 + mean_(d,d') (C_a - C_b)_dd'^2, with mu the column means and C the
    unbiased covariances (X - mu)^T (X - mu) / (N - 1). Sun & Saenko 2016, "Deep CORAL: Correlation Alignment
    for Deep Domain Adaptation" (ECCV workshops), align the covariances alone, ||C_a - C_b||_F^2 / (4 D^2);
    DomainBed's CORAL (Gulrajani & Lopez-Paz 2021, "In Search of Lost Domain Generalization", ICLR) adds the
    means and averages both, and this is its loss. With weights, normalised to w summing to 1:
    mu_a = sum_i w_i a_i and C_a = sum_i w_i (a_i - mu_a)(a_i - mu_a)^T / (1 - sum_i w_i^2), the unbiased
    weighted covariance (equal weights give back the unweighted loss).

    Inputs: a (Na, D), b (Nb, D), weights (Na,) or None; output: a scalar (0-d tensor), 0 when the two
    samples share their mean and covariance.

    >>> _ = torch.manual_seed(0)
    >>> a, b = torch.randn(8, 4), torch.randn(6, 4)
    >>> coral(a, b).shape
    torch.Size([])
    >>> float(coral(a, a))
    0.0
    >>> bool(torch.isclose(coral(a, b, weights=torch.ones(8)), coral(a, b)))
    True
    """
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
    """(Nx, Ny) squared Euclidean distances between the rows of `x` and `y`.

    D_ij = ||x_i||^2 + ||y_j||^2 - 2 <x_i, y_j>, clamped at 0 against rounding.

    Inputs: x (Nx, D), y (Ny, D); output: (Nx, Ny).

    >>> sq_dists(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), torch.tensor([[0.0, 0.0], [0.0, 4.0]]))
    tensor([[ 0., 16.],
            [25.,  9.]])
    """
    # ||x||^2 + ||y||^2 - 2<x, y>: unlike cdist it has a finite gradient at zero distance.
    d = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1) - 2.0 * x @ y.T
    return d.clamp_min(0.0)


def mmd(a: Tensor, b: Tensor, kernel_mul: float = 2.0, kernel_num: int = 5, weights: Tensor | None = None) -> Tensor:
    """Biased squared MMD under a sum of `kernel_num` Gaussian kernels (DAN, Long et al. 2015).

    Bandwidths are the mean pairwise squared distance times kernel_mul**k, k centred on 0, so the family
    spans scales around the data's own; the bandwidth is detached (a statistic, not a parameter).
    `a` and `b` may have different sizes. `weights` (Na,) >= 0 make `a` the weighted sample sum_i w_i
    delta(a_i) / sum(w): the distance to the re-weighted source (class-weighted alignment).

    MMD_b^2 = mean_(i,i') k(a_i, a_i') + mean_(j,j') k(b_j, b_j') - 2 mean_(i,j) k(a_i, b_j), the biased
    (V-statistic) estimate of Gretton et al. 2012, "A Kernel Two-Sample Test" (JMLR), under the multi-kernel
    k(x, y) = sum_k exp(-||x - y||^2 / s_k) with s_k = s * kernel_mul**(k - kernel_num // 2), s the mean
    squared distance between distinct rows of [a; b]. Long et al. 2015, "Learning Transferable Features
    with Deep Adaptation Networks" (ICML), combine Gaussian kernels of several bandwidths (MK-MMD); this sum
    of equal weights, and the bandwidth rule, are those of the `guassian_kernel` widely copied from DAN's
    PyTorch ports (jindongwang/transferlearning's code/deep/DAN/mmd.py, for one). With weights:
    w^T K_aa w + mean K_bb - 2 mean_j (w^T K_ab)_j, for w normalised to sum 1.

    Inputs: a (Na, D), b (Nb, D), weights (Na,) or None; output: a scalar (0-d tensor), 0 for equal samples.

    >>> _ = torch.manual_seed(0)
    >>> a, b = torch.randn(8, 4), torch.randn(6, 4)
    >>> mmd(a, b).shape
    torch.Size([])
    >>> bool(mmd(a, b + 3.0) > mmd(a, b))  # a shifted sample is farther
    True
    >>> bool(torch.isclose(mmd(a, a.clone()), torch.tensor(0.0), atol=1e-6))
    True
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
    """(N,) Shannon entropy, in nats, of each row's softmax.

    H(p_i) = -sum_c p_ic log p_ic with p_i = softmax(logits_i), read from log_softmax; 0 for a one-hot
    prediction, log C for a uniform one. Minimised on unlabelled data it is entropy minimisation
    (Grandvalet & Bengio 2005, "Semi-supervised Learning by Entropy Minimization", NeurIPS); TLlib's
    counterpart, tllib/modules/entropy.py, reads probabilities instead of logits.

    Input: logits (N, C); output: (N,).

    >>> h = entropy(torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]))
    >>> h.shape
    torch.Size([2])
    >>> bool(torch.isclose(h[0], torch.tensor(math.log(4)))), round(float(h[1]), 6)
    (True, 0.0)
    """
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
    differ by the constant log C).

    With p_i = softmax(logits_i) and pbar = mean_i p_i: loss = mean_i H(p_i) - diversity * H(pbar), or
    mean_i H(p_i) + diversity * KL(pbar || prior). At diversity = 1 it is minus the mutual information
    between inputs and predicted labels, maximised by Krause, Perona & Gomes 2010 ("Discriminative
    Clustering by Regularized Information Maximization", NeurIPS) and, for domain adaptation, Shi & Sha
    2012 ("Information-Theoretical Learning of Discriminative Clusters for Unsupervised Domain
    Adaptation", ICML); SHOT's L_ent + L_div (Liang, Hu & Feng 2020, "Do We Really Need to Access the
    Source Data? Source Hypothesis Transfer for Unsupervised Domain Adaptation", ICML), whose
    L_div = sum_c pbar_c log pbar_c = -H(pbar). The prior is this project's.

    Inputs: logits (N, C), prior (C,) or None; output: a scalar (0-d tensor), >= -log C without a prior.

    >>> balanced = 100.0 * torch.eye(4)  # four confident predictions, one per class
    >>> round(float(information_maximization(balanced)), 4)  # -log 4, the minimum
    -1.3863
    >>> abs(float(information_maximization(balanced[[0, 0, 0, 0]]))) < 1e-6  # one class: no reward
    True
    >>> uniform = torch.full((4,), 0.25)
    >>> with_prior = information_maximization(balanced, prior=uniform)
    >>> bool(torch.isclose(with_prior, information_maximization(balanced) + math.log(4)))
    True
    """
    p = F.softmax(logits, dim=1)
    if prior is None:
        return entropy(logits).mean() - diversity * _prob_entropy(p.mean(0))
    mean = p.mean(0).clamp_min(1e-12)
    q = prior.to(mean).clamp_min(1e-12)
    return entropy(logits).mean() + diversity * (mean * (mean.log() - q.log())).sum()


def entropy_weights(logits: Tensor) -> Tensor:
    """(N,) detached weights 1 + exp(-H(p)), rescaled to mean 1: confident samples count more (CDAN-E, MCC).

    w_i = N (1 + exp(-H(p_i))) / sum_j (1 + exp(-H(p_j))); before rescaling 2 for a one-hot prediction and
    1 + 1/C for a uniform one. The entropy conditioning of CDAN+E (Long et al. 2018, "Conditional
    Adversarial Domain Adaptation", NeurIPS) and the sample weights of MCC (Jin et al. 2020), normalised as
    tllib/alignment/cdan.py and tllib/self_training/mcc.py normalise them.

    Input: logits (N, C); output: (N,), without gradient.

    >>> w = entropy_weights(torch.tensor([[100.0, 0.0], [0.0, 0.0]]))  # confident, then uniform
    >>> [round(x, 4) for x in w.tolist()]  # 2 : 1.5, rescaled to mean 1
    [1.1429, 0.8571]
    """
    w = 1.0 + torch.exp(-entropy(logits.detach()))
    return len(w) * w / w.sum()


def mcc_loss(logits: Tensor, temperature: float = 2.5) -> Tensor:
    """Minimum Class Confusion (Jin et al. 2020) on target logits.

    The class-confusion matrix P^T diag(w) P of temperature-scaled predictions, entropy-weighted per
    sample, is row-normalised; the loss is its off-diagonal mass / C, in [0, 1).

    P = softmax(logits / T), w = entropy_weights(logits / T), M = P^T diag(w) P, M'_cc' = M_cc' / sum_c'' M_cc'',
    loss = sum_(c != c') M'_cc' / C = 1 - trace(M') / C. Jin, Wang, Long & Wang 2020, "Minimum Class Confusion
    for Versatile Domain Adaptation" (ECCV). tllib/self_training/mcc.py divides by the row sums broadcast
    along the other axis; M is symmetric, so the diagonal, and the loss, are the same.

    Input: logits (N, C); output: a scalar (0-d tensor).

    >>> round(float(mcc_loss(torch.zeros(8, 4))), 4)  # uniform predictions, all confused: (C - 1) / C
    0.75
    >>> round(float(mcc_loss(100.0 * torch.eye(4))), 4)  # confident and distinct: no confusion
    0.0
    """
    c = logits.shape[1]
    p = F.softmax(logits / temperature, dim=1)  # (N, C)
    w = entropy_weights(logits / temperature).unsqueeze(1)  # (N, 1)
    confusion = (p * w).T @ p  # (C, C), symmetric
    confusion = confusion / confusion.sum(1, keepdim=True)
    return (confusion.sum() - confusion.trace()) / c


def multilinear_map(f: Tensor, g: Tensor) -> Tensor:
    """(N, D*C) outer product of features f (N, D) and predictions g (N, C): CDAN's conditioning.

    T(f, g)_i = vec(f_i g_i^T), entry (d, c) at column d*C + c: the multilinear conditioning of Long, Cao,
    Wang & Jordan 2018, "Conditional Adversarial Domain Adaptation" (NeurIPS), which shows the domain
    discriminator features and predictions jointly. TLlib's MultiLinearMap (tllib/alignment/cdan.py)
    flattens g_i f_i^T: the same entries in another order.

    >>> multilinear_map(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0, 5.0]]))
    tensor([[ 3.,  4.,  5.,  6.,  8., 10.]])
    >>> multilinear_map(torch.randn(8, 4), torch.randn(8, 3)).shape
    torch.Size([8, 12])
    """
    return (f.unsqueeze(2) * g.unsqueeze(1)).flatten(1)


class RandomizedMultilinearMap(nn.Module):
    """CDAN's random-layer variant, (R_f f) * (R_g g) / sqrt(d): a d-dim unbiased estimate of the
    multilinear map's inner products when D*C is too large. The projections are fixed buffers.

    T(f, g) = (f R_f) * (g R_g) / sqrt(d), elementwise, with R_f (D, d) and R_g (C, d) drawn once from
    N(0, 1): E <T(f, g), T(f', g')> = <f, f'> <g, g'>, the inner product of the full maps (Long et al.
    2018, "Conditional Adversarial Domain Adaptation", NeurIPS), as TLlib's RandomizedMultiLinearMap
    (tllib/alignment/cdan.py) computes it. As buffers, R_f and R_g follow the module's device and state_dict.

    forward inputs: f (N, D), g (N, C); output: (N, d), d = `output_dim`.

    >>> _ = torch.manual_seed(0)
    >>> m = RandomizedMultilinearMap(feature_dim=4, num_classes=3, output_dim=16)
    >>> m(torch.randn(8, 4), torch.randn(8, 3).softmax(1)).shape
    torch.Size([8, 16])
    >>> sorted(m.state_dict()), len(list(m.parameters()))  # fixed projections, nothing to train
    (['rf', 'rg'], 0)
    """

    def __init__(self, feature_dim: int, num_classes: int, output_dim: int = 1024):
        super().__init__()
        self.output_dim = output_dim
        self.register_buffer("rf", torch.randn(feature_dim, output_dim))
        self.register_buffer("rg", torch.randn(num_classes, output_dim))

    def forward(self, f: Tensor, g: Tensor) -> Tensor:
        return (f @ self.rf) * (g @ self.rg) / math.sqrt(self.output_dim)
