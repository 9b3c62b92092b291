import os
import tempfile
import uuid

# Before anything imports prefect: no telemetry, and a throwaway Prefect home for the whole session.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="adaptflow-prefect-")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and a second one only spins on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API (SQLite) for tests that run flows or tasks."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def memory_uri():
    """A fresh memory:// folder, removed afterwards."""
    import fsspec

    uri = f"memory://t-{uuid.uuid4().hex[:8]}"
    yield uri
    fs = fsspec.filesystem("memory")
    if fs.exists(uri):
        fs.rm(uri, recursive=True)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small copy of the demo shift: 10 digit classes, grey source folders, colour target folder."""
    from adaptflow.data.demo import make_demo_data

    return make_demo_data(str(tmp_path_factory.mktemp("demo")), image_size=32, seed=0, max_per_domain=150)


@pytest.fixture(scope="session")
def demo_data_40(tmp_path_factory):
    """The demo shift at 40 images a class, for the end-to-end runs that need the first model promoted: at
    `demo_data`'s 15 a class the source-only head sits on the line where one class takes 60 % of its target
    predictions (collapsed, so the gate rightly promotes nothing) and falls on either side of it with the
    seed or the order of the store's rows."""
    from adaptflow.data.demo import make_demo_data

    return make_demo_data(str(tmp_path_factory.mktemp("demo40")), image_size=32, seed=0, max_per_domain=400)


@pytest.fixture(scope="session")
def fast_config():
    """Real EfficientNet-Lite0 weights at 64 px: the real code path, a few seconds per run."""
    from adaptflow.config import load_config

    return load_config(
        None,
        [
            "backbone.image_size=64",
            "extract.shard_size=128",
            "extract.num_workers=0",
            "head.max_epochs=300",
            "head.patience=30",
            "ingest.workers=2",
            "adapt.methods=[source_only, dann]",
            "adapt.image_methods=[dann]",
            "adapt.feature_steps=200",
            "adapt.image_steps=4",
            "adapt.image_size=32",
        ],
    )


@pytest.fixture(scope="module")
def headed_store(demo_data, fast_config, tmp_path_factory):
    """A local store with the demo's source and target ingested and embedded, and a source-only head
    trained: (root, source manifest, target manifest, extraction plan, head)."""
    from adaptflow.adapt.baseline import fit_head
    from adaptflow.data.ingest import ingest
    from adaptflow.extract import features

    root = str(tmp_path_factory.mktemp("headed"))
    src = ingest(demo_data.source_uri, "source", f"{root}/ingest/source", fast_config.ingest)
    tgt = ingest(demo_data.target_uri, "target", f"{root}/ingest/target", fast_config.ingest)
    plan = features.plan_extraction([src.index_uri, tgt.index_uri], root, fast_config.backbone, 10_000)
    for shard in plan.shards:
        features.extract_shard(shard, fast_config.backbone, fast_config.extract)
    return root, src, tgt, plan, fit_head(src, plan, fast_config, f"{root}/models/head")


@pytest.fixture(scope="session")
def s3():
    """A real S3 server (SeaweedFS `weed mini`) on loopback, with its own generated access key and secret."""
    from s3server import SeaweedS3

    try:
        server = SeaweedS3()
    except RuntimeError as e:  # no `weed`, or it would not start: a failure, never a silent skip
        pytest.fail(str(e), pytrace=False)
    yield server
    server.close()


@pytest.fixture
def s3_env(s3, monkeypatch):
    """The S3 server's credentials and endpoint in the environment, as a user sets them; nothing from
    ~/.aws. fsspec's cached filesystems are dropped, so the next one reads this environment."""
    import s3fs

    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def run_inputs(demo_data, fast_config):
    """The demo ingested, embedded and cached once for the module (the fast config at adaptation-test budgets:
    200 feature steps, 8 image steps at 32 px); each test writes its own folders."""
    import uuid

    from adaptflow.data.ingest import ingest
    from adaptflow.extract import features
    from adaptflow.extract.image_cache import image_cache

    memory_uri = f"memory://adaptation-{uuid.uuid4().hex[:8]}"
    cfg = fast_config.model_copy(
        update={
            "adapt": fast_config.adapt.model_copy(update={"feature_steps": 200, "image_steps": 8, "image_size": 32})
        }
    )
    d = {
        dom: ingest(uri, dom, f"{memory_uri}/ingest/{dom}", cfg.ingest)
        for dom, uri in [
            ("source", demo_data.source_uri),
            ("target", demo_data.target_uri),
            ("target_labels", demo_data.target_labels_uri),
        ]
    }
    cache = image_cache(memory_uri, cfg.backbone, 32)  # the size images-mode candidates train at here
    plan = features.plan_extraction(
        [d["source"].index_uri, d["target"].index_uri], memory_uri, cfg.backbone, 64, cache=cache
    )
    for shard in plan.shards:
        features.extract_shard(shard, cfg.backbone, cfg.extract)
    return cfg, d, plan, memory_uri
