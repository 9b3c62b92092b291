"""The CUDA paths: bf16 autocast and channels_last in extraction, end-to-end training on the device.
Skipped without CUDA (see conftest)."""

import pytest
import torch

from adaptflow.adapt.algorithms import get_algorithm
from adaptflow.adapt.images import fit_images, image_featurizer, infer_images
from adaptflow.adapt.train import Loop
from adaptflow.config import BackboneConfig
from adaptflow.data.ingest import ingest
from adaptflow.extract import features

pytestmark = pytest.mark.gpu


def test_extraction_on_cuda_matches_cpu(demo_data, fast_config, memory_uri):
    src = ingest(demo_data.source_uri, "source", f"{memory_uri}/ingest/source", fast_config.ingest)
    cpu = fast_config.extract.model_copy(update={"device": "cpu"})
    gpu = fast_config.extract.model_copy(update={"device": "cuda"})
    plan = features.plan_extraction([src.index_uri], f"{memory_uri}/cpu", fast_config.backbone, 10_000)
    features.extract_shard(plan.shards[0], fast_config.backbone, cpu)
    on_gpu = features.plan_extraction([src.index_uri], f"{memory_uri}/gpu", fast_config.backbone, 10_000)
    features.extract_shard(on_gpu.shards[0], fast_config.backbone, gpu)
    ids = features.committed_image_ids(plan.features_uri)
    a = features.load_features(plan.features_uri, sorted(ids))
    b = features.load_features(on_gpu.features_uri, sorted(ids))
    # bf16 autocast on the GPU: close to the fp32 CPU features, not equal
    cos = torch.nn.functional.cosine_similarity(torch.from_numpy(a), torch.from_numpy(b)).mean()
    assert cos > 0.98


def test_end_to_end_training_steps_on_cuda():
    torch.manual_seed(0)
    featurizer, dim, _ = image_featurizer(BackboneConfig(name="efficientnet_lite0", weights="random", image_size=32))
    alg = get_algorithm("dann")(featurizer, dim, 3, {"bottleneck_dim": 16}, max_steps=5).cuda()
    x = torch.randint(0, 255, (40, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 3, (40,))
    curve = fit_images(alg, x, y, x.flip(1), Loop(5, 8, seed=0), device="cuda")
    assert all(torch.isfinite(torch.tensor(v)) for c in curve for v in c.values())
    logits, _ = infer_images(alg, x, device="cuda")
    assert logits.shape == (40, 3)
