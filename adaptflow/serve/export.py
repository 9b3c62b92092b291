"""Models that leave adaptflow: one self-contained file for serving, as ONNX or TorchScript.

The exported graph is the whole classifier, whatever the model's kind: the backbone and the adapted head
(`head` and `features` kinds, which adaptflow runs on cached features, get their backbone composed in
front), with the arithmetic part of the preprocessing inside. One input contract for every kind:

    images         uint8 (N, 3, S, S): RGB, channels first, already resized and centre-cropped to S as
                   `preprocessing` says; N is free (dynamic batch)
    logits         float32 (N, C)
    probabilities  float32 (N, C): softmax of the logits, columns in the order of `classes`

uint8 because it is what a decoder and a resize hand over, and exactly what adaptflow's own models see
after their resize and crop (extraction and end-to-end training resize in uint8 too), so nothing is
rounded differently; inside the graph the pixels are scaled to [0, 1] and normalised with the recorded
mean and std. The preprocessing, the classes and where the model came from are in the file's metadata
(ONNX `metadata_props`, TorchScript's extra file `adaptflow.json`) and in `{out}.json` beside it, which
is written last: an export without it is incomplete. Every export is checked before it is committed:
the written file, run by ONNX Runtime (or TorchScript), must give the probabilities the adaptflow model
gives on the same images, within `TOLERANCE`, at two batch sizes.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np
import torch
from torch import nn

from adaptflow.adapt.inference import load_model
from adaptflow.errors import ConfigError, ModelError
from adaptflow.manifests import ExportManifest
from adaptflow.models.card import ModelCard
from adaptflow.store import layout, storage

TOLERANCE = 1e-4  # max abs difference of probabilities, exported file against the adaptflow model (fp32)
OPSET = 18
INPUT, OUTPUTS = "images", ("logits", "probabilities")
METADATA_FILE = "adaptflow.json"  # inside a TorchScript archive


class ServingModel(nn.Module):
    """uint8 images (N, 3, S, S) -> (logits, probabilities): normalisation, backbone and head in one graph."""

    def __init__(self, model: nn.Module, backbone: nn.Module | None, data_config: dict):
        super().__init__()
        self.model, self.backbone = model, backbone
        self.register_buffer("mean", torch.tensor(data_config["mean"], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(data_config["std"], dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.backbone is None:  # images kind: its ImageFeaturizer scales and normalises uint8 itself
            logits = self.model.predict(images)
        else:  # as extraction's transform: ToDtype(scale=True), then Normalize
            x = (images.float() / 255.0 - self.mean) / self.std
            logits = self.model.predict(self.backbone(x))
        return logits, logits.softmax(dim=1)


def serving_model(model: nn.Module, card: ModelCard) -> tuple[ServingModel, dict]:
    """The adaptflow model `model` (as `load_model` returns it) as one uint8-in module, in eval mode, and
    the data config of its input. Head kinds get the backbone they read features from."""
    from adaptflow.extract.backbones import build_extractor

    backbone_cfg = card.config.backbone
    if backbone_cfg.name == "hog":
        raise ModelError(
            "a model on the 'hog' backbone cannot be exported: HOG runs in scikit-image on NumPy, "
            "outside the graph; export a model on a neural backbone"
        )
    if card.kind == "images":
        data_config = build_extractor(backbone_cfg.model_copy(update={"image_size": card.image_size})).data_config
        return ServingModel(model, None, data_config).eval(), dict(data_config)
    extractor = build_extractor(backbone_cfg)
    if extractor.fingerprint != card.fingerprint:
        raise ModelError(
            f"the model reads features {card.fingerprint}, but its backbone now gives "
            f"{extractor.fingerprint}: its weights file changed since training"
        )
    return ServingModel(model, extractor.module, extractor.data_config).eval(), dict(extractor.data_config)


def preprocessing(data_config: dict) -> dict:
    """What to do to an image before the model, as the backbone's transform does it (timm's eval transform)."""
    size = int(data_config["input_size"][-1])
    return {
        "input_size": size,
        "resize": math.floor(size / data_config["crop_pct"]),  # the shorter side (crop_mode center), or both
        "interpolation": data_config["interpolation"],
        "crop_mode": data_config["crop_mode"],
        "crop_pct": data_config["crop_pct"],
        "mean": list(data_config["mean"]),
        "std": list(data_config["std"]),
        "inside_the_model": "x / 255, then (x - mean) / std",
    }


def serving_metadata(card: ModelCard, data_config: dict, fmt: str, model_uri: str, version: int | None) -> dict:
    from adaptflow.models.registry import code_version

    size = int(data_config["input_size"][-1])
    return {
        "format": fmt,
        "input": {
            "name": INPUT,
            "dtype": "uint8",
            "shape": ["batch", 3, size, size],
            "layout": "NCHW",
            "channels": "RGB",
            "range": [0, 255],
        },
        "outputs": [
            {"name": "logits", "dtype": "float32", "shape": ["batch", len(card.classes)]},
            {"name": "probabilities", "dtype": "float32", "shape": ["batch", len(card.classes)]},
        ],
        "classes": list(card.classes),
        "preprocessing": preprocessing(data_config),
        "model": {
            "kind": card.kind,
            "method": card.method,
            "backbone": card.config.backbone.name,
            "registry_version": version,
            "model_uri": model_uri,
            "fingerprint": card.fingerprint,
            "config_hash": card.config_hash,
            "dataset_fingerprint": card.dataset_fingerprint,
            "metrics": card.metrics,
        },
        "exported_by": f"adaptflow {code_version()}",
    }


def export_model(model_uri: str, out_uri: str, fmt: str = "onnx", version: int | None = None) -> ExportManifest:
    """Export the adaptflow model at `model_uri` to `out_uri` (+ `out_uri`.json), checked before commit."""
    from adaptflow.errors import lookup
    from adaptflow.models.registry import code_version

    exporter, check = lookup(FORMATS, "export format", fmt)
    start = time.perf_counter()
    model, card = load_model(model_uri)
    module, data_config = serving_model(model, card)
    meta = serving_metadata(card, data_config, fmt, model_uri, version)
    size = int(data_config["input_size"][-1])
    try:
        blob = exporter(module, size, meta)
    except ModelError:
        raise
    except Exception as e:  # the exporter's own errors: an operator or a Python construct it cannot trace
        raise ModelError(f"cannot export the model at {model_uri} to {fmt}: {str(e).strip().splitlines()[0]}") from None
    diff, sizes = _check(module, blob, size, check)
    if not diff <= TOLERANCE:  # NaN fails too
        raise ModelError(
            f"the {fmt} export of {model_uri} disagrees with the model: probabilities differ by "
            f"{diff:.2e} (> {TOLERANCE:g}); nothing was written"
        )
    metadata_uri = out_uri + ".json"
    storage.write_bytes(out_uri, blob)
    manifest = ExportManifest(
        format=fmt,
        uri=out_uri,
        metadata_uri=metadata_uri,
        bytes=len(blob),
        sha256=hashlib.sha256(blob).hexdigest(),
        model_uri=model_uri,
        version=version,
        kind=card.kind,
        method=card.method,
        classes=list(card.classes),
        input_size=size,
        max_abs_diff=diff,
        checked_batch_sizes=sizes,
        exported_at=datetime.now(UTC).isoformat(timespec="seconds"),
        code_version=code_version(),
        seconds=time.perf_counter() - start,
    )
    storage.write_json(
        metadata_uri,
        {
            **meta,
            "file": {"uri": out_uri, "bytes": len(blob), "sha256": manifest.sha256},
            "check": {"max_abs_diff": diff, "batch_sizes": sizes, "tolerance": TOLERANCE},
        },
    )
    return manifest


def export_registered(store: str, ref: str, out_uri: str, fmt: str = "onnx") -> ExportManifest:
    """Export what `ref` names (`champion`, `challenger`, `v3`, or a model folder) and, for a registry version,
    record the export in the registry."""
    from adaptflow.models import registry

    if not registry.is_ref(ref):
        return export_model(ref, out_uri, fmt)
    mv = registry.resolve(store, ref)
    manifest = export_model(mv.model_uri, out_uri, fmt, version=mv.version)
    record_export(store, manifest)
    return manifest


def record_export(store: str, manifest: ExportManifest) -> str:
    """One file per export, never changed: `{store}/registry/exports/{version:06d}-{time}-{id}.json`."""
    name = f"{manifest.version or 0:06d}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:8]}.json"
    uri = storage.join(layout.exports_uri(store), name)
    manifest.commit(uri)
    return uri


def list_exports(store: str) -> list[ExportManifest]:
    """Every recorded export, by version, then time."""
    return [ExportManifest.load(u) for u in storage.list_uris(layout.exports_uri(store), ".json")]


def _check(
    module: ServingModel, blob: bytes, size: int, run: Callable[[bytes, np.ndarray], np.ndarray]
) -> tuple[float, list[int]]:
    """Max abs difference of probabilities between `module` and the exported `blob`, on seeded random
    images at two batch sizes (the batch axis must really be free)."""
    gen = torch.Generator().manual_seed(0)
    diffs, sizes = [], [1, 3]
    for n in sizes:
        x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
        with torch.no_grad():
            expected = module(x)[1].numpy()
        got = run(blob, x.numpy())
        if got.shape != expected.shape:
            raise ModelError(
                f"the exported model gives shape {got.shape} for a batch of {n}, expected {expected.shape}"
            )
        diffs.append(float(np.abs(got - expected).max()))
    return max(diffs), sizes


def _export_onnx(module: ServingModel, size: int, meta: dict) -> bytes:
    try:
        import onnx
    except ImportError:
        raise ConfigError("exporting to ONNX needs the onnx extra: pip install 'adaptflow[onnx]'") from None
    example = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals, not the user's business
        program = torch.onnx.export(
            module,
            (example,),
            None,
            input_names=[INPUT],
            output_names=list(OUTPUTS),
            dynamic_shapes={INPUT: {0: torch.export.Dim("batch", min=1)}},
            dynamo=True,
            opset_version=OPSET,
            verbose=False,
        )
        path = os.path.join(tmp, "model.onnx")
        program.save(path)
        proto = onnx.load(path)
    for key, value in (
        ("adaptflow", json.dumps(meta, sort_keys=True)),
        ("classes", json.dumps(meta["classes"])),
        ("preprocessing", json.dumps(meta["preprocessing"], sort_keys=True)),
    ):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = (
        f"adaptflow {meta['model']['kind']} model ({meta['model']['method']} on "
        f"{meta['model']['backbone']}): uint8 RGB NCHW images in, logits and probabilities out"
    )
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _run_onnx(blob: bytes, x: np.ndarray) -> np.ndarray:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("checking an ONNX export needs onnxruntime: pip install 'adaptflow[onnx]'") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {INPUT: x})[0]


def _export_torchscript(module: ServingModel, size: int, meta: dict) -> bytes:
    example = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream in favour of torch.export; it still works
        traced = torch.jit.trace(module, (example,), check_trace=False)
        torch.jit.save(traced, buffer, _extra_files={METADATA_FILE: json.dumps(meta, sort_keys=True)})
    return buffer.getvalue()


def _run_torchscript(blob: bytes, x: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(io.BytesIO(blob), map_location="cpu")
        return loaded(torch.from_numpy(x))[1].numpy()


FORMATS: dict[str, tuple[Callable[[ServingModel, int, dict], bytes], Callable[[bytes, np.ndarray], np.ndarray]]] = {
    "onnx": (_export_onnx, _run_onnx),
    "torchscript": (_export_torchscript, _run_torchscript),
}
