import numpy as np
import pytest
import torch

from adaptflow.adapt.algorithms import get_algorithm
from adaptflow.config import Config, HeadConfig
from adaptflow.errors import StoreError
from adaptflow.heads import train_head
from adaptflow.models import ModelCard, infer_features, load_model, save_model


def _card(**kw):
    base = dict(classes=["a", "b", "c"], config=Config(head=HeadConfig(kind="mlp", hidden_dim=8)),
                fingerprint="f" * 16, dim=16, config_hash="c", dataset_fingerprint="d", metrics={"acc": 1.0})
    return ModelCard(**{**base, **kw})


def test_head_round_trip(memory_uri):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 16)).astype(np.float32), rng.integers(0, 3, 60)
    head, _ = train_head(x, y, x, y, 3, HeadConfig(kind="mlp", hidden_dim=8, max_epochs=3), seed=0)
    save_model(memory_uri, head, _card())
    loaded, card = load_model(memory_uri)
    assert card == _card()
    t = torch.from_numpy(x)
    assert torch.equal(infer_features(loaded, t)[0], infer_features(head, t)[0])


def test_features_algorithm_round_trip(memory_uri):
    torch.manual_seed(0)
    hp = {"bottleneck_dim": 8}
    alg = get_algorithm("dann")(torch.nn.Identity(), 16, 3, hp, max_steps=10)
    x = torch.randn(32, 16)
    alg.update((x, torch.randint(0, 3, (32,))), torch.randn(32, 16))
    card = _card(kind="features", method="dann", hparams=hp)
    save_model(memory_uri, alg, card)
    loaded, _ = load_model(memory_uri)
    logits, feats = infer_features(loaded, x)
    assert logits.shape == (32, 3) and feats.shape == (32, 8)
    assert torch.allclose(logits, infer_features(alg, x)[0])


def test_loading_a_missing_model_names_the_uri(memory_uri):
    with pytest.raises(StoreError, match=f"no model at {memory_uri}/nothing"):
        load_model(f"{memory_uri}/nothing")
