"""Domain-adaptation algorithms behind one contract (`adapt.contract.Algorithm`), and their registry
(`ALGORITHMS`), as DomainBed's `algorithms.py`.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from adaptflow.adapt import losses
from adaptflow.adapt.contract import Algorithm, discriminator
from adaptflow.adapt.hparams import (
    CLASS_WEIGHTING,
    IMAGE_MODE_DEFAULTS,
    SHARED,
    choice,
    defaults,
    fixed,
    log_uniform,
    random_draw,
)
from adaptflow.errors import lookup


class SourceOnly(Algorithm):
    """Empirical risk minimisation on the source domain; the target batch is ignored."""

    key = "source_only"

    def update(self, source: tuple[Tensor, Tensor], target: Tensor) -> dict[str, float]:
        xs, ys = source
        cls = self._classification(self.predict(xs), ys)
        return self._step(cls, cls_loss=cls)


class AbstractAdversarial(Algorithm):
    """A domain discriminator behind a warm-started gradient reversal, so the features learn to fool it.

    Unconditional (DANN) it reads bottleneck features. Conditional (CDAN) it reads their multilinear
    map with the detached predictions, optionally through a random layer, and with entropy
    conditioning (CDAN+E) confident samples weigh more in the domain loss.
    """

    space = {
        **SHARED,
        "lambda": log_uniform(1.0, -1.0, 0.5),
        "disc_hidden": choice(256, [256, 512, 1024]),
        "grl_alpha": fixed(10.0),  # warm-start steepness of the gradient-reversal coefficient
        **CLASS_WEIGHTING,
    }

    conditional: ClassVar[bool]

    def __init__(self, featurizer, feature_dim, num_classes, hparams, max_steps):
        super().__init__(featurizer, feature_dim, num_classes, hparams, max_steps)
        dim, hp = self.classifier.in_features, self.hparams
        self.random_map = None
        if self.conditional and hp["randomized"]:
            self.random_map = losses.RandomizedMultilinearMap(dim, num_classes, hp["randomized_dim"])
            dim = hp["randomized_dim"]
        elif self.conditional:
            dim *= num_classes
        self.discriminator = discriminator(dim, hp["disc_hidden"])

    def update(self, source: tuple[Tensor, Tensor], target: Tensor) -> dict[str, float]:
        xs, ys = source
        zs, zt, ls, lt = self._joint(xs, target)
        self._track_class_mix(ls, ys, lt)
        cls = self._classification(ls, ys)
        h, logits, weight = torch.cat([zs, zt]), torch.cat([ls, lt]), None
        if self.conditional:
            g = F.softmax(logits, dim=1).detach()
            h = self.random_map(h, g) if self.random_map is not None else losses.multilinear_map(h, g)
            if self.hparams["entropy_conditioning"]:
                weight = losses.entropy_weights(logits)
        coeff = losses.warm_start_coeff(int(self.num_updates), self.max_steps, alpha=self.hparams["grl_alpha"])
        d = self.discriminator(losses.grad_reverse(h, coeff)).squeeze(1)  # (Ns+Nt,) logits, 1 = source
        domain = torch.cat([torch.ones(len(zs)), torch.zeros(len(zt))]).to(d)
        ws = self._source_weights(ys)
        if ws is not None:  # IWDAN / IWCDAN: the discriminator sees the re-weighted source
            ws = torch.cat([ws, torch.ones(len(zt), device=ws.device)]).to(d)
            weight = ws if weight is None else weight * ws
        transfer = F.binary_cross_entropy_with_logits(d, domain, weight=weight)
        disc_acc = ((d > 0).to(d) == domain).float().mean()
        loss = cls + self.hparams["lambda"] * transfer
        return self._step(loss, cls_loss=cls, transfer_loss=transfer, disc_acc=disc_acc)


class DANN(AbstractAdversarial):
    """Domain-adversarial neural network (Ganin et al. 2016)."""

    key = "dann"
    conditional = False


class CDAN(AbstractAdversarial):
    """Conditional domain-adversarial network (Long et al. 2018)."""

    key = "cdan"
    space = {
        **AbstractAdversarial.space,
        "entropy_conditioning": fixed(True),  # CDAN+E
        "randomized": fixed(False),  # random multilinear layer instead of the (D*C) outer product
        "randomized_dim": fixed(1024),
    }
    conditional = True


class AbstractMMD(Algorithm):
    """Source cross-entropy plus `lambda` x a distribution distance between source and target
    bottleneck features: multi-kernel Gaussian MMD (DAN) when `gaussian`, else CORAL."""

    gaussian: ClassVar[bool]

    def update(self, source: tuple[Tensor, Tensor], target: Tensor) -> dict[str, float]:
        xs, ys = source
        zs, zt, ls, lt = self._joint(xs, target)
        self._track_class_mix(ls, ys, lt)
        cls = self._classification(ls, ys)
        ws = self._source_weights(ys)
        if self.gaussian:
            transfer = losses.mmd(zs, zt, self.hparams["kernel_mul"], self.hparams["kernel_num"], weights=ws)
        else:
            transfer = losses.coral(zs, zt, weights=ws)
        return self._step(cls + self.hparams["lambda"] * transfer, cls_loss=cls, transfer_loss=transfer)


class CORAL(AbstractMMD):
    """Deep CORAL (Sun & Saenko 2016)."""

    key = "coral"
    space = {**SHARED, **CLASS_WEIGHTING, "lambda": log_uniform(1.0, -1.0, 1.0)}
    gaussian = False


class MMD(AbstractMMD):
    """Multi-kernel MMD alignment (DAN, Long et al. 2015)."""

    key = "mmd"
    space = {
        **SHARED,
        **CLASS_WEIGHTING,
        "lambda": log_uniform(1.0, -1.0, 1.0),
        "kernel_num": choice(5, [3, 5, 7]),
        "kernel_mul": fixed(2.0),
    }
    gaussian = True


class MCC(Algorithm):
    """Source cross-entropy plus Minimum Class Confusion on the target predictions (Jin et al. 2020)."""

    key = "mcc"
    space = {
        **SHARED,
        "lambda": log_uniform(1.0, -0.5, 0.5),
        "temperature": choice(2.5, [1.5, 2.0, 2.5, 3.0, 3.5]),
    }
    # Less confusion between classes = confident, diverse target predictions: what BNM, IM, entropy and
    # SND reward.
    objectives = frozenset({"bnm", "im", "entropy", "snd"})

    def update(self, source: tuple[Tensor, Tensor], target: Tensor) -> dict[str, float]:
        xs, ys = source
        _, _, ls, lt = self._joint(xs, target)
        cls = self._classification(ls, ys)
        transfer = losses.mcc_loss(lt, self.hparams["temperature"])
        return self._step(cls + self.hparams["lambda"] * transfer, cls_loss=cls, transfer_loss=transfer)


class IM(Algorithm):
    """Source cross-entropy plus information maximisation on the target (SHOT's entropy + diversity)."""

    key = "im"
    space = {**SHARED, "lambda": log_uniform(1.0, -1.0, 0.5), "diversity": choice(1.0, [0.5, 1.0, 2.0])}
    objectives = frozenset({"im", "entropy", "bnm", "snd"})  # IM, and what confident, diverse predictions score

    def update(self, source: tuple[Tensor, Tensor], target: Tensor) -> dict[str, float]:
        xs, ys = source
        _, _, ls, lt = self._joint(xs, target)
        cls = self._classification(ls, ys)
        transfer = losses.information_maximization(lt, self.hparams["diversity"], self.target_prior)
        return self._step(cls + self.hparams["lambda"] * transfer, cls_loss=cls, transfer_loss=transfer)


class MME(Algorithm):
    """Minimax entropy (Saito et al. 2019), made for a few target labels: cosine-classifier prototypes raise
    the unlabelled target's prediction entropy while the features, behind a gradient reversal, lower it."""

    key = "mme"
    space = {
        **SHARED,
        "lambda": log_uniform(0.1, -2.0, 0.0),  # the paper's 0.1
        "temperature": choice(0.05, [0.05, 0.1]),  # of the cosine classifier
    }
    objectives = frozenset({"entropy", "im"})  # the features minimise the target's entropy

    def classify(self, z: Tensor) -> Tensor:
        return F.linear(F.normalize(z), F.normalize(self.classifier.weight)) / self.hparams["temperature"]

    def update(self, source: tuple[Tensor, Tensor], target: Tensor) -> dict[str, float]:
        xs, ys = source
        z = self.features(torch.cat([xs, target]))
        cls = self._classification(self.classify(z[: len(xs)]), ys)
        p = self.classify(losses.grad_reverse(z[len(xs) :])).softmax(1)
        transfer = (p * torch.log(p + 1e-5)).sum(1).mean()  # minus the entropy, minimised by the prototypes
        return self._step(cls + self.hparams["lambda"] * transfer, cls_loss=cls, transfer_loss=transfer)


class ADDA(Algorithm):
    """Adversarial discriminative domain adaptation (Tzeng et al. 2017), the GAN-style asymmetric method.

    Two phases within one step budget. For the first `pretrain_fraction` of `max_steps` the source encoder
    (featurizer + bottleneck) and the classifier learn the source labels. Then a separate target encoder,
    initialised from the source one, learns to fool a discriminator that tells the frozen source
    encoder's features (label 1) from its own (label 0), with the GAN's inverted-label loss; the
    classifier stays fixed, so target features are mapped into the space it was trained on. From then on
    `features` (and so `predict`) use the target encoder. `source_cls` > 0 keeps the target encoder
    accurate on source images too (0: the paper's method). One optimizer step updates the discriminator
    on detached features and the target encoder through the discriminator's detached weights, so
    neither objective leaks into the other's parameters.
    """

    key = "adda"
    space = {
        **SHARED,
        "lambda": log_uniform(1.0, -1.0, 0.5),  # weight of the target encoder's fooling loss
        "disc_hidden": choice(256, [256, 512, 1024]),
        "pretrain_fraction": choice(0.5, [0.3, 0.5, 0.7]),  # of max_steps spent on the source encoder
        "source_cls": choice(1.0, [0.0, 1.0]),  # source labels through the target encoder (0: as the paper)
    }

    def __init__(self, featurizer, feature_dim, num_classes, hparams, max_steps):
        super().__init__(featurizer, feature_dim, num_classes, hparams, max_steps)
        self.target_featurizer = copy.deepcopy(self.featurizer)
        self.target_bottleneck = copy.deepcopy(self.bottleneck)
        self.discriminator = discriminator(self.classifier.in_features, self.hparams["disc_hidden"])

    @property
    def switch_step(self) -> int:
        """The step at which the target encoder takes over."""
        return max(1, round(self.hparams["pretrain_fraction"] * self.max_steps))

    def _adapting(self) -> bool:
        return int(self.num_updates) >= self.switch_step

    def _backbone_parameters(self):
        return [*self.featurizer.parameters(), *self.target_featurizer.parameters()]

    def features(self, x: Tensor) -> Tensor:
        if self._adapting():
            return self.target_bottleneck(self.target_featurizer(x))
        return self.bottleneck(self.featurizer(x))

    def update(self, source: tuple[Tensor, Tensor], target: Tensor) -> dict[str, float]:
        xs, ys = source
        if not self._adapting():
            cls = self._classification(self.predict(xs), ys)
            out = self._step(cls, cls_loss=cls)
            if self._adapting():  # the source encoder is trained: the target encoder starts as its copy
                self.target_featurizer.load_state_dict(self.featurizer.state_dict())
                self.target_bottleneck.load_state_dict(self.bottleneck.state_dict())
            return out
        # Phase 2 (also after resuming from a checkpoint): the source encoder and the classifier are fixed.
        for part in (self.featurizer, self.bottleneck, self.classifier):
            part.requires_grad_(False)
        with torch.no_grad():
            self.featurizer.eval(), self.bottleneck.eval()
            zs = self.bottleneck(self.featurizer(xs))
        # Source images through the target encoder too (one pass, shared BatchNorm statistics).
        z = self.target_bottleneck(self.target_featurizer(torch.cat([xs, target])))
        zs_t, zt = z[: len(xs)], z[len(xs) :]
        d = self.discriminator(torch.cat([zs, zt.detach()])).squeeze(1)  # 1 = source encoder
        domain = torch.cat([torch.ones(len(zs)), torch.zeros(len(zt))]).to(d)
        ws = self._source_weights(ys)  # the re-weighted source encoder's features, when weighted
        ws = None if ws is None else torch.cat([ws, torch.ones(len(zt), device=ws.device)]).to(d)
        disc = F.binary_cross_entropy_with_logits(d, domain, weight=ws)
        frozen = {n: p.detach() for n, p in self.discriminator.named_parameters()}
        buffers = dict(self.discriminator.named_buffers())
        fooled = torch.func.functional_call(self.discriminator, {**frozen, **buffers}, (zt,)).squeeze(1)
        gen = F.binary_cross_entropy_with_logits(fooled, torch.ones_like(fooled))  # inverted labels
        loss = disc + self.hparams["lambda"] * gen
        parts = {"disc_loss": disc, "transfer_loss": gen, "disc_acc": ((d > 0).to(d) == domain).float().mean()}
        if self.hparams["source_cls"] > 0:
            cls = self._classification(self.classifier(zs_t), ys)
            loss, parts["cls_loss"] = loss + self.hparams["source_cls"] * cls, cls
        return self._step(loss, **parts)


class ZeroShot(Algorithm):
    """CLIP's zero-shot classifier (Radford et al. 2021): no training. On a CLIP backbone's image
    embeddings (features mode, `clip:ARCH/TAG`), the classifier's rows are the text encoder's embeddings of
    a prompt per class (`use_text`, from `extract.backbones.zero_shot_classifier`): logits are the cosine
    between image and prompt, times CLIP's logit scale. Saved with the model like any classifier, so it
    predicts, exports and competes in selection as the trained candidates do; `update` changes nothing."""

    key = "zero_shot"
    space = {**SHARED, "bottleneck_dim": fixed(0)}  # no bottleneck between image and prompt embeddings

    def __init__(self, featurizer, feature_dim, num_classes, hparams, max_steps):
        super().__init__(featurizer, feature_dim, num_classes, hparams, max_steps)
        self.register_buffer("scale", torch.ones(()))
        self.requires_grad_(False)

    def use_text(self, text: Tensor, scale: float) -> None:
        """The classes' prompt embeddings (C, D), normalised, and the logit scale."""
        with torch.no_grad():
            self.classifier.weight.copy_(text.to(self.classifier.weight))
            self.classifier.bias.zero_()
            self.scale.fill_(scale)

    def features(self, x: Tensor) -> Tensor:
        return F.normalize(self.featurizer(x).float(), dim=1)

    def classify(self, z: Tensor) -> Tensor:
        return self.scale * F.linear(F.normalize(z, dim=1), F.normalize(self.classifier.weight, dim=1))

    def update(self, source: tuple[Tensor, Tensor], target: Tensor) -> dict[str, float]:
        self.num_updates += 1
        return {"loss": 0.0}


# The registry, keyed by each class's own `key`: a name is written once, where the algorithm is
ALGORITHMS: dict[str, type[Algorithm]] = {
    a.key: a for a in (SourceOnly, DANN, CDAN, CORAL, MMD, MCC, IM, MME, ADDA, ZeroShot)
}
METHODS = ("auto", "none")  # what adapt.method takes besides an algorithm's name


def get_algorithm(name: str) -> type[Algorithm]:
    """The algorithm class registered as `name`; an UnknownNameError lists the valid names."""
    return lookup(ALGORITHMS, "algorithm", name)


def check_method(name: str) -> str:
    """`name` if `adapt.method` may take it (`auto`, `none` or an algorithm); else an UnknownNameError
    listing what it may."""
    if name not in METHODS:
        lookup({**dict.fromkeys(METHODS), **ALGORITHMS}, "method", name)
    return name


def default_hparams(algorithm: str) -> dict[str, Any]:
    """The defaults of `algorithm`'s hyperparameters."""
    return defaults(get_algorithm(algorithm).space)


def random_hparams(algorithm: str, seed: int) -> dict[str, Any]:
    """One random-search draw, a pure function of (algorithm, seed)."""
    return random_draw(algorithm, get_algorithm(algorithm).space, seed)


def candidate_hparams(algorithm: str, mode: str, draw: int) -> dict[str, Any]:
    """Draw 0: the defaults (with the end-to-end overrides in images mode); draw k > 0: random draw k."""
    if draw:
        return random_hparams(algorithm, draw)
    return {**default_hparams(algorithm), **(IMAGE_MODE_DEFAULTS if mode == "images" else {})}


def check_hparam(name: str) -> str:
    """`name` if some algorithm has a hyperparameter of that name; else an UnknownNameError listing them."""
    lookup({k: None for a in ALGORITHMS.values() for k in a.space}, "hyperparameter", name)
    return name
