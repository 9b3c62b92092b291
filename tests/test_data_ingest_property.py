"""Ingestion on hostile bytes (Hypothesis): random bytes, valid images cut short anywhere, and random data
behind real image headers. Whatever the files hold, each one is either indexed or rejected with a reason,
never both, never an exception, and no reason quotes the file's content."""

from __future__ import annotations

import io
import uuid

import fsspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from adaptflow.config import IngestConfig
from adaptflow.data.ingest import ingest
from adaptflow.store import storage

CFG = IngestConfig(workers=2, max_image_pixels=1 << 20)
FORMATS = ["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"]
# What the decoders key on: signatures (and, for BMP, a header whose sizes are random below).
HEADERS = [
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff\xe0",
    b"\xff\xd8\xff\xdb",
    b"GIF89a",
    b"GIF87a",
    b"BM",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"II*\x00",
    b"MM\x00*",
    b"\x00\x00\x01\x00",
    b"P6\n",
    b"%PDF-1.4",
]


def _encoded(fmt: str, seed: int, size: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


@st.composite
def truncated_images(draw) -> bytes:
    data = _encoded(draw(st.sampled_from(FORMATS)), draw(st.integers(0, 2**16)), draw(st.integers(1, 24)))
    return data[: draw(st.integers(0, len(data)))]


@st.composite
def random_behind_a_header(draw) -> bytes:
    return draw(st.sampled_from(HEADERS)) + draw(st.binary(max_size=512))


@st.composite
def flipped_images(draw) -> bytes:
    """A valid image with a few bytes overwritten: headers that lie about sizes, broken chunks."""
    data = bytearray(_encoded(draw(st.sampled_from(FORMATS)), draw(st.integers(0, 2**16)), 8))
    for _ in range(draw(st.integers(1, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


hostile = st.one_of(st.binary(max_size=1024), truncated_images(), random_behind_a_header(), flipped_images())
names = st.sampled_from(["a.png", "b.jpg", "c.gif", "d.bmp", "e.webp", "f.tif", "g", "h.txt", "i.jpeg"])


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=st.lists(st.tuples(names, hostile), min_size=1, max_size=6))
def test_every_file_is_indexed_or_rejected_with_a_reason(files):
    root = f"memory://hostile-{uuid.uuid4().hex[:12]}"
    try:
        uris = {}
        for i, (name, data) in enumerate(files):
            uri = storage.join(root, "data", f"{i}-{name}")
            storage.write_bytes(uri, data)
            uris[uri] = data
        good = storage.join(root, "data", "good.png")  # one valid image: the dataset itself is never empty
        storage.write_bytes(good, _encoded("PNG", 0, 4))

        m = ingest(storage.join(root, "data"), "target", storage.join(root, "out"), CFG)

        indexed = set(storage.read_table(m.index_uri)["uri"].to_pylist())
        rejects = storage.read_table(m.rejects_uri).to_pandas()
        rejected = dict(zip(rejects.uri, rejects.reason, strict=True))
        assert good in indexed or rejected.get(good, "").startswith("duplicate of ")
        assert indexed | set(rejected) == {*uris, good} and not indexed & set(rejected)
        assert m.n_images == len(indexed) and m.n_rejected == len(rejected)
        for uri, reason in rejected.items():
            assert reason and reason.strip() == reason
            data = uris.get(uri, b"")
            if len(data) >= 4:
                assert repr(data[:8]) not in reason  # the content is never quoted
    finally:
        fs = fsspec.filesystem("memory")
        if fs.exists(root):
            fs.rm(root, recursive=True)
