"""End-to-end adaptation on images: loading once to uint8, the trainable featurizer, the training
strategies, the time budget, inference."""

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from adaptflow.adapt.algorithms import ALGORITHMS, get_algorithm
from adaptflow.adapt.images import (
    STRATEGIES,
    ImageFeaturizer,
    Knobs,
    Tuning,
    _blocks,
    _translate,
    fit_images,
    image_featurizer,
    infer_images,
    load_images,
)
from adaptflow.adapt.train import Loop
from adaptflow.config import BackboneConfig
from adaptflow.data.preprocess import build_transform, decode_image
from adaptflow.errors import ConfigError, UnknownNameError
from adaptflow.extract.backbones import build_extractor

LITE0 = BackboneConfig(name="efficientnet_lite0", weights="random", image_size=32)
CLASSES, SIZE = 3, 16
DC = {"input_size": (3, SIZE, SIZE), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.25,) * 3,
      "crop_pct": 1.0, "crop_mode": "center"}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write(path, pixels: np.ndarray, fmt: str) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    path.write_bytes(buf.getvalue())
    return str(path)


def test_load_images_decodes_resizes_and_crops_once(tmp_path):
    rng = np.random.default_rng(0)
    uris = [
        _write(tmp_path / "grey.png", rng.integers(0, 256, (40, 50), dtype=np.uint8), "PNG"),
        _write(tmp_path / "rgba.png", rng.integers(0, 256, (20, 20, 4), dtype=np.uint8), "PNG"),
        _write(tmp_path / "red.jpg", np.full((30, 70, 3), (220, 10, 10), np.uint8), "JPEG"),
    ]
    dc = image_featurizer(LITE0)[2]
    x = load_images(uris, dc, num_workers=0)
    assert x.dtype == torch.uint8 and x.shape == (3, 3, 32, 32)  # the backbone's own size
    assert (x[0, 0] == x[0, 1]).all() and (x[0, 1] == x[0, 2]).all()  # grey -> three equal channels
    assert x[2, 0].float().mean() > 200 and x[2, 1:].float().mean() < 40  # colour kept, RGB order
    # the backbone's full transform is exactly this, then scaling and normalising
    full = build_transform(dc)(decode_image((tmp_path / "rgba.png").read_bytes()))
    mean, std = torch.tensor(dc["mean"]).view(3, 1, 1), torch.tensor(dc["std"]).view(3, 1, 1)
    torch.testing.assert_close((x[1].float() / 255 - mean) / std, full)
    assert torch.equal(load_images(uris, dc, num_workers=2), x)
    assert load_images([], dc).shape == (0, 3, 32, 32)


def test_image_featurizer_trains_a_deep_copy():
    featurizer, dim, dc = image_featurizer(LITE0)
    cached = build_extractor(LITE0).module
    before = {k: v.clone() for k, v in cached.state_dict().items()}
    assert dc["input_size"] == (3, 32, 32)

    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    featurizer.train()
    out = featurizer(x)
    assert out.shape == (4, dim)
    out.pow(2).mean().backward()
    grads = [p.grad for p in featurizer.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    torch.optim.SGD(featurizer.parameters(), lr=0.1).step()

    after = cached.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics untouched
    assert not all(torch.equal(before[k], v) for k, v in featurizer.backbone.state_dict().items())
    with pytest.raises(TypeError, match="uint8"):
        featurizer(x.float())


def _tiny_featurizer() -> tuple[ImageFeaturizer, int]:
    """(N, 3, 16, 16) uint8 -> (N, 8); four blocks with parameters: conv, BN, conv, BN."""
    cnn = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # fmt: skip
    return ImageFeaturizer(cnn, DC), 8


def _shapes(n: int, seed: int, colour: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, 16, 16) uint8 images of three classes (a bar, a column, a square) on noise: grey for the
    source, tinted on a brighter background for the target."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = torch.randint(0, 60, (n, 1, SIZE, SIZE), generator=g).float().expand(n, 3, SIZE, SIZE).clone()
    for i, c in enumerate(y.tolist()):
        r = slice(6, 10) if c != 1 else slice(2, 14)
        col = slice(6, 10) if c != 0 else slice(2, 14)
        x[i, :, r, col] = 250.0
    if colour:
        x = x * torch.tensor([1.0, 0.6, 0.3]).view(1, 3, 1, 1) + 40
    return x.clamp(0, 255).to(torch.uint8), y


def _algorithm(name: str, steps: int, **hparams):
    torch.manual_seed(0)
    featurizer, dim = _tiny_featurizer()
    return get_algorithm(name)(featurizer, dim, CLASSES, {"bottleneck_dim": 8, **hparams}, max_steps=steps)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_fit_images_every_strategy(strategy):
    xs, ys = _shapes(24, 0, colour=False)
    xt, _ = _shapes(24, 1, colour=True)
    alg = _algorithm("dann", 6, l2sp=0.01)
    curve = fit_images(alg, xs, ys, xt, Loop(6, 8, seed=0, log_every=2), Tuning(strategy, unfreeze_every=1))
    assert [c["step"] for c in curve] == [2, 4, 6]
    assert all(math.isfinite(v) for c in curve for v in c.values())
    assert "l2sp" in curve[-1] and curve[-1]["elapsed_s"] >= curve[0]["elapsed_s"] > 0
    logits, feats = infer_images(alg, xt, batch_size=10)
    assert logits.shape == (24, CLASSES) and feats.shape == (24, 8) and alg.training


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_fit_images_every_algorithm(name):
    xs, ys = _shapes(16, 0, colour=False)
    xt, _ = _shapes(16, 1, colour=True)
    curve = fit_images(_algorithm(name, 2), xs, ys, xt, Loop(2, 8, seed=0))
    assert all(math.isfinite(v) for v in curve[-1].values())


def _spy(alg) -> list[tuple[dict, bool, int]]:
    """Record, before every update: the featurizer's state, whether its BatchNorm is in train mode,
    and how many featurizer parameters are trainable."""
    records, update = [], alg.update

    def spied(source, target):
        bn = next(m for m in alg.featurizer.modules() if isinstance(m, nn.BatchNorm2d))
        trainable = sum(p.numel() for p in alg.featurizer.parameters() if p.requires_grad)
        records.append(({k: v.clone() for k, v in alg.featurizer.state_dict().items()}, bn.training, trainable))
        return update(source, target)

    alg.update = spied
    return records


def test_lp_ft_probes_with_a_frozen_featurizer_then_fine_tunes():
    xs, ys = _shapes(24, 0, colour=False)
    xt, _ = _shapes(24, 1, colour=True)
    alg = _algorithm("dann", 8)
    records = _spy(alg)
    head_before = alg.classifier.weight.clone()
    fit_images(alg, xs, ys, xt, Loop(8, 8, seed=0), Tuning("lp_ft", lp_fraction=0.5))
    start = records[0][0]
    # steps 1-4 probe: weights and BN statistics frozen (BN in eval mode); the state before step 5 is still the start
    for state, _, _ in records[:5]:
        assert all(torch.equal(start[k], v) for k, v in state.items())
    assert [r[1] for r in records] == [False] * 4 + [True] * 4
    assert [r[2] > 0 for r in records] == [False] * 4 + [True] * 4
    final = alg.featurizer.state_dict()
    assert not torch.equal(start["backbone.0.weight"], final["backbone.0.weight"])
    assert not torch.equal(start["backbone.1.running_mean"], final["backbone.1.running_mean"])
    assert not torch.equal(head_before, alg.classifier.weight)


def test_gradual_unfreezes_one_block_at_a_time():
    xs, ys = _shapes(16, 0, colour=False)
    xt, _ = _shapes(16, 1, colour=True)
    alg = _algorithm("source_only", 10)
    assert [type(b).__name__ for b in _blocks(alg.featurizer)] == ["Conv2d", "BatchNorm2d"] * 2
    records = _spy(alg)
    fit_images(alg, xs, ys, xt, Loop(10, 8, seed=0), Tuning("gradual", unfreeze_every=2))
    # last block first: BN (16 params), conv (584), BN, conv (224): cumulative counts per two steps
    assert [r[2] for r in records] == [0, 0, 16, 16, 600, 600, 616, 616, 840, 840]


def test_partial_never_trains_the_first_blocks():
    xs, ys = _shapes(16, 0, colour=False)
    xt, _ = _shapes(16, 1, colour=True)
    alg = _algorithm("dann", 4)
    first_bn = alg.featurizer.backbone[1]
    start = {k: v.clone() for k, v in alg.featurizer.state_dict().items()}
    # four blocks (conv, BN, conv, BN): half frozen, the first conv and its BatchNorm, in eval mode
    fit_images(alg, xs, ys, xt, Loop(4, 8, seed=0), Tuning("partial", frozen_fraction=0.5))
    end = alg.featurizer.state_dict()
    frozen = [k for k in start if k.startswith(("backbone.0.", "backbone.1."))]
    trained = [k for k in start if k.startswith(("backbone.3.", "backbone.4.")) and "num_batches" not in k]
    assert frozen and trained
    assert all(torch.equal(start[k], end[k]) for k in frozen)  # weights and BatchNorm statistics
    assert not any(torch.equal(start[k], end[k]) for k in trained)
    assert not first_bn.training and alg.featurizer.backbone[4].training


def test_partial_fine_tunes_a_vision_transformers_last_blocks():
    """A timm ViT end to end: patch embedding, position embedding and its first blocks stay as they were,
    its last blocks and final norm train (the cheap way to tune a big ViT within a step budget)."""
    featurizer, dim, _ = image_featurizer(BackboneConfig(name="test_vit", weights="random", image_size=SIZE))
    alg = get_algorithm("dann")(featurizer, dim, CLASSES, {}, max_steps=4)
    xs, ys = _shapes(16, 0, colour=False)
    start = {k: v.clone() for k, v in featurizer.state_dict().items()}
    fit_images(alg, xs, ys, _shapes(16, 1, colour=True)[0], Loop(4, 8, seed=0), Tuning("partial"))
    moved = {k for k, v in featurizer.state_dict().items() if not torch.equal(start[k], v)}
    blocks = len(featurizer.backbone.model.blocks)  # 6: the first three frozen, with what comes before them
    frozen = ("cls_token", "pos_embed", "patch_embed.", *(f"blocks.{i}." for i in range(blocks // 2)))
    assert moved and not any(k.removeprefix("backbone.model.").startswith(frozen) for k in moved)
    assert {f"backbone.model.blocks.{blocks - 1}.attn.qkv.weight", "backbone.model.norm.weight"} <= moved


def test_partial_with_nothing_frozen_is_full():
    knobs = Knobs(steps=10, n_blocks=11, lp_fraction=0.25, unfreeze_every=1, frozen_fraction=0.0)
    assert STRATEGIES["partial"](0, knobs) is True
    assert STRATEGIES["partial"](0, knobs._replace(frozen_fraction=0.5)) == 6  # EfficientNet: 5 of 11 frozen


def test_bad_frozen_fraction_is_a_config_error():
    xs, ys = _shapes(8, 0, colour=False)
    with pytest.raises(ConfigError, match="frozen_fraction"):
        fit_images(_algorithm("source_only", 1), xs, ys, xs, Loop(1, 4, seed=0), Tuning(frozen_fraction=1.0))


def test_time_budget_stops_training():
    xs, ys = _shapes(16, 0, colour=False)
    curve = fit_images(_algorithm("source_only", 100), xs, ys, xs, Loop(100, 8, seed=0, time_budget_s=0.0))
    assert len(curve) == 1 and curve[0]["step"] == 1 and curve[0]["budget_exceeded"] == 1.0


def test_translate_moves_each_image_a_few_pixels():
    x = torch.zeros(64, 1, 9, 9, dtype=torch.uint8)
    x[:, :, 4, 4] = 255
    out = _translate(x, 2, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    rows, cols = (out[:, 0] == 255).nonzero()[:, 1:].T
    assert len(rows) == 64 and rows.sub(4).abs().max() == 2 and cols.sub(4).abs().max() == 2
    assert len({(int(r), int(c)) for r, c in zip(rows, cols, strict=True)}) > 10


def test_unknown_strategy_is_listed():
    xs, ys = _shapes(8, 0, colour=False)
    with pytest.raises(UnknownNameError, match="valid strategy names: full, gradual, lp_ft, partial"):
        fit_images(_algorithm("dann", 1), xs, ys, xs, Loop(1, 4, seed=0), Tuning("warmup"))
