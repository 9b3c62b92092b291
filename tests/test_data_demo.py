"""adaptflow.data.demo: the generated source/target shift has the promised layout and ingests cleanly."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from adaptflow.config import IngestConfig
from adaptflow.data.demo import make_demo_data
from adaptflow.data.ingest import ingest
from adaptflow.store import storage

CFG = IngestConfig(workers=2)


def _files(uri: str) -> list[str]:
    fs, path = storage.filesystem(uri)
    return sorted(p[len(path) + 1 :] for p in fs.find(path))


def _open(uri: str) -> Image.Image:
    return Image.open(io.BytesIO(storage.read_bytes(uri)))


@pytest.fixture
def demo(memory_uri):
    return make_demo_data(f"{memory_uri}/demo", image_size=16, seed=0, max_per_domain=20)


def test_demo_layout(demo, memory_uri):
    assert demo.classes == [str(d) for d in range(10)]
    source = _files(demo.source_uri)
    assert len(source) == 20 and {f.split("/")[0] for f in source} == set(demo.classes)  # 2 per class
    target = _files(demo.target_uri)
    assert len(target) == 22 and {"broken_empty.jpg", "broken_truncated.jpg"} <= set(target)
    assert all(f.endswith(".jpg") and "/" not in f for f in target)
    source_ids = {f.split("/")[1] for f in source}
    assert not source_ids & set(target)  # the two domains never share a digit sample

    grey, colour = _open(f"{demo.source_uri}/{source[0]}"), _open(f"{demo.target_uri}/{target[0]}")
    assert (grey.mode, grey.format, grey.size) == ("L", "PNG", (16, 16))
    assert (colour.mode, colour.format, colour.size) == ("RGB", "JPEG", (16, 16))
    assert demo.target_labels_uri == f"{memory_uri}/demo/target_labels.csv"


def test_demo_is_deterministic(demo, memory_uri):
    again = make_demo_data(f"{memory_uri}/again", image_size=16, seed=0, max_per_domain=20)
    for a, b in [(demo.source_uri, again.source_uri), (demo.target_uri, again.target_uri)]:
        assert _files(a) == _files(b)
        assert all(storage.read_bytes(f"{a}/{f}") == storage.read_bytes(f"{b}/{f}") for f in _files(a))


def test_demo_ingests_with_two_target_rejects_and_matching_labels(demo, memory_uri):
    out = f"{memory_uri}/ingest"
    source = ingest(demo.source_uri, "source", f"{out}/source", CFG)
    target = ingest(demo.target_uri, "target", f"{out}/target", CFG)
    labels = ingest(demo.target_labels_uri, "target_labels", f"{out}/target_labels", CFG)
    assert (source.n_images, source.n_rejected, source.classes) == (20, 0, demo.classes)

    rejects = storage.read_table(target.rejects_uri).to_pandas()
    assert list(rejects.uri) == [
        f"{demo.target_uri}/broken_empty.jpg",
        f"{demo.target_uri}/broken_truncated.jpg",
    ]
    assert rejects.reason[0] == "empty file" and rejects.reason[1].startswith("truncated or corrupt image (")
    assert (target.n_images, target.classes) == (20, [])

    target_ids = storage.read_table(target.index_uri).to_pandas().set_index("uri").image_id
    labelled = storage.read_table(labels.index_uri).to_pandas().set_index("uri")
    assert (labels.n_images, labels.n_rejected, labels.classes) == (20, 0, demo.classes)
    assert labelled.image_id.to_dict() == target_ids.to_dict()  # same files, same URIs, same ids
