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
