"""Export for serving: the exported file, run by ONNX Runtime (or TorchScript), gives adaptflow's own
probabilities on the same images, for every model kind; the registry records each export."""

import json

import numpy as np
import pytest
import torch

from adaptflow.adapt import candidates as adaptation
from adaptflow.adapt.algorithms import candidate_hparams
from adaptflow.adapt.baseline import fit_head
from adaptflow.adapt.images import load_images
from adaptflow.adapt.inference import infer, load_model
from adaptflow.data.ingest import ingest, read_index
from adaptflow.errors import ModelError, UnknownNameError
from adaptflow.extract import features
from adaptflow.manifests import RunData
from adaptflow.models import registry
from adaptflow.serve import export
from adaptflow.store import storage

KINDS = {"head": 1, "features": 2, "images": 3}  # registry versions the fixture gives each kind


def _registered(store, model_uri, run_id, method):
    lineage = registry.Lineage(dataset_snapshot="d", extractor_fingerprint="f", config_hash="c", code_version="t")
    metrics = {
        "selection_score": 0.5,
        "source_val_accuracy": 0.5,
        "target_accuracy": None,
        "source_test_accuracy": None,
    }
    return registry.register(store, model_uri, run_id, lineage, metrics, method).version


def _embedded(demo_data, root: str, cfg):
    """The demo's source and target ingested into `root` and embedded: (source, target, extraction plan)."""
    src = ingest(demo_data.source_uri, "source", f"{root}/ingest/source", cfg.ingest)
    tgt = ingest(demo_data.target_uri, "target", f"{root}/ingest/target", cfg.ingest)
    plan = features.plan_extraction([src.index_uri, tgt.index_uri], root, cfg.backbone, 10_000)
    for shard in plan.shards:
        features.extract_shard(shard, cfg.backbone, cfg.extract)
    return src, tgt, plan


@pytest.fixture(scope="module")
def store(demo_data, fast_config, tmp_path_factory):
    """A store with three registered models, one of each kind, trained on features stored in float32 (the
    default float16 storage rounds the features a head kind reads: see the test at the end)."""
    cfg = fast_config.model_copy(
        update={
            "extract": fast_config.extract.model_copy(update={"dtype": "float32"}),
            "adapt": fast_config.adapt.model_copy(update={"feature_steps": 100, "image_steps": 8, "image_size": 32}),
        }
    )
    root = str(tmp_path_factory.mktemp("export"))
    src, tgt, plan = _embedded(demo_data, root, cfg)
    head = fit_head(src, plan, cfg, f"{root}/models/run0")
    assert _registered(root, head.model_uri, "run0", "head") == KINDS["head"]
    for mode in ("features", "images"):
        spec = adaptation.CandidateSpec(
            name=f"dann-{mode}", method="dann", mode=mode, seed=0, hparams=candidate_hparams("dann", mode, 0)
        )
        data = RunData(source=src, target=tgt, features=plan)
        c = adaptation.train_candidate(spec, data, cfg, f"{root}/runs/run1/candidates/{spec.name}")
        assert _registered(root, c.model_uri, "run1", spec.name) == KINDS[mode]
    return root, tgt, plan


def _data_config(meta: dict) -> dict:
    """The transform a serving client applies, rebuilt from the JSON beside the export."""
    p = meta["preprocessing"]
    return {
        "input_size": (3, p["input_size"], p["input_size"]),
        "interpolation": p["interpolation"],
        "mean": p["mean"],
        "std": p["std"],
        "crop_pct": p["crop_pct"],
        "crop_mode": p["crop_mode"],
    }


def _adaptflow_probabilities(model_uri, images, plan):
    model, card = load_model(model_uri)
    logits, _ = infer(model, card, images, plan)
    return logits.softmax(1).numpy()


@pytest.mark.parametrize("kind", list(KINDS))
def test_onnx_runtime_gives_adaptflows_own_probabilities(store, kind, tmp_path):
    import onnx
    import onnxruntime as ort

    root, tgt, plan = store
    out = str(tmp_path / f"{kind}.onnx")
    manifest = export.export_registered(root, f"v{KINDS[kind]}", out)
    meta = json.loads(storage.read_bytes(out + ".json"))
    model_uri = registry.resolve(root, f"v{KINDS[kind]}").model_uri
    assert manifest.kind == kind and manifest.model_uri == model_uri and manifest.version == KINDS[kind]
    assert manifest.max_abs_diff <= export.TOLERANCE and manifest.checked_batch_sizes == [1, 3]

    # the preprocessing and classes are in the file and beside it
    proto = onnx.load(out)
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["classes"]) == meta["classes"] == load_model(model_uri)[1].classes
    assert json.loads(props["adaptflow"]) == {k: v for k, v in meta.items() if k not in ("file", "check")}
    assert meta["input"] == {
        "name": "images",
        "dtype": "uint8",
        "shape": ["batch", 3, manifest.input_size, manifest.input_size],
        "layout": "NCHW",
        "channels": "RGB",
        "range": [0, 255],
    }
    assert meta["file"]["bytes"] == manifest.bytes == (tmp_path / f"{kind}.onnx").stat().st_size
    (batch_dim, *_) = proto.graph.input[0].type.tensor_type.shape.dim
    assert batch_dim.dim_param and not batch_dim.dim_value  # dynamic batch

    # every target image, resized as the JSON says, through ONNX Runtime, against adaptflow's own predictions
    index = read_index(tgt)
    x = load_images(index.uri.tolist(), _data_config(meta), num_workers=0).numpy()
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    logits, probabilities = session.run(None, {"images": x})
    expected = _adaptflow_probabilities(model_uri, index, plan)
    diff = float(np.abs(probabilities - expected).max())
    print(
        f"\n{kind}: ONNX Runtime vs adaptflow on {len(x)} images: max abs diff of probabilities {diff:.2e}; "
        f"{manifest.bytes / 1e6:.1f} MB"
    )
    assert diff <= 1e-4
    assert (probabilities.argmax(1) == expected.argmax(1)).all()
    assert np.allclose(probabilities, torch.from_numpy(logits).softmax(1).numpy(), atol=1e-6)
    (one,) = session.run(["probabilities"], {"images": x[:1]})  # any batch size
    assert np.abs(one - probabilities[:1]).max() <= 1e-5

    # the registry records the export
    (recorded,) = [e for e in export.list_exports(root) if e.uri == out]
    assert recorded == manifest


@pytest.mark.parametrize("kind", ["features", "images"])
def test_torchscript_gives_adaptflows_own_probabilities(store, kind, tmp_path):
    root, tgt, plan = store
    out = str(tmp_path / f"{kind}.pt")
    manifest = export.export_registered(root, f"v{KINDS[kind]}", out, "torchscript")
    extra = {export.METADATA_FILE: ""}
    loaded = torch.jit.load(out, _extra_files=extra)
    meta = json.loads(extra[export.METADATA_FILE])
    assert meta["classes"] == manifest.classes and meta["format"] == "torchscript"
    index = read_index(tgt)
    x = load_images(index.uri.tolist(), _data_config(meta), num_workers=0)
    with torch.no_grad():
        _, probabilities = loaded(x)
    diff = float(np.abs(probabilities.numpy() - _adaptflow_probabilities(manifest.model_uri, index, plan)).max())
    print(f"\n{kind}: TorchScript vs adaptflow: max abs diff {diff:.2e}; {manifest.bytes / 1e6:.1f} MB")
    assert diff <= 1e-4


def test_the_readme_serving_example_runs_without_adaptflow(store, tmp_path, demo_data):
    """The five lines the README gives, as they are, in a Python that never imports adaptflow."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root, tgt, _ = store
    export.export_registered(root, "v3", str(tmp_path / "classifier.onnx"))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(import json, numpy as np, onnxruntime as ort.*?)```", readme, re.S).group(1)
    assert len(code.strip().splitlines()) == 5
    photo = read_index(tgt).uri.iloc[0]
    (tmp_path / "photo.jpg").write_bytes(storage.read_bytes(photo))
    probe = code + "\nimport sys; assert not any(m.startswith('adaptflow') for m in sys.modules)\n"
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    label, confidence = done.stdout.split()
    assert label in demo_data.classes and 0 < float(confidence) <= 1


def test_bad_exports_are_one_clear_error(store, tmp_path):
    root, _, _ = store
    with pytest.raises(
        UnknownNameError, match="unknown export format 'tflite'; valid export formats: onnx, torchscript"
    ):
        export.export_registered(root, "v1", str(tmp_path / "m.tflite"), "tflite")
    with pytest.raises(ModelError, match=f"no model at {tmp_path}/nothing"):
        export.export_model(str(tmp_path / "nothing"), str(tmp_path / "m.onnx"))
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.onnx.json").exists()


def test_hog_models_cannot_be_exported(tmp_path):
    from adaptflow.adapt.heads import Head
    from adaptflow.config import load_config
    from adaptflow.models.card import ModelCard, save_model

    cfg = load_config(None, ["backbone.name=hog"])
    card = ModelCard(
        classes=["a", "b"],
        config=cfg,
        fingerprint="f" * 16,
        dim=8,
        config_hash="c",
        dataset_fingerprint="d",
        metrics={},
    )
    save_model(str(tmp_path / "hog"), Head(8, 2), card)
    with pytest.raises(ModelError, match="'hog' backbone cannot be exported"):
        export.export_model(str(tmp_path / "hog"), str(tmp_path / "hog.onnx"))


def test_with_float16_features_the_export_matches_adaptflows_fp32_computation(demo_data, fast_config, tmp_path):
    """The default store keeps embeddings in float16, so a head model's stored-feature predictions carry that
    rounding; the exported graph computes features in fp32 and matches adaptflow's own fp32 computation (the
    backbone on the same normalised images, then the head) within 1e-4."""
    import onnxruntime as ort

    from adaptflow.extract.backbones import build_extractor

    assert fast_config.extract.dtype == "float16"
    root = str(tmp_path / "store")
    src, tgt, plan = _embedded(demo_data, root, fast_config)
    head = fit_head(src, plan, fast_config, f"{root}/models/run0")
    out = str(tmp_path / "head.onnx")
    export.export_model(head.model_uri, out)
    meta = json.loads(storage.read_bytes(out + ".json"))

    index = read_index(tgt)
    x = load_images(index.uri.tolist(), _data_config(meta), num_workers=0)
    (probabilities,) = ort.InferenceSession(out, providers=["CPUExecutionProvider"]).run(
        ["probabilities"], {"images": x.numpy()}
    )
    extractor = build_extractor(fast_config.backbone)
    mean, std = (torch.tensor(meta["preprocessing"][k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    model, _ = load_model(head.model_uri)
    with torch.no_grad():
        fp32 = model.predict(extractor.module((x.float() / 255 - mean) / std)).softmax(1).numpy()
    stored = _adaptflow_probabilities(head.model_uri, index, plan)
    fp32_diff, stored_diff = float(np.abs(probabilities - fp32).max()), float(np.abs(probabilities - stored).max())
    agree = float((probabilities.argmax(1) == stored.argmax(1)).mean())
    print(
        f"\nhead on float16 features: vs adaptflow fp32 {fp32_diff:.2e}; vs stored-feature predictions "
        f"{stored_diff:.2e}, same class for {agree:.1%}"
    )
    assert fp32_diff <= 1e-4
    assert stored_diff <= 1e-2 and agree >= 0.98  # float16 keeps 11 significant bits of each feature


def test_the_command_line_exports_and_lists_the_export(store, tmp_path, capsys, monkeypatch):
    from cli.main import main

    monkeypatch.setenv("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")  # what --quiet sets, undone after
    root, _, _ = store
    out = str(tmp_path / "champion.pt")
    registry.gate(root, KINDS["features"], None, 0.0)  # v2 becomes the champion
    assert (
        main(["models", "export", "champion", "--format", "torchscript", "--out", out, "--store", root, "--quiet"]) == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == out and lines[0].startswith(
        "exported v2 (features model, dann, 10 classes, 64 px) as torchscript: "
    )
    assert main(["models", "list", "--store", root, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["aliases"] == {"champion": 2}
    v2 = next(v for v in listed["versions"] if v["version"] == 2)
    assert v2["aliases"] == ["champion"] and v2["metrics"]["selection_score"] == 0.5
    assert [(e["format"], e["uri"]) for e in v2["exports"]][-1] == ("torchscript", out)
    assert main(["models", "export", "v9", "--out", str(tmp_path / "x.onnx"), "--store", root]) == 2
    assert "error: no model version 9" in capsys.readouterr().err
