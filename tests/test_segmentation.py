"""Semantic segmentation in the library: the network, every registered method, the metrics and selection."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from adaptflow.adapt import segmentation as seg
from adaptflow.adapt.selection import Candidate
from adaptflow.config import BackboneConfig
from adaptflow.data.segmentation import IGNORE
from adaptflow.errors import AdaptflowError, UnknownNameError

S = 32  # image side: four stages at strides 4 to 32 still leave a 1x1 map


@pytest.fixture(scope="module")
def net():
    return seg.segmentation_net(BackboneConfig(), num_classes=3)[0]


def _domain(n: int, seed: int, shift: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n images of one bright square on a dark ground (class 1) or a dark one on a bright ground (class 2),
    the mask marking the square; `shift` adds to every pixel (a change of look)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, 3, S, S), 40, dtype=torch.int64)
    y = torch.zeros((n, S, S), dtype=torch.int64)
    for i in range(n):
        r, c = torch.randint(0, S - 12, (2,), generator=g).tolist()
        k = 1 + i % 2
        x[i] = 40 if k == 1 else 200
        x[i, :, r : r + 12, c : c + 12] = 200 if k == 1 else 40
        y[i, r : r + 12, c : c + 12] = k
    return (x + shift).clamp(0, 255).to(torch.uint8), y


def test_metrics_on_a_hand_made_case():
    truth = torch.tensor([[0, 0, 1, 1], [0, 0, 1, IGNORE]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 2, 0]])
    cm = seg.confusion(pred, truth, 4)
    # class 0: 3 of 4 right, predicted 3 times -> IoU 3 / (4 + 3 - 3) = 0.75; class 1: 2 right of 3, predicted
    # 3 times -> 2 / (3 + 3 - 2) = 0.5; class 2: never true, predicted once -> 0; class 3: absent -> NaN
    assert cm.sum() == 7  # the IGNORE pixel is left out
    iou = seg.iou(cm)
    assert iou[:3] == pytest.approx([0.75, 0.5, 0.0]) and math.isnan(iou[3])
    assert seg.mean_iou(cm) == pytest.approx((0.75 + 0.5 + 0.0) / 3)
    assert seg.pixel_accuracy(cm) == pytest.approx(5 / 7)


def test_the_network_gives_logits_at_the_input_size(net):
    x = torch.randint(0, 256, (2, 3, S, S), dtype=torch.uint8)
    assert seg.predict_logits(net, x).shape == (2, 3, S, S)
    with pytest.raises(TypeError, match="uint8"):
        net(x.float())


@pytest.mark.parametrize("method", list(seg.SEGMENTATION_METHODS))
def test_every_method_trains_and_is_deterministic(net, method):
    source, (xt, _) = _domain(8, seed=0), _domain(8, seed=1, shift=30)
    a = seg.fit_segmentation(method, net, source, xt, steps=3, batch_size=4, seed=0)
    b = seg.fit_segmentation(method, net, source, xt, steps=3, batch_size=4, seed=0)
    assert a.curve == b.curve and all(math.isfinite(v) for v in a.curve[-1].values())
    assert a.net is not net  # the shared network is never trained in place
    assert torch.equal(seg.predict_logits(a.net, xt), seg.predict_logits(b.net, xt))


def test_source_only_learns_the_source(net):
    (xs, ys), (xv, yv) = _domain(48, seed=0), _domain(16, seed=2)
    before = seg.mean_iou(seg.confusion(seg.predict_logits(net, xv).argmax(1), yv, 3))
    trained = seg.fit_segmentation("source_only", net, (xs, ys), xs, steps=40, batch_size=8)
    after = seg.mean_iou(seg.confusion(seg.predict_logits(trained.net, xv).argmax(1), yv, 3))
    assert trained.curve[-1]["cls_loss"] < trained.curve[0]["cls_loss"]
    assert after > max(before, 0.5)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(UnknownNameError, match="advent"):
        seg.get_segmentation_method("gan")


def test_a_backbone_without_stage_maps_is_refused():
    with pytest.raises(AdaptflowError, match="forward_intermediates"):
        seg.segmentation_net(BackboneConfig(name="tv:alexnet", weights="random"), 3)


def test_class_balanced_pseudo_labels_keep_every_predicted_class():
    logits = torch.zeros(1, 2, 4, 4)
    logits[0, 0] = torch.linspace(3.0, 6.0, 16).view(4, 4)  # class 0 nearly everywhere, and sure of it ...
    logits[0, 1, 0, :2] = torch.tensor([3.5, 3.4])  # ... but for two pixels of class 1, barely
    labels = seg.class_balanced_pseudo_labels(logits, portion=0.5)
    assert (labels == 1).sum() == 1  # the rare class keeps its top half, whatever its absolute confidence
    assert (labels[0, 0, 0] == 1) and (labels == 0).sum() == 7 and (labels == IGNORE).sum() == 8


def test_fourier_style_swaps_only_the_low_frequencies():
    g = torch.Generator().manual_seed(0)
    xs = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=g)
    assert torch.equal(seg.fourier_style(xs, xs, beta=0.1), xs)
    xt = torch.full_like(xs, 200)  # a brighter target: the mean (zero frequency) moves towards it
    styled = seg.fourier_style(xs, xt, beta=0.1)
    assert styled.dtype == torch.uint8 and styled.float().mean() > xs.float().mean() + 50


def _candidate(name: str, acc: float, im: float, collapsed=False, source_only=False, right=None) -> Candidate:
    return Candidate(name, {"source_val_acc": acc, "im": im}, collapsed, source_only=source_only, val_correct=right)


def test_selection_prefers_adaptation_within_the_noise_and_never_a_collapsed_model():
    rng = np.random.default_rng(0)
    ref = rng.random(400) < 0.9
    near = ref.copy()
    near[:4] = ~near[:4]  # a few pixels apart: not significantly less accurate
    cands = [
        _candidate("source_only", ref.mean(), -1.0, source_only=True, right=ref),
        _candidate("advent", near.mean(), -0.5, right=near),
        _candidate("cbst", ref.mean(), 0.0, collapsed=True, right=ref),
    ]
    pick = seg.select_segmentation(cands)
    assert cands[pick.index].name == "advent" and pick.reference == 0


def test_judge_reads_what_selection_needs(net):
    source, (xt, _) = _domain(8, seed=0), _domain(8, seed=1, shift=30)
    trained = seg.fit_segmentation("minent", net, source, xt, steps=2, batch_size=4)
    c = seg.judge(trained, source, xt, seg.pixel_mix(source[1], 3))
    assert set(c.scores) == {"source_val_acc", "im"} and c.objectives == frozenset({"im"})
    assert not c.source_only and c.val_correct is not None and len(c.val_correct) <= 3 * 2000


def test_masks_are_written_at_each_input_size(net, tmp_path):
    from PIL import Image

    from adaptflow.data.segmentation import list_segmentation
    from adaptflow.evaluate.segmentation import predict_masks

    rng = np.random.default_rng(0)
    for name, (w, h) in {"wide.png": (40, 30), "tall.jpg": (24, 50)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
    pairs = list_segmentation(str(tmp_path), masks=False).pairs
    table_uri = predict_masks(net, pairs, S, str(tmp_path / "out"))
    table = pd.read_parquet(table_uri)
    assert sorted(table.columns) == ["image_id", "mask_uri", "uri"] and len(table) == 2
    for p, mask_uri in zip(pairs, table.mask_uri, strict=True):
        with Image.open(mask_uri) as m:
            assert m.mode == "L" and m.size == (p.width, p.height)
            assert np.asarray(m).max() < 3
    first = {u: Path(u).stat().st_mtime_ns for u in table.mask_uri}
    predict_masks(net, pairs, S, str(tmp_path / "out"))  # a rerun keeps the masks already written
    assert {u: Path(u).stat().st_mtime_ns for u in table.mask_uri} == first


def test_metrics_and_overlay_for_people():
    from adaptflow.evaluate.segmentation import overlay, segmentation_metrics

    cm = seg.confusion(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 3)
    m = segmentation_metrics(cm, ["background", "disc", "square"])
    assert m["iou"] == {"background": 0.5, "disc": 0.5, "square": None} and m["miou"] == 0.5
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    painted = overlay(image, np.array([[1, IGNORE], [0, 0]]))
    assert (painted[0, 1] == 100).all() and not (painted[0, 0] == 100).all()
