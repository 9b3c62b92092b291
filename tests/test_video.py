"""Action recognition in the library: listing and loading clips, the motion shift, the temporal encoder, and
every registered algorithm on clip features."""

import hashlib
import io
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from adaptflow.adapt import video
from adaptflow.adapt.algorithms import ALGORITHMS
from adaptflow.config import BackboneConfig
from adaptflow.data.clips import list_clips, load_clip, load_clips, sample_frames
from adaptflow.data.motion import CLASSES, make_motion_shift
from adaptflow.errors import DatasetError

S = 16  # frame side of the hand-made clips


def _frames(n: int, seed: int = 0) -> np.ndarray:
    """(n, S, S, 3) uint8: a white 4x4 square stepping right over a flat colour, one for each seed below 6:
    two colours, so that a GIF's palette holds every frame exactly."""
    background = np.array([40 * seed, 64, 128])
    clip = np.empty((n, S, S, 3), np.uint8)
    clip[:] = background
    for k in range(n):
        clip[k, 6:10, k : k + 4] = 255
    return clip


def _write_folder(folder, clip: np.ndarray) -> None:
    folder.mkdir(parents=True)
    for k, frame in enumerate(clip):
        Image.fromarray(frame).save(folder / f"{k:04d}.png")


def _gif(clip: np.ndarray) -> bytes:
    buf = io.BytesIO()
    images = [Image.fromarray(f) for f in clip]
    images[0].save(buf, "GIF", save_all=True, append_images=images[1:], duration=100, loop=0)
    return buf.getvalue()


def test_a_source_lists_frame_folders_and_gifs_with_their_classes(tmp_path):
    _write_folder(tmp_path / "walk" / "a", _frames(5))
    (tmp_path / "wave").mkdir()
    gif = _gif(_frames(6, seed=1))
    (tmp_path / "wave" / "b.gif").write_bytes(gif)
    listing = list_clips(str(tmp_path))
    assert listing.classes == ["walk", "wave"] and listing.rejects == []
    folder, animated = listing.clips
    assert (folder.label, folder.frames, animated.label, animated.frames) == ("walk", 5, "wave", 6)
    assert animated.clip_id == hashlib.sha256(gif).hexdigest()
    assert folder.uri.endswith("walk/a") and len(folder.clip_id) == 64
    target = list_clips(str(tmp_path / "wave"), labelled=False)
    assert target.classes == [] and [c.label for c in target.clips] == [None]


def test_the_motion_shift_lists_clean_in_both_formats(tmp_path):
    shift = make_motion_shift(str(tmp_path), per_class=2, frames=5, size=16)
    source = list_clips(shift.source_uri)
    target = list_clips(shift.target_uri, labelled=False)
    assert source.classes == sorted(CLASSES) and len(source.clips) == 8 and source.rejects == []
    assert len(target.clips) == 8 and target.rejects == [] and all(c.uri.endswith(".gif") for c in target.clips)
    assert {c.frames for c in source.clips + target.clips} == {5}
    again = make_motion_shift(str(tmp_path / "again"), per_class=2, frames=5, size=16)
    assert [c.clip_id for c in list_clips(again.source_uri).clips] == [c.clip_id for c in source.clips]
    rows = (tmp_path / "target_labels.csv").read_text().splitlines()
    assert rows[0] == "uri,label" and len(rows) == 9 and {r.split(",")[1] for r in rows[1:]} == set(CLASSES)


def test_every_bad_clip_is_refused_with_its_reason(tmp_path):
    root = tmp_path / "src"
    _write_folder(root / "walk" / "good", _frames(4))
    _write_folder(root / "walk" / "short", _frames(3, seed=2))
    _write_folder(root / "walk" / "corrupt", _frames(4, seed=3))
    png = (root / "walk" / "corrupt" / "0002.png").read_bytes()
    (root / "walk" / "corrupt" / "0002.png").write_bytes(png[: len(png) // 2])
    _write_folder(root / "walk" / "notes", _frames(4, seed=4))
    (root / "walk" / "notes" / "notes.txt").write_text("not a frame")
    shutil.copytree(root / "walk" / "good", root / "walk" / "zcopy")
    (root / "walk" / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    (root / "walk" / "readme.txt").write_text("hello")
    (root / "walk" / "still.gif").write_bytes(_gif(_frames(1)))
    gif = _gif(_frames(6, seed=5))
    (root / "walk" / "cut.gif").write_bytes(gif[: len(gif) * 2 // 3])
    (root / "stray.png").write_bytes(png)

    listing = list_clips(str(root))
    assert [c.uri.rsplit("/", 1)[1] for c in listing.clips] == ["good"]
    reasons = {uri.rsplit("/", 1)[1]: (reason, clip_id) for uri, reason, clip_id in listing.rejects}
    assert reasons["short"][0] == "3 frames, need at least 4" and reasons["short"][1] is not None
    assert reasons["corrupt"][0].startswith("frame 0002.png: truncated or corrupt image")
    assert reasons["notes"][0] == "holds 'notes.txt', not a frame (frames are *.png, *.jpg, *.jpeg)"
    assert reasons["zcopy"] == (f"duplicate of {listing.clips[0].uri}", listing.clips[0].clip_id)
    assert reasons["clip.mp4"][0].startswith("video file: .mp4 clips are not supported yet")
    assert "PyAV" in reasons["clip.mp4"][0] and reasons["clip.mp4"][1] is None
    assert reasons["readme.txt"][0].startswith("not a clip")
    assert reasons["still.gif"][0] == "1 frame, need at least 4"
    assert "truncated or corrupt" in reasons["cut.gif"][0]
    assert reasons["stray.png"][0].startswith("a file outside the class folders")
    assert len(listing.rejects) == 9


def test_a_dataset_without_a_valid_clip_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="dataset not found"):
        list_clips(str(tmp_path / "missing"))
    _write_folder(tmp_path / "walk" / "short", _frames(2))
    with pytest.raises(DatasetError, match=r"no valid clips .*short: 2 frames, need at least 4"):
        list_clips(str(tmp_path))
    assert list_clips(str(tmp_path), min_frames=2).clips[0].frames == 2


def test_identical_clips_under_two_labels_are_both_refused(tmp_path):
    _write_folder(tmp_path / "walk" / "a", _frames(4))
    shutil.copytree(tmp_path / "walk" / "a", tmp_path / "wave" / "a")
    _write_folder(tmp_path / "wave" / "b", _frames(4, seed=1))
    listing = list_clips(str(tmp_path))
    assert [c.label for c in listing.clips] == ["wave"] and listing.classes == ["wave"]
    assert [r for _, r, _ in listing.rejects] == ["conflicting labels for identical clips: walk, wave"] * 2


def test_sample_frames_takes_the_middle_of_equal_segments():
    assert sample_frames(8, 4) == [1, 3, 5, 7]
    assert sample_frames(5, 5) == [0, 1, 2, 3, 4]
    assert sample_frames(3, 6) == [0, 0, 1, 1, 2, 2]  # a short clip repeats frames, in order
    assert sample_frames(1, 3) == [0, 0, 0]
    assert sample_frames(100, 8) == sample_frames(100, 8)  # no random offset
    with pytest.raises(ValueError):
        sample_frames(0, 4)


def test_load_clips_reads_both_formats_alike_in_time_order(tmp_path):
    clip = _frames(6)
    _write_folder(tmp_path / "walk" / "a", clip)
    (tmp_path / "wave").mkdir()
    (tmp_path / "wave" / "b.gif").write_bytes(_gif(clip))
    folder, animated = list_clips(str(tmp_path)).clips
    x = load_clips([folder, animated], t=3, size=S)
    assert x.shape == (2, 3, 3, S, S) and x.dtype == torch.uint8
    assert torch.equal(x[0], x[1])  # the GIF's palette holds these few colours exactly
    expected = torch.from_numpy(clip[[1, 3, 5]]).permute(0, 3, 1, 2)  # sample_frames(6, 3)
    assert torch.equal(x[0], expected)
    assert load_clip(folder, t=4, size=8).shape == (4, 3, 8, 8)
    (tmp_path / "walk" / "a" / "0005.png").unlink()
    with pytest.raises(DatasetError, match="5 frames, listed with 6"):
        load_clip(folder, t=3, size=S)


def test_the_temporal_encoder_sees_order_and_checks_its_input():
    torch.manual_seed(0)
    encoder = video.TemporalEncoder(in_dim=10, steps=5, hidden=8)
    x = torch.randn(3, 5, 10)
    out = encoder(x)
    assert out.shape == (3, 8)
    assert not torch.allclose(out, encoder(x.flip(1)))  # a mean of the frames could not tell them apart
    with pytest.raises(ValueError, match=r"\(N, 5, D\)"):
        encoder(torch.randn(3, 4, 10))


@pytest.fixture(scope="module")
def motion(tmp_path_factory):
    """Source frame features (N, T, D) of the motion shift, their labels, and the classes. 64 px: at 32 px
    the backbone's last map is 1x1 and its pooled embedding barely says where the square is."""
    shift = make_motion_shift(str(tmp_path_factory.mktemp("motion")), per_class=16, frames=8, size=64)
    source = list_clips(shift.source_uri)
    feats = video.frame_features(load_clips(source.clips, 8, 64), BackboneConfig())
    labels = torch.tensor([source.classes.index(c.label) for c in source.clips])
    return feats, labels, source.classes


def test_a_model_trained_on_motion_reads_a_reversed_clip_as_the_opposite_motion(motion):
    feats, labels, classes = motion
    algorithm = video.fit_video("source_only", feats, labels, feats, steps=100, seed=0)
    assert (video.predict_video(algorithm, feats).argmax(1) == labels).float().mean() > 0.9
    # The reversed clips were never trained on; a model blind to order would read each as its own class.
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    reversed_pred = video.predict_video(algorithm, feats.flip(1)).argmax(1)
    want = torch.tensor([classes.index(opposite[classes[y]]) for y in labels])
    for name in ("left", "right"):
        mine = labels == classes.index(name)
        flipped = (reversed_pred[mine] == want[mine]).float().mean()
        assert flipped >= 0.75, f"{name}: only {flipped:.2f} of the reversed clips read as {opposite[name]}"
    assert (reversed_pred == want).float().mean() >= 0.75  # up and down too


@pytest.mark.parametrize("method", [m for m in ALGORITHMS if m != "zero_shot"])  # zero_shot needs CLIP's text
def test_every_algorithm_trains_on_clips_and_is_deterministic(method):
    g = torch.Generator().manual_seed(0)
    source, target = torch.randn(24, 4, 12, generator=g), torch.randn(20, 4, 12, generator=g) + 0.5
    labels = torch.arange(24) % 3
    hp = {
        "batch_size": 8,
        "bottleneck_dim": 16,
        **({"disc_hidden": 16} if "disc_hidden" in ALGORITHMS[method].space else {}),
    }
    a = video.fit_video(method, source, labels, target, steps=4, seed=0, hparams=hp, hidden=8)
    b = video.fit_video(method, source, labels, target, steps=4, seed=0, hparams=hp, hidden=8)
    assert isinstance(a.featurizer, video.TemporalEncoder) and int(a.num_updates) == 4
    p = video.predict_video(a, target)
    assert p.shape == (20, 3) and all(math.isfinite(v) for v in p.flatten().tolist())
    assert torch.allclose(p.sum(1), torch.ones(20))
    assert torch.equal(p, video.predict_video(b, target))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
