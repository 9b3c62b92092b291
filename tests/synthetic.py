"""Small synthetic domains with a shift that source-only training cannot cross, and the outputs of
made-up models of chosen accuracy and confidence, shared by the adaptation and selection tests."""

import torch
from torch import nn

DIM, CLASSES = 16, 4
# Four irregular clusters in a 2-D class plane, so no rotation or relabelling maps the layout onto itself.
CENTERS = torch.tensor([[0.0, 0.0], [3.0, 0.3], [0.4, 3.0], [3.2, 3.4]])


def domain(n: int, seed: int, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 16) points: class plane (2 dims, clusters of std 0.5) + 14 nuisance dims of std 0.7, shifted
    by `offset`, then rotated by a fixed random orthogonal matrix so no input axis is special."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    z = CENTERS[y] - CENTERS.mean(0) + 0.5 * torch.randn(n, 2, generator=g)
    x = torch.cat([z, 0.7 * torch.randn(n, DIM - 2, generator=g)], 1) + offset
    q = torch.linalg.qr(torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(7)))[0]
    return x @ q, y


def shifted_domains(seed: int, n: int = 800):
    """Source, and a target translated by (1.8, 1.0) in the class plane (~half the cluster spacing, so
    the source boundaries cut through the target clusters) and by 2.5 along a nuisance direction (so
    the domains barely overlap and a shared featurizer can map them onto each other)."""
    nuisance = torch.randn(DIM - 2, generator=torch.Generator().manual_seed(11))
    offset = torch.cat([torch.tensor([1.8, 1.0]), 2.5 * nuisance / nuisance.norm()])
    xs, ys = domain(n, seed, torch.zeros(DIM))
    xt, yt = domain(n, seed + 1, offset)
    return xs, ys, xt, yt


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(DIM, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())


def _outputs(
    gen: torch.Generator, labels: torch.Tensor, accuracy: float, confidence: float, collapse: bool, classes: int
):
    """Logits and 8-D features of a model that is right on `accuracy` of `labels` (or predicts class 0
    everywhere when `collapse`), with `confidence` the logit margin; its features cluster by prediction."""
    pred = labels.clone()
    wrong = torch.rand(len(labels), generator=gen) > accuracy
    pred[wrong] = (labels[wrong] + 1) % classes
    if collapse:
        pred = torch.zeros_like(labels)
    logits = torch.randn(len(labels), classes, generator=gen) * 0.5
    logits[torch.arange(len(labels)), pred] += confidence
    feats = torch.eye(classes).repeat(1, 2)[pred] * 3 + torch.randn(len(labels), 2 * classes, generator=gen)
    return logits, feats


def model_outputs(
    seed: int,
    src_acc: float,
    tgt_acc: float,
    confidence: float,
    collapse_source: bool = False,
    collapse_target: bool = False,
    n: int = 200,
    classes: int = 4,
):
    """`ValidationInputs` of a made-up model: accurate on `src_acc` of n source-validation images (always the
    same images and labels, whatever the seed) and `tgt_acc` of n target images, logit margin `confidence`."""
    from adaptflow.adapt.validators import ValidationInputs

    gen = torch.Generator().manual_seed(seed)
    ys, yt = torch.arange(n) % classes, torch.arange(n) % classes
    sl, sf = _outputs(gen, ys, src_acc, confidence, collapse_source, classes)
    tl, tf = _outputs(gen, yt, tgt_acc, confidence, collapse_target, classes)
    # The frozen backbone's space is the same for every candidate of a run: drawn from a fixed seed.
    frozen = torch.Generator().manual_seed(1234)
    shared = {
        name: torch.randn(n, 16, generator=frozen) + shift
        for name, shift in (("shared_source_train", 0.0), ("shared_source", 0.0), ("shared_target", 0.5))
    }
    return ValidationInputs(
        sl, ys, sf, tl, tf, source_train_features=sf + 0.1 * torch.randn(sf.shape, generator=gen), **shared
    )


def save_untrained_images_model(uri: str, cfg, classes: list[str], image_size: int) -> str:
    """An untrained end-to-end DANN of `image_size` saved at `uri` with its card: what prediction, resuming
    and memory tests need, where what is predicted does not matter."""
    from adaptflow.adapt.inference import build_model
    from adaptflow.models.card import save_model

    card = model_card(cfg, classes, "images", "dann", image_size=image_size)
    save_model(uri, build_model(card), card)
    return uri


def model_card(cfg, classes: list[str], kind: str, method: str, fingerprint="untrained", dim=0, image_size=None):
    """A model card for a test's model: `kind` and `method` on `cfg`'s backbone, no dataset behind it."""
    from adaptflow.models.card import ModelCard

    return ModelCard(
        kind=kind,
        method=method,
        image_size=image_size,
        classes=classes,
        config=cfg,
        fingerprint=fingerprint,
        dim=dim,
        config_hash=cfg.fingerprint(),
        dataset_fingerprint="none",
        metrics={},
    )
