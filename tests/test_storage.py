import pyarrow as pa
import pytest

from adaptflow import storage
from adaptflow.errors import StoreError
from adaptflow.manifests import IngestManifest


def test_join_keeps_protocols():
    assert storage.join("s3://bucket/a", "b", "c.json") == "s3://bucket/a/b/c.json"
    assert storage.join("memory://x", "y") == "memory://x/y"
    assert storage.join("/tmp/x", "y") == "/tmp/x/y"


@pytest.mark.parametrize("kind", ["local", "file", "memory"])
def test_bytes_json_and_tables_round_trip(kind, tmp_path, memory_uri):
    root = {"local": str(tmp_path), "file": f"file://{tmp_path}", "memory": memory_uri}[kind]
    storage.write_json(storage.join(root, "a", "x.json"), {"k": [1, 2]})
    assert storage.read_json(storage.join(root, "a", "x.json")) == {"k": [1, 2]}
    nbytes = storage.write_table(storage.join(root, "t.parquet"), pa.table({"v": [1, 2, 3]}))
    assert nbytes > 0
    assert storage.read_table(storage.join(root, "t.parquet"))["v"].to_pylist() == [1, 2, 3]
    assert storage.list_uris(storage.join(root, "a"), ".json") == [storage.join(root, "a", "x.json")]


def test_local_writes_leave_no_temporary_files(tmp_path):
    storage.write_bytes(str(tmp_path / "f.bin"), b"abc")
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_missing_files_give_store_errors(memory_uri):
    with pytest.raises(StoreError, match="not found"):
        storage.read_json(storage.join(memory_uri, "nope.json"))
    assert storage.list_uris(storage.join(memory_uri, "nothing")) == []


def test_manifest_schema_version_is_checked(memory_uri):
    m = IngestManifest(domain="source", dataset_uri="d", index_uri="i", rejects_uri="r", n_images=1,
                       n_rejected=0, classes=["a"], fingerprint="f", seconds=0.1)
    uri = storage.join(memory_uri, "manifest.json")
    m.commit(uri)
    assert IngestManifest.load(uri) == m
    storage.write_json(uri, {**m.model_dump(), "schema_version": 99})
    with pytest.raises(StoreError, match="schema version 99"):
        IngestManifest.load(uri)
