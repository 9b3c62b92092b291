"""Which target images to ask a person to label: BADGE over a run's selected model, deterministic for a seed,
never an image already labelled."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from adaptflow.errors import DatasetError
from adaptflow.label.suggest import badge, read_labelled, write_ask


def _pool(seed: int = 0, sure: int = 150, unsure: int = 50, classes: int = 5, dim: int = 300):
    """`sure` images predicted at 0.99, `unsure` near uniform; features of `dim`."""
    rng = np.random.default_rng(seed)
    proba = np.full((sure + unsure, classes), 0.01 / (classes - 1))
    proba[np.arange(sure), rng.integers(0, classes, sure)] = 0.99
    proba[sure:] = rng.dirichlet(np.full(classes, 20.0), unsure)
    return proba, rng.normal(size=(sure + unsure, dim))


def test_badge_asks_for_the_images_the_model_doubts():
    proba, features = _pool()
    chosen = badge(proba, features, 20, seed=0)
    assert len(chosen) == len(set(chosen)) == 20 and chosen == sorted(chosen)
    doubted = sum(i >= 150 for i in chosen)
    assert doubted >= 16, doubted  # a quarter of the pool is unsure: 5 of 20 by chance
    assert badge(proba, features, 20, seed=0) == chosen  # deterministic for a seed
    assert badge(proba, features, 20, seed=1) != chosen
    assert badge(proba, features, 500) == list(range(200))  # more asked than there are: all


def test_badge_among_equally_sure_images_spreads_over_their_look():
    """Where the model is as sure of every image, k-means++ on the features alone picks images unlike each
    other: here one from each of four tight clusters before a second from any."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 50, (4, 8))
    features = np.concatenate([c + rng.normal(0, 0.1, (25, 8)) for c in centres])
    proba = np.tile([1.0, 0.0], (100, 1))
    assert {i // 25 for i in badge(proba, features, 4, seed=0)} == {0, 1, 2, 3}


def test_labelled_files_and_the_ask_sheet(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("uri,label\n/a/1.png,cat\n/a/2.png,dog\n")
    assert read_labelled(str(labels)) == {"/a/1.png", "/a/2.png"}
    (tmp_path / "bad.csv").write_text("path,label\nx,cat\n")
    with pytest.raises(DatasetError, match="has no 'uri' column"):
        read_labelled(str(tmp_path / "bad.csv"))

    from PIL import Image

    image = tmp_path / "img.png"
    Image.new("RGB", (300, 200), "red").save(image)
    rows = pd.DataFrame(
        {"uri": [str(image), str(tmp_path / "gone.png")], "image_id": ["a", "b"], "prediction": ["cat", "<b>"]}
    ).assign(confidence=[0.5, 0.25])
    sheet = write_ask(rows, str(tmp_path / "ask.csv"), ["cat", "dog"])
    assert (tmp_path / "ask.csv").read_text() == f"uri,label\n{image},\n{tmp_path / 'gone.png'},\n"
    page = Path(sheet).read_text()
    assert sheet.endswith("ask.html") and page.count("<figure>") == 2 and "data:image/jpeg;base64," in page
    assert "&lt;b&gt;" in page and "<b>" not in page  # escaped
