"""A registered adaptflow model as an MLflow pyfunc, so `mlflow.pyfunc.load_model("models:/adaptflow@champion")`
serves it where adaptflow is installed (needs `adaptflow[mlflow]`).

Input: a DataFrame with a column `image` (encoded image bytes: JPEG, PNG, ...) or `uri` (a path or URI any
fsspec filesystem reads). Output: a DataFrame with `prediction` (the class name), `confidence` and
`probabilities` (one float per class, in the order of the model's classes), one row per input row. The
model is the exported one (`adaptflow.serve.export.serving_model`): backbone and head in one module, fed
the backbone's own resize and crop, so it predicts what `adaptflow predict` predicts.
"""

from __future__ import annotations

import functools
import os
import tempfile
from importlib.metadata import version

import numpy as np
import pandas as pd
import torch

from adaptflow.errors import DatasetError, ModelError
from adaptflow.store import storage

ARTIFACT = "adaptflow_model"  # the model folder (weights.safetensors, model.json) inside the MLflow model
_FILES = ("weights.safetensors", "model.json")


@functools.cache
def pyfunc_class() -> type:
    """The `mlflow.pyfunc.PythonModel` class, made on first use: MLflow is an extra, imported only here."""
    import mlflow.pyfunc

    class AdaptflowPyfunc(mlflow.pyfunc.PythonModel):
        def load_context(self, context) -> None:
            from adaptflow.adapt.inference import load_model
            from adaptflow.data.preprocess import geometric_transform
            from adaptflow.serve.export import serving_model

            model, card = load_model(context.artifacts[ARTIFACT])
            self.module, data_config = serving_model(model, card)
            self.transform = geometric_transform(data_config)
            self.classes = list(card.classes)

        def predict(self, context, model_input, params=None):
            return predict(self.module, self.transform, self.classes, model_input)

    return AdaptflowPyfunc


def predict(module: torch.nn.Module, transform, classes: list[str], model_input: pd.DataFrame) -> pd.DataFrame:
    """`model_input`'s images (column `image`: encoded bytes, or `uri`) through the serving `module`."""
    from adaptflow.data.preprocess import decode_image

    if "image" in model_input:
        blobs = list(model_input["image"])
    elif "uri" in model_input:
        blobs = [storage.read_bytes(u) for u in model_input["uri"]]
    else:
        raise DatasetError(f"expected a column 'image' (bytes) or 'uri', got {list(model_input.columns)}")
    if not blobs:
        return pd.DataFrame({"prediction": [], "confidence": [], "probabilities": []})
    batch = torch.stack([transform(decode_image(bytes(b))) for b in blobs])
    with torch.inference_mode():
        _, proba = module(batch)
    proba = proba.float().numpy()
    return pd.DataFrame(
        {
            "prediction": [classes[i] for i in proba.argmax(1)],
            "confidence": proba.max(1).astype(np.float32),
            "probabilities": list(proba.astype(np.float32)),
        }
    )


def save_pyfunc(model_uri: str, path: str) -> None:
    """Write the adaptflow model at `model_uri` (any fsspec URI) as an MLflow pyfunc model folder at local
    `path`; adaptflow itself is its one requirement."""
    import mlflow.pyfunc

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, ARTIFACT)  # MLflow keeps an artifact folder's name
        os.makedirs(folder)
        for name in _FILES:
            try:
                data = storage.read_bytes(storage.join(model_uri, name))
            except FileNotFoundError:
                raise ModelError(f"damaged model at {model_uri}: {name} is missing") from None
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
        mlflow.pyfunc.save_model(
            path,
            python_model=pyfunc_class()(),
            artifacts={ARTIFACT: folder},
            pip_requirements=[f"adaptflow[mlflow]=={version('adaptflow')}"],
        )
