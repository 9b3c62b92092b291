"""The contract every domain-adaptation algorithm meets (`Algorithm`), as DomainBed's `algorithms.py` base
class, and what the algorithms share: the bottleneck, the domain discriminator, freezing and the L2-SP
penalty. The algorithms themselves and their registry are `adapt.algorithms`.

Every algorithm is featurizer -> bottleneck -> linear classifier and owns its optimizer. The featurizer
is whatever maps a batch to (N, feature_dim): `nn.Identity()` on cached backbone features, or a
trainable backbone on images; its parameters learn at `lr * backbone_lr_mult`. `update` takes one
labelled source batch and one unlabelled target batch and performs one optimisation step.

When the target's class mix differs from the source's (label shift, `adapt.priors`), `use_class_mix`
gives every algorithm the estimated mix: the source losses then weigh a source image of class y by
w(y) = q(y) / p(y), so the classifier and the alignment both see a source with the target's class mix
(IWDAN / IWCDAN, Tachet des Combes et al. 2020; a class the target lacks weighs ~0, as in PADA), and IM's
diversity term spreads predictions as the estimate says, not evenly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptflow.adapt.hparams import SHARED, Hparam, defaults
from adaptflow.errors import ConfigError, lookup


def l2sp_penalty(module: nn.Module, reference_state: dict[str, Tensor]) -> Tensor:
    """L2-SP (Li et al. 2018): 0.5 * sum ||w - w0||^2 over the trainable parameters of `module` named
    in `reference_state` (the pretrained weights), pulling fine-tuning towards its starting point."""
    terms = [
        0.5 * (p - reference_state[name]).pow(2).sum()
        for name, p in module.named_parameters()
        if p.requires_grad and name in reference_state
    ]
    return torch.stack(terms).sum() if terms else next(module.parameters(), torch.zeros(())).new_zeros(())


def set_trainable(featurizer: nn.Module, trainable: bool | int) -> int:
    """Freeze or unfreeze `featurizer`; returns how many parameters are now trainable.

    True / False: everything / nothing (linear probe, then fine-tune: LP-FT). An int k unfreezes only
    the last k top-level children that hold parameters (gradual unfreezing; 0 freezes all).
    """
    if isinstance(trainable, bool):
        featurizer.requires_grad_(trainable)
    else:
        if trainable < 0:
            raise ConfigError(f"set_trainable needs a bool or a count >= 0 of blocks, got {trainable}")
        featurizer.requires_grad_(False)
        blocks = [c for c in featurizer.children() if list(c.parameters())]
        for block in blocks[max(len(blocks) - trainable, 0) :]:
            block.requires_grad_(True)
    return sum(p.numel() for p in featurizer.parameters() if p.requires_grad)


def _frozen(module: nn.Module) -> bool:
    """No parameter of `module` learns (True for a parameter-free module)."""
    return not any(p.requires_grad for p in module.parameters())


def _bottleneck(in_dim: int, dim: int, norm: str) -> nn.Module:
    if dim == 0:
        return nn.Identity()
    norms = {"bn": nn.BatchNorm1d, "ln": nn.LayerNorm}
    return nn.Sequential(nn.Linear(in_dim, dim), lookup(norms, "bottleneck_norm", norm)(dim), nn.ReLU())


def discriminator(in_dim: int, hidden: int) -> nn.Module:
    """TLlib's DomainDiscriminator: two Linear-BN-ReLU layers, then one logit (1 = source)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, 1),
    )  # fmt: skip


_OPTIMIZERS = {
    "sgd": lambda groups, hp: torch.optim.SGD(
        groups, lr=hp["lr"], momentum=0.9, nesterov=True, weight_decay=hp["weight_decay"]
    ),
    "adamw": lambda groups, hp: torch.optim.AdamW(groups, lr=hp["lr"], weight_decay=hp["weight_decay"]),
}


class Algorithm(nn.Module):
    """The contract. Subclasses implement `update`; `key` is the registry name, hence the hparams.
    `objectives` names the label-free validators (`adapt.validators.VALIDATORS`) that the algorithm's
    own training loss optimises, or comes close to: selection never scores a candidate by those, since
    a model trained to maximise a score cannot be judged by it."""

    key: ClassVar[str]
    objectives: ClassVar[frozenset[str]] = frozenset()
    space: ClassVar[dict[str, Hparam]] = SHARED  # hparam name -> (default, sampler), see `adapt.hparams`

    def __init__(
        self, featurizer: nn.Module, feature_dim: int, num_classes: int, hparams: dict[str, Any], max_steps: int
    ):
        super().__init__()
        known = defaults(self.space)
        unknown = sorted(set(hparams) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown hparams for {self.key}: {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
            )
        self.hparams = {**known, **hparams}
        lookup(_OPTIMIZERS, "optimizer", self.hparams["optimizer"])  # fail now, not at the first update
        self.num_classes, self.max_steps = num_classes, max(int(max_steps), 1)
        self.featurizer = featurizer
        self.bottleneck = _bottleneck(feature_dim, self.hparams["bottleneck_dim"], self.hparams["bottleneck_norm"])
        self.classifier = nn.Linear(self.hparams["bottleneck_dim"] or feature_dim, num_classes)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        # A plain dict, not buffers: the pretrained copy must not double every checkpoint.
        self._l2sp_ref = (
            {n: p.detach().clone() for n, p in featurizer.named_parameters()} if self.hparams["l2sp"] > 0 else {}
        )
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        # Plain attributes, not buffers: set again from the run's estimate on every (re)start, never saved
        self.class_weights: Tensor | None = None  # (C,) w(y) = q(y) / p(y) for source images
        self.target_prior: Tensor | None = None  # (C,) the target's estimated class mix q
        if self.hparams.get("class_weighting") == "online":
            # Running (exponential) averages over the training batches, kept in checkpoints: the joint of
            # (prediction, label) on the source and the mean prediction on the target (`_track_class_mix`)
            self.register_buffer("iw_joint", torch.zeros(num_classes, num_classes))
            self.register_buffer("iw_target", torch.zeros(num_classes))

    def use_class_mix(self, weights: Sequence[float] | None, prior: Sequence[float] | None = None) -> None:
        """Train for a target with another class mix: source images of class y weigh `weights[y]` in
        every source loss (classification and alignment), and IM's diversity aims at `prior`. None: the
        source's own mix (unweighted), the default."""
        self.class_weights = None if weights is None else torch.tensor(list(weights), dtype=torch.float32)
        self.target_prior = None if prior is None else torch.tensor(list(prior), dtype=torch.float32)

    def _track_class_mix(self, ls: Tensor, ys: Tensor, lt: Tensor) -> None:
        """With `class_weighting: online` (IWDAN, Tachet des Combes et al. 2020), re-estimate the class
        weights from the model's own outputs as it trains: a black-box shift estimate (`adapt.priors.bbse`)
        on running averages of the soft source joint P(pred = i, y = j) and the target's mean prediction,
        w = argmin ||J w - mu||, clipped to [0, iw_max]. Before `iw_warmup` of the steps the model is
        still the source's and the source stays unweighted, as in the unweighted method."""
        if self.hparams.get("class_weighting") != "online":
            return
        with torch.no_grad():
            c, m = self.num_classes, self.hparams["iw_momentum"]
            joint = ls.detach().float().softmax(1).T @ F.one_hot(ys, c).float() / len(ys)  # (C pred, C true)
            self.iw_joint.mul_(m).add_(joint.to(self.iw_joint), alpha=1 - m)
            self.iw_target.mul_(m).add_(lt.detach().float().softmax(1).mean(0).to(self.iw_target), alpha=1 - m)
            if int(self.num_updates) < self.hparams["iw_warmup"] * self.max_steps:
                self.class_weights = None
                return
            j, mu = self.iw_joint.double(), self.iw_target.double()  # both scaled alike: the scale cancels
            ridge = 1e-3 * j.diagonal().mean().clamp_min(1e-12) * torch.eye(c, dtype=j.dtype, device=j.device)
            w = torch.linalg.solve(j.T @ j + ridge, j.T @ mu).clamp(0.0, self.hparams["iw_max"])
            source = j.sum(0) / j.sum().clamp_min(1e-12)  # the source's class shares in the averages
            self.class_weights = (w / (w * source).sum().clamp_min(1e-12)).float().cpu()

    def _source_weights(self, ys: Tensor) -> Tensor | None:
        """(N,) the weights of a source batch's images, mean 1 over the batch; None when unweighted."""
        if self.class_weights is None:
            return None
        w = self.class_weights.to(ys.device)[ys]
        return w * (len(w) / w.sum().clamp_min(1e-12))

    def configure_optimizer(self) -> torch.optim.Optimizer:
        """Build (once) the optimizer over every parameter, featurizer at lr * backbone_lr_mult.

        Called by the first `update`; call it yourself to load an optimizer state before resuming.
        Frozen parameters are included, so unfreezing later (LP-FT) needs no new optimizer.
        """
        if self.optimizer is None:
            hp = self.hparams
            backbone = list(self._backbone_parameters())
            feat_ids = {id(p) for p in backbone}
            groups = [
                {"params": backbone, "lr": hp["lr"] * hp["backbone_lr_mult"]},
                {"params": [p for p in self.parameters() if id(p) not in feat_ids], "lr": hp["lr"]},
            ]
            groups = [g for g in groups if g["params"]]
            self.optimizer = lookup(_OPTIMIZERS, "optimizer", hp["optimizer"])(groups, hp)
            anneal = hp["lr_anneal"]
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda i: (1 + 10 * i / self.max_steps) ** -0.75 if anneal else 1.0
            )
        return self.optimizer

    def _backbone_parameters(self):
        """The parameters that learn at lr * backbone_lr_mult."""
        return self.featurizer.parameters()

    def train(self, mode: bool = True) -> Algorithm:
        """As nn.Module.train, but frozen parts of the featurizer stay in eval mode: a frozen backbone
        keeps its BatchNorm statistics and drops its dropout, as a linear probe assumes."""
        super().train(mode)
        if mode:
            if _frozen(self.featurizer):
                self.featurizer.eval()
            for m in self.featurizer.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and _frozen(m):
                    m.eval()
        return self

    def features(self, x: Tensor) -> Tensor:
        """(N, bottleneck_dim) bottleneck features, the ones validators and domain-gap measures read."""
        return self.bottleneck(self.featurizer(x))

    @property
    def feature_dim(self) -> int:
        return self.classifier.in_features

    def classify(self, z: Tensor) -> Tensor:
        """(N, C) logits from `features(x)`."""
        return self.classifier(z)

    def predict(self, x: Tensor) -> Tensor:
        """(N, C) logits."""
        return self.classify(self.features(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.predict(x)

    def _joint(self, xs: Tensor, xt: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # One forward over both domains, so BatchNorm normalises them with shared statistics.
        z = self.features(torch.cat([xs, xt]))
        logits = self.classifier(z)
        n = len(xs)
        return z[:n], z[n:], logits[:n], logits[n:]

    def _classification(self, logits: Tensor, y: Tensor) -> Tensor:
        online = self.hparams.get("class_weighting") == "online"
        w = self._source_weights(y) if not online or self.hparams["iw_classifier"] else None
        if w is None:
            return F.cross_entropy(logits, y, label_smoothing=self.hparams["label_smoothing"])
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams["label_smoothing"], reduction="none")
        return (w.to(loss) * loss).mean()

    def _step(self, loss: Tensor, **parts: Tensor) -> dict[str, float]:
        """Backward + optimizer step on `loss` (+ L2-SP); returns every part as a float."""
        optimizer = self.configure_optimizer()
        if self._l2sp_ref:
            device = next(iter(self._l2sp_ref.values())).device
            if device != loss.device:
                self._l2sp_ref = {n: w.to(loss.device) for n, w in self._l2sp_ref.items()}
            parts["l2sp"] = l2sp_penalty(self.featurizer, self._l2sp_ref)
            loss = loss + self.hparams["l2sp"] * parts["l2sp"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        self.scheduler.step()
        self.num_updates += 1  # then one device sync for all the floats below, not one per loss
        values = torch.stack([loss.detach().float(), *(v.detach().float() for v in parts.values())]).tolist()
        return dict(zip(["loss", *parts], values, strict=True))

    def update(self, source: tuple[Tensor, Tensor], target: Tensor) -> dict[str, float]:
        """One optimisation step on a labelled source batch (x (N, ...), y (N,) int64) and an unlabelled
        target batch (M, ...); returns the step's losses (and diagnostics) as finite floats."""
        raise NotImplementedError
