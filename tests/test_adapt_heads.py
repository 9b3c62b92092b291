import numpy as np
import pytest
import torch

from adaptflow.adapt.heads import train_head
from adaptflow.adapt.train import infer
from adaptflow.config import HeadConfig


def _blobs(n, seed, dim=16, classes=3):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(0).normal(0, 3, (classes, dim))
    y = rng.integers(0, classes, n)
    return (centers[y] + rng.normal(0, 1, (n, dim))).astype(np.float32), y


def predict_proba(head, x):
    return infer(head, torch.from_numpy(x))[0].softmax(1).numpy()


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_head_learns_separable_classes_and_stops_early(kind):
    x, y = _blobs(300, 1)
    xv, yv = _blobs(100, 2)
    cfg = HeadConfig(kind=kind, hidden_dim=32, max_epochs=300, patience=5)
    head, curve = train_head(x, y, xv, yv, 3, cfg, seed=0)
    assert len(curve) < 300  # early stopping fired
    proba = predict_proba(head, xv)
    assert proba.shape == (100, 3) and np.allclose(proba.sum(1), 1, atol=1e-5)
    assert (proba.argmax(1) == yv).mean() > 0.95


def test_training_is_seeded():
    x, y = _blobs(200, 1)
    cfg = HeadConfig(max_epochs=5)
    a, _ = train_head(x, y, x, y, 3, cfg, seed=7)
    b, _ = train_head(x, y, x, y, 3, cfg, seed=7)
    assert np.array_equal(predict_proba(a, x), predict_proba(b, x))
