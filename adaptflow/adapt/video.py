"""Action recognition on clips: a frozen backbone embeds every frame once, a small temporal encoder learns
from the sequence of embeddings, and the registered adaptation algorithms train on that representation
unchanged.

The model is TSN-like (Wang et al. 2016, "Temporal Segment Networks"): `t` frames sampled one per segment
(`data.clips.sample_frames`), each through the frozen extractor once (`frame_features`: (N, T, D) float
tensors, the clips' counterpart of cached image features), then `TemporalEncoder` in the place of the
featurizer of any `adapt.algorithms.ALGORITHMS` entry: `ALGORITHMS[name](TemporalEncoder(D, T, H), H, C,
hparams, steps)`. So DANN, CDAN, MMD, CORAL, MCC, IM and the rest align source and target clips in the
encoder's (N, H) space with their own losses, and `adapt.train.fit` trains them: its rows may be tensors
of any shape, a batch of clips being (B, T, D).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from adaptflow.adapt.algorithms import get_algorithm
from adaptflow.adapt.contract import Algorithm
from adaptflow.adapt.images import normalising
from adaptflow.adapt.train import Loop, fit, predict_proba
from adaptflow.config import BackboneConfig
from adaptflow.extract.backbones import build_extractor
from adaptflow.seeding import seeded

# What a fresh temporal encoder needs that the algorithms' defaults (made for a pretrained featurizer) do
# not give it: it learns at the heads' rate, not a tenth of it.
VIDEO_HPARAMS: dict[str, Any] = {"backbone_lr_mult": 1.0}


@torch.no_grad()
def frame_features(frames: Tensor, backbone: BackboneConfig, batch_size: int = 256) -> Tensor:
    """uint8 (N, T, 3, S, S) clips -> float32 (N, T, D) embeddings of every frame by `backbone`'s frozen
    extractor, normalised with its own mean and std as `adapt.images.ImageFeaturizer` normalises. Frames go in at the
    size they were loaded at (S), not resized to the backbone's input size: load them at the size wanted."""
    if frames.dtype != torch.uint8 or frames.dim() != 5:
        raise TypeError(f"frame_features takes uint8 clips (N, T, 3, S, S), got {frames.dtype} {tuple(frames.shape)}")
    extractor = build_extractor(backbone)  # shared and cached: used as it is, never moved or converted
    scale, shift = normalising(extractor.data_config)  # as ImageFeaturizer normalises
    n, t = frames.shape[:2]
    flat = frames.reshape(n * t, *frames.shape[2:])  # (N*T, 3, S, S): frames are embedded independently
    out = torch.empty(n * t, extractor.dim)
    for i in range(0, n * t, batch_size):
        out[i : i + batch_size] = extractor.module(
            torch.addcmul(shift, flat[i : i + batch_size].float(), scale)
        ).float()
    return out.reshape(n, t, extractor.dim)


class TemporalEncoder(nn.Module):
    """(N, T, D) frame embeddings -> (N, H) clip embeddings.

    First each clip's mean frame embedding is taken from its frames (`centre`): what every frame of a clip
    shares (the background, the object's colour, the domain's look) carries no motion, and a model left
    to read it learns which colours went with which class on a few hundred clips. Then a linear projection
    D -> H of every frame, plus a learned embedding of its time step (T of them), two temporal convolutions
    (Conv1d, kernel 3, padding 1, ReLU) and the mean over time. The positional embedding and the
    convolutions make the encoder order-aware: a clip and its reversed copy may get different outputs, so
    "moving left" and "moving right" (the same frames in the other order) can be told apart, which a mean
    of the frame embeddings, blind to order, could never do. The number of time steps is fixed at
    construction: clips are sampled to `steps` frames (`data.clips.sample_frames`).
    """

    def __init__(self, in_dim: int, steps: int, hidden: int = 128, centre: bool = True):
        super().__init__()
        self.steps, self.centre = steps, centre
        self.project = nn.Linear(in_dim, hidden)
        self.position = nn.Parameter(0.02 * torch.randn(steps, hidden))  # (T, H), one per time step
        self.temporal = nn.Sequential(
            nn.Conv1d(hidden, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv1d(hidden, hidden, 3, padding=1), nn.ReLU(),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[1] != self.steps:
            raise ValueError(f"TemporalEncoder takes (N, {self.steps}, D) frame features, got {tuple(x.shape)}")
        if self.centre:
            x = x - x.mean(1, keepdim=True)  # (N, T, D): what changes over the clip
        h = self.project(x) + self.position  # (N, T, H)
        h = self.temporal(h.transpose(1, 2))  # (N, H, T): Conv1d slides over time
        return h.mean(2)  # (N, H)


def video_algorithm(
    method: str,
    feature_dim: int,
    steps: int,
    num_classes: int,
    max_steps: int,
    hparams: dict[str, Any] | None = None,
    hidden: int = 128,
) -> Algorithm:
    """`ALGORITHMS[method]` over a fresh `TemporalEncoder(feature_dim, steps, hidden)`, with
    `VIDEO_HPARAMS` under `hparams`. Initialised from torch's global generator: build it inside `seeded`."""
    encoder = TemporalEncoder(feature_dim, steps, hidden)
    return get_algorithm(method)(encoder, hidden, num_classes, {**VIDEO_HPARAMS, **(hparams or {})}, max_steps)


def fit_video(
    method: str,
    source_feats: Tensor,
    source_labels: Tensor,
    target_feats: Tensor,
    steps: int,
    seed: int = 0,
    hparams: dict[str, Any] | None = None,
    num_classes: int | None = None,
    hidden: int = 128,
) -> Algorithm:
    """Train `method` for `steps` steps on source clips (float (N, T, D), int64 labels (N,)) and
    unlabelled target clips (float (M, T, D)); returns the trained algorithm in eval mode. `num_classes`
    defaults to the largest label + 1; the batch size is the algorithm's `batch_size` hyperparameter.
    Deterministic for a seed: the initialisation under `seeded(seed)`, every step's batches from
    (seed, step) (`adapt.train.fit`)."""
    if source_feats.dim() != 3 or target_feats.dim() != 3 or source_feats.shape[1:] != target_feats.shape[1:]:
        raise ValueError(
            f"source and target are (N, T, D) frame features of the same T and D, "
            f"got {tuple(source_feats.shape)} and {tuple(target_feats.shape)}"
        )
    c = int(source_labels.max()) + 1 if num_classes is None else num_classes
    _, t, d = source_feats.shape
    with seeded(seed):
        algorithm = video_algorithm(method, d, t, c, steps, hparams, hidden)
    loop = Loop(steps=steps, batch_size=int(algorithm.hparams["batch_size"]), seed=seed, log_every=max(steps, 1))
    fit(algorithm, source_feats, source_labels.long(), target_feats, loop)
    return algorithm.eval()


def predict_video(algorithm: Algorithm, feats: Tensor) -> Tensor:
    """(N, C) class probabilities of clips given as float (N, T, D) frame features, on the CPU."""
    return predict_proba(algorithm, feats)
