"""CLIP image encoders as backbones and the zero-shot candidate, offline: a tiny open_clip model with random
weights (its config in tests/fixtures/clip; the tokenizer ships with open_clip)."""

import posixpath
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adaptflow.adapt import plan as planning
from adaptflow.adapt.algorithms import get_algorithm
from adaptflow.adapt.inference import load_model
from adaptflow.config import BackboneConfig, load_config
from adaptflow.errors import AdaptflowError, ConfigError, UnknownNameError
from adaptflow.extract.backbones import build_extractor, zero_shot_classifier
from adaptflow.extract.clip import TEMPLATES

open_clip = pytest.importorskip("open_clip")
TINY = "clip:adaptflow-tiny-clip"


@pytest.fixture(scope="module", autouse=True)
def tiny_clip():
    open_clip.add_model_config(Path(__file__).parent / "fixtures" / "clip" / "adaptflow-tiny-clip.json")


def _save(uri: str, model, cfg, classes: list[str], fingerprint: str, dim: int) -> None:
    """`model`, a zero_shot candidate on `cfg`'s backbone, saved with its card."""
    from synthetic import model_card

    from adaptflow.models.card import save_model

    save_model(uri, model, model_card(cfg, classes, "features", "zero_shot", fingerprint, dim))


def test_a_clip_image_encoder_is_a_backbone_with_its_own_transform():
    ex = build_extractor(BackboneConfig(name=TINY, weights="random"))
    assert ex.dim == 32  # the embedding the text encoder shares, not the tower's width
    assert ex.data_config["input_size"] == (3, 32, 32) and ex.data_config["mean"][0] == pytest.approx(0.4815, 1e-3)
    with torch.inference_mode():
        assert ex.module(torch.rand(2, 3, 32, 32)).shape == (2, 32)
    other = build_extractor(BackboneConfig(name="clip:ViT-B-32", weights="random"))
    assert other.fingerprint != ex.fingerprint


def test_clip_names_and_missing_weights_are_one_clear_error():
    with pytest.raises(UnknownNameError, match=r"unknown open_clip model 'ViT-Nope'; valid .*ViT-B-16"):
        build_extractor(BackboneConfig.model_construct(name="clip:ViT-Nope", weights="random"))
    with pytest.raises(UnknownNameError, match=r"unknown ViT-B-16 weights tag 'nope'; valid .*openai"):
        build_extractor(BackboneConfig.model_construct(name="clip:ViT-B-16/nope"))
    with pytest.raises(AdaptflowError, match=r"names no weights: name them as clip:ViT-B-16/TAG \(TAG one of: openai"):
        build_extractor(BackboneConfig(name="clip:ViT-B-16"))
    with pytest.raises(AdaptflowError, match=r"takes 32x32 images only .* leave backbone.image_size unset"):
        build_extractor(BackboneConfig(name=TINY, weights="random", image_size=64))


def test_published_clip_weights_are_looked_up_in_the_cache_only_when_downloads_are_off(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(AdaptflowError, match=r"vit_base_patch16_clip_224\.openai are not in the Hugging Face cache"):
        build_extractor(BackboneConfig(name="clip:ViT-B-16/openai"))


def test_a_weights_file_reaches_both_towers(tmp_path):
    model = open_clip.create_model("adaptflow-tiny-clip")
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    cfg = BackboneConfig(name=TINY, weights=str(path))
    ex = build_extractor(cfg)
    x = torch.rand(3, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(ex.module(x), model.eval().encode_image(x), atol=1e-5)
    text, scale = zero_shot_classifier(cfg, ["tabby_cat", "sea-lion"])
    tokens = open_clip.get_tokenizer("adaptflow-tiny-clip")([t.format("tabby cat") for t in TEMPLATES])
    with torch.inference_mode():
        prompts = torch.nn.functional.normalize(model.encode_text(tokens), dim=1)
    assert text.shape == (2, 32) and torch.allclose(text.norm(dim=1), torch.ones(2))
    expected = torch.nn.functional.normalize(prompts.mean(0), dim=0)  # the templates' average, for "tabby_cat"
    assert torch.allclose(text[0], expected, atol=1e-5)
    assert scale == pytest.approx(float(model.logit_scale.exp()))


def test_zero_shot_predicts_the_nearest_prompt_and_saves_with_it(tmp_path):
    text = torch.nn.functional.normalize(torch.randn(4, 32), dim=1)
    zs = get_algorithm("zero_shot")(torch.nn.Identity(), 32, 4, {}, max_steps=1)
    zs.use_text(text, 100.0)
    images = 3 * text + 0.01 * torch.randn(4, 32)  # an image embedding near each class's prompts
    assert zs.predict(images).argmax(1).tolist() == [0, 1, 2, 3]
    before = [p.detach().clone() for p in zs.parameters()]
    assert zs.update((images, torch.arange(4)), images) == {"loss": 0.0}
    assert all(torch.equal(a, b) for a, b in zip(before, zs.parameters(), strict=True))  # nothing trains
    cfg = load_config(None, [f"backbone.name={TINY}", "backbone.weights=random"])
    _save(str(tmp_path / "m"), zs, cfg, list("abcd"), "f", 32)
    loaded, _ = load_model(str(tmp_path / "m"))
    assert torch.equal(loaded.predict(images), zs.eval().predict(images))


def test_a_clip_backbone_plans_a_zero_shot_candidate_on_features_only():
    cfg = load_config(None, [f"backbone.name={TINY}", "adapt.methods=[source_only,dann]"])
    specs = planning.plan_candidates(cfg, cuda=False, n_train=100)
    assert [s.name for s in specs] == ["source_only-features", "dann-features", "zero_shot-features"]
    assert next(s for s in specs if s.method == "zero_shot").steps == 1
    with pytest.raises(ConfigError, match="zero_shot needs a CLIP backbone"):
        planning.plan_candidates(load_config(None, ["adapt.method=zero_shot"]), cuda=False)
    with pytest.raises(ConfigError, match="trains on its features only"):
        planning.plan_candidates(load_config(None, [f"backbone.name={TINY}", "adapt.image_methods=[dann]"]), False)


@pytest.mark.slow
def test_a_run_on_a_clip_backbone_has_a_zero_shot_candidate_end_to_end(
    demo_data, fast_config, tmp_path, prefect_harness
):
    """The whole retrain flow on the tiny CLIP: the zero-shot candidate is trained (in no steps), scored,
    predicts the target and competes in selection like the others."""
    from adaptflow.report.records import RunSummary
    from adaptflow.store import storage
    from flows.retrain import retrain

    settings = fast_config.model_dump(mode="json")
    settings["backbone"] = {"name": TINY, "weights": "random"}
    settings["adapt"] |= {"methods": ["source_only"], "image_methods": None}
    store = str(tmp_path / "store")
    run = retrain(demo_data.source_uri, demo_data.target_uri, demo_data.target_labels_uri, store, settings)
    summary = RunSummary.load(storage.join(run, "summary.json"))
    names = [c.name for c in summary.adaptation.candidates]
    assert names == ["source_only-features", "zero_shot-features"]
    zero_shot = summary.adaptation.candidates[1]
    assert zero_shot.steps == 1 and 0 <= zero_shot.target_accuracy <= 1 and "source_val_acc" in zero_shot.scores
    folder = posixpath.dirname(zero_shot.model_uri)
    predictions = storage.read_table(storage.join(folder, "predictions.parquet")).to_pandas()
    assert set(predictions.prediction) <= set(demo_data.classes) and len(predictions) > 0
    assert summary.adaptation.selected in names


def test_a_zero_shot_model_exports_with_parity(tmp_path):
    """Backbone and prompts in one graph: ONNX Runtime gives adaptflow's own probabilities."""
    from adaptflow.serve.export import export_model

    cfg = load_config(None, [f"backbone.name={TINY}", "backbone.weights=random"])
    ex = build_extractor(cfg.backbone)
    zs = get_algorithm("zero_shot")(torch.nn.Identity(), ex.dim, 3, {}, max_steps=1)
    zs.use_text(*zero_shot_classifier(cfg.backbone, ["cat", "dog", "bird"]))
    _save(str(tmp_path / "m"), zs, cfg, ["cat", "dog", "bird"], ex.fingerprint, ex.dim)
    exported = export_model(str(tmp_path / "m"), str(tmp_path / "m.onnx"), "onnx")
    assert exported.method == "zero_shot" and exported.max_abs_diff < 1e-4
