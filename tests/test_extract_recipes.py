"""A run with nothing to embed knows its extractor from the store's recipe: no build, no weights read."""

import os

import pytest
import torch
from safetensors.torch import save_file

from adaptflow.config import BackboneConfig
from adaptflow.errors import AdaptflowError
from adaptflow.extract import backbones, features, recipes
from adaptflow.store import storage

SIZE = 32


def _resnet18_weights(path, seed: int) -> str:
    import timm

    torch.manual_seed(seed)
    save_file(timm.create_model("resnet18").state_dict(), str(path))
    return str(path)


@pytest.fixture
def no_builds(monkeypatch):
    """From here on the process has built no extractor, and any weights read is counted."""
    backbones._build_extractor.cache_clear()
    reads = []
    read = backbones.read_state_dict
    monkeypatch.setattr(backbones, "read_state_dict", lambda uri, name: reads.append(uri) or read(uri, name))
    yield reads
    backbones._build_extractor.cache_clear()


def test_a_plan_with_nothing_to_embed_reads_no_weights(demo_data, fast_config, memory_uri, no_builds):
    from adaptflow.data.ingest import ingest

    src = ingest(demo_data.source_uri, "source", f"{memory_uri}/ingest/source", fast_config.ingest)
    plan = features.plan_extraction([src.index_uri], memory_uri, fast_config.backbone, 1000)
    for shard in plan.shards:
        features.extract_shard(shard, fast_config.backbone, fast_config.extract)
    assert len(no_builds) == 1  # the first plan built the extractor once, and embedding reused the build

    backbones._build_extractor.cache_clear()  # a new process, as the next scheduled run is
    again = features.plan_extraction([src.index_uri], memory_uri, fast_config.backbone, 1000)
    assert (again.fingerprint, again.dim, again.n_cached, again.shards) == (
        plan.fingerprint,
        plan.dim,
        src.n_images,
        [],
    )
    assert len(no_builds) == 1


def test_a_changed_weights_file_is_built_again_and_names_other_features(tmp_path, memory_uri, no_builds):
    cfg = BackboneConfig(name="resnet18", weights=_resnet18_weights(tmp_path / "w.safetensors", 1), image_size=SIZE)
    first = recipes.recipe(cfg, memory_uri)
    assert recipes.recipe(cfg, memory_uri) == first and len(no_builds) == 1

    _resnet18_weights(tmp_path / "w.safetensors", 2)  # same name, new bytes
    os.utime(tmp_path / "w.safetensors", ns=(0, 1))  # and a modification time no earlier build saw
    second = recipes.recipe(cfg, memory_uri)
    assert len(no_builds) == 2
    assert second.weights_sha256 != first.weights_sha256 and second.fingerprint != first.fingerprint
    assert second.fingerprint == backbones.build_extractor(cfg).fingerprint


def test_a_damaged_recipe_is_built_again(memory_uri, no_builds):
    cfg = BackboneConfig(name="resnet18", weights="random", image_size=SIZE)
    built = recipes.recipe(cfg, memory_uri)
    record = storage.join(memory_uri, "features", "recipes", f"{recipes.recipe_key(cfg)}.json")
    storage.write_bytes(record, b'{"fingerprint": ')
    backbones._build_extractor.cache_clear()
    assert recipes.recipe(cfg, memory_uri) == built
    assert recipes.Recipe.model_validate(storage.read_json(record)) == built


def test_embedding_refuses_a_plan_made_for_other_features(demo_data, fast_config, memory_uri):
    from adaptflow.data.ingest import ingest

    src = ingest(demo_data.source_uri, "source", f"{memory_uri}/ingest/source", fast_config.ingest)
    record = storage.join(memory_uri, "features", "recipes", f"{recipes.recipe_key(fast_config.backbone)}.json")
    real = recipes.recipe(fast_config.backbone, memory_uri)
    storage.write_json(record, {**real.model_dump(mode="json"), "fingerprint": "0" * 16})  # a stale record
    plan = features.plan_extraction([src.index_uri], memory_uri, fast_config.backbone, 1000)
    assert plan.fingerprint == "0" * 16
    with pytest.raises(AdaptflowError, match=f"builds features {real.fingerprint}, not those planned"):
        features.extract_shard(plan.shards[0], fast_config.backbone, fast_config.extract)
    assert features.plan_extraction([src.index_uri], memory_uri, fast_config.backbone, 1000).n_cached == 0
