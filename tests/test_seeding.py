"""adapt.seeding and adapt.train's per-thread settings: which steps need the seeding lock, and that the
ones said not to draw from torch's global generator really do not (every algorithm, both modes)."""

import threading

import pytest
import torch
from torch import nn

from adaptflow.adapt.algorithms import ALGORITHMS, get_algorithm
from adaptflow.adapt.images import ImageFeaturizer
from adaptflow.adapt.train import PROCESS_THREADS, intra_op_threads
from adaptflow.seeding import draws_random

CLASSES = 3
DC = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def _featurizer(mode: str, *extra: nn.Module) -> tuple[nn.Module, int]:
    if mode == "features":
        return nn.Sequential(nn.Identity(), *extra), 6
    cnn = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), *extra, nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    return ImageFeaturizer(cnn, DC), 4


def _batches(mode: str) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if mode == "features":
        x, xt = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    else:
        x, xt = (torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8, generator=g) for _ in range(2))
    return (x, torch.arange(8) % CLASSES), xt


@pytest.mark.parametrize("mode", ["features", "images"])
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_a_step_said_not_to_draw_leaves_the_global_generator_where_it_was(name, mode):
    featurizer, dim = _featurizer(mode)
    alg = get_algorithm(name)(featurizer, dim, CLASSES, {"bottleneck_dim": 8}, max_steps=4)
    source, target = _batches(mode)
    assert not draws_random(alg)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for _ in range(4):  # ADDA changes phase halfway
        alg.update(source, target)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("mode", ["features", "images"])
def test_dropout_in_the_model_needs_the_lock(mode):
    featurizer, dim = _featurizer(mode, nn.Dropout(0.1))
    assert draws_random(get_algorithm("dann")(featurizer, dim, CLASSES, {}, max_steps=1))
    featurizer, dim = _featurizer(mode, nn.Dropout(0.0))
    assert not draws_random(get_algorithm("dann")(featurizer, dim, CLASSES, {}, max_steps=1))


def test_timm_style_rates_and_a_declared_draw_need_the_lock():
    head = nn.Linear(2, 2)
    head.drop_rate = 0.2  # timm models drop out functionally in forward_head
    assert draws_random(nn.Sequential(head))
    head.drop_rate = 0.0
    assert not draws_random(nn.Sequential(head))
    sampler = nn.Module()
    sampler.draws_random = True
    assert draws_random(nn.Sequential(sampler))


def test_intra_op_threads_apply_to_the_calling_thread_only():
    main = torch.get_num_threads()
    inside, release, seen = threading.Event(), threading.Event(), {}

    def worker():
        with intra_op_threads(1):
            seen["inside"] = torch.get_num_threads()
            inside.set()
            release.wait(10)
        seen["after"] = torch.get_num_threads()

    t = threading.Thread(target=worker)
    t.start()
    assert inside.wait(10)
    seen["main, meanwhile"] = torch.get_num_threads()
    release.set()
    t.join()
    assert seen == {"inside": 1, "main, meanwhile": main, "after": PROCESS_THREADS}
