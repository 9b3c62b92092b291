import numpy as np
import pytest
import torch

from adaptflow.adapt.algorithms import get_algorithm
from adaptflow.adapt.heads import train_head
from adaptflow.adapt.inference import load_model
from adaptflow.adapt.train import infer
from adaptflow.config import Config, HeadConfig
from adaptflow.errors import StoreError
from adaptflow.models.card import ModelCard, save_model


def _card(**kw):
    base = dict(
        classes=["a", "b", "c"],
        config=Config(head=HeadConfig(kind="mlp", hidden_dim=8)),
        fingerprint="f" * 16,
        dim=16,
        config_hash="c",
        dataset_fingerprint="d",
        metrics={"acc": 1.0},
    )
    return ModelCard(**{**base, **kw})


def test_head_round_trip(memory_uri):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 16)).astype(np.float32), rng.integers(0, 3, 60)
    head, _ = train_head(x, y, x, y, 3, HeadConfig(kind="mlp", hidden_dim=8, max_epochs=3), seed=0)
    save_model(memory_uri, head, _card())
    loaded, card = load_model(memory_uri)
    assert card == _card()
    t = torch.from_numpy(x)
    assert torch.equal(infer(loaded, t)[0], infer(head, t)[0])


def test_features_algorithm_round_trip(memory_uri):
    torch.manual_seed(0)
    hp = {"bottleneck_dim": 8}
    alg = get_algorithm("dann")(torch.nn.Identity(), 16, 3, hp, max_steps=10)
    x = torch.randn(32, 16)
    alg.update((x, torch.randint(0, 3, (32,))), torch.randn(32, 16))
    card = _card(kind="features", method="dann", hparams=hp)
    save_model(memory_uri, alg, card)
    loaded, _ = load_model(memory_uri)
    logits, feats = infer(loaded, x)
    assert logits.shape == (32, 3) and feats.shape == (32, 8)
    assert torch.allclose(logits, infer(alg, x)[0])


def test_loading_a_missing_model_names_the_uri(memory_uri):
    with pytest.raises(StoreError, match=f"no model at {memory_uri}/nothing"):
        load_model(f"{memory_uri}/nothing")


def _saved_head(uri: str):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 16)).astype(np.float32), rng.integers(0, 3, 30)
    head, _ = train_head(x, y, x, y, 3, HeadConfig(kind="mlp", hidden_dim=8, max_epochs=2), seed=0)
    save_model(uri, head, _card())


def _edit_card(uri: str, edit) -> None:
    from adaptflow.store import storage

    card = storage.read_json(f"{uri}/model.json")
    edit(card)
    storage.write_json(f"{uri}/model.json", card)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("weights missing", "damaged model at {uri}: weights.safetensors is missing"),
        ("weights cut short", "damaged model at {uri}: weights.safetensors cannot be read ("),
        (
            "classes edited",
            "damaged model at {uri}: its weights do not fit model.json (classes, dim or method changed?): "
            "size mismatch for ",
        ),
        ("dim removed", "damaged model card {uri}/model.json: dim: Field required"),
        ("unknown backbone", "cannot rebuild the model at {uri}: unknown backbone 'resnet9000'; valid backbones: "),
        ("unknown method", "cannot rebuild the model at {uri}: unknown algorithm 'nope'"),
        ("card not JSON", "damaged model at {uri}: not valid JSON: {uri}/model.json"),
    ],
)
def test_a_damaged_model_is_one_model_error_naming_what_is_wrong(damage, message, memory_uri):
    from adaptflow.errors import ModelError
    from adaptflow.store import storage

    uri = f"{memory_uri}/model"
    _saved_head(uri)
    if damage == "weights missing":
        storage.remove(f"{uri}/weights.safetensors")
    elif damage == "weights cut short":
        storage.write_bytes(f"{uri}/weights.safetensors", storage.read_bytes(f"{uri}/weights.safetensors")[:40])
    elif damage == "classes edited":
        _edit_card(uri, lambda c: c.update(classes=["a", "b", "c", "d"]))
    elif damage == "dim removed":
        _edit_card(uri, lambda c: c.pop("dim"))
    elif damage == "unknown backbone":
        _edit_card(uri, lambda c: c["config"]["backbone"].update(name="resnet9000"))
    elif damage == "unknown method":
        _edit_card(uri, lambda c: c.update(kind="features", method="nope"))
    else:
        storage.write_bytes(f"{uri}/model.json", b'{"schema_version": 1, "kind": ')
    with pytest.raises(ModelError) as e:
        load_model(uri)
    text = str(e.value)
    assert text.startswith(message.format(uri=uri)), text
    assert "\n" not in text and e.value.exit_code == 2 and e.value.__suppress_context__
