import pyarrow as pa
import pytest

from adaptflow.errors import StoreError
from adaptflow.manifests import IngestManifest
from adaptflow.store import storage


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
    m = IngestManifest(
        domain="source",
        dataset_uri="d",
        index_uri="i",
        rejects_uri="r",
        n_images=1,
        n_rejected=0,
        classes=["a"],
        fingerprint="f",
        seconds=0.1,
    )
    uri = storage.join(memory_uri, "manifest.json")
    m.commit(uri)
    assert IngestManifest.load(uri) == m
    storage.write_json(uri, {**m.model_dump(), "schema_version": 99})
    with pytest.raises(StoreError, match="schema version 99"):
        IngestManifest.load(uri)


def test_relative_paths_are_made_absolute_and_other_uris_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("store0") == str(tmp_path / "store0")
    assert storage.absolute("./a/../store0/") == str(tmp_path / "store0")
    assert storage.absolute("/abs/store") == "/abs/store"
    assert storage.absolute("file://store0") == f"file://{tmp_path}/store0"
    assert storage.absolute("s3://bucket/store") == "s3://bucket/store"
    assert storage.absolute("memory://x/y") == "memory://x/y"


def test_rebase_follows_a_moved_root():
    assert storage.rebase("/old/store/runs/r1/x.parquet", "/old/store", "s3://b/s") == "s3://b/s/runs/r1/x.parquet"
    assert storage.rebase("store0/runs/r1", "store0/", "/new/store0") == "/new/store0/runs/r1"
    assert storage.rebase("/old/store", "/old/store", "/new") == "/new"
    assert storage.rebase("/elsewhere/x", "/old/store", "/new") == "/elsewhere/x"
    assert storage.rebase("/old/store2/x", "/old/store", "/new") == "/old/store2/x"  # a sibling, not inside


def _read_only(folder) -> None:
    """Make `folder` unwritable for this process: mode bits for a user; for root, who ignores them, the
    immutable attribute (skips where chattr is not allowed)."""
    import os
    import subprocess

    folder.chmod(0o555)
    if os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root without chattr: no way to make a folder read-only")


def _writable_again(folder) -> None:
    import os
    import subprocess

    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    folder.chmod(0o755)


@pytest.mark.parametrize("case", ["plain file", "read-only folder", "unknown scheme", "path through a file"])
def test_a_bad_store_location_is_one_store_error_at_once(case, tmp_path):
    import time

    (tmp_path / "plain").write_text("not a folder")
    (tmp_path / "ro").mkdir()
    uri = {
        "plain file": str(tmp_path / "plain"),
        "read-only folder": str(tmp_path / "ro" / "store"),
        "unknown scheme": "foo://x",
        "path through a file": str(tmp_path / "plain" / "store"),
    }[case]
    expected = {
        "plain file": f"cannot use {uri}: it is a file, not a folder",
        "read-only folder": f"cannot write to {uri}: ",
        "unknown scheme": "unknown storage scheme foo:// in foo://x",
        "path through a file": f"cannot write to {uri}: not a directory",
    }[case]
    if case == "read-only folder":
        _read_only(tmp_path / "ro")
    try:
        start = time.monotonic()
        with pytest.raises(StoreError) as e:
            storage.check_writable(uri)
        assert str(e.value).startswith(expected) and "\n" not in str(e.value)
        assert e.value.exit_code == 2 and time.monotonic() - start < 1
        if case != "unknown scheme":  # and a write deeper in the run fails the same way, never a raw OSError
            with pytest.raises(StoreError, match=f"^cannot write {uri}/runs/r1/x.json: "):
                storage.write_json(f"{uri}/runs/r1/x.json", {"a": 1})
    finally:
        _writable_again(tmp_path / "ro")
    assert not list((tmp_path / "ro").iterdir())  # nothing was left behind


def test_check_writable_creates_the_store_and_leaves_no_probe(tmp_path, memory_uri):
    storage.check_writable(str(tmp_path / "new" / "store"))
    assert (tmp_path / "new" / "store").is_dir() and not list((tmp_path / "new" / "store").iterdir())
    storage.check_writable(memory_uri)
    assert storage.list_uris(memory_uri) == []


def test_an_unreachable_store_is_a_transient_error_and_a_missing_file_is_not():
    from adaptflow.errors import StoreUnavailableError, TransientError, is_transient

    unreachable = StoreUnavailableError("store unreachable: s3://b/x (gave up after 60 s)")
    assert isinstance(unreachable, StoreError) and isinstance(unreachable, TransientError)
    assert unreachable.exit_code == 3 and is_transient(unreachable)
    assert StoreError("not found: x").exit_code == 2 and not is_transient(StoreError("not found: x"))
