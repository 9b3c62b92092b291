"""The deployment and infrastructure files, checked by parsing them: there is no Docker engine or
Kubernetes cluster here. tests/test_deploy.py runs prefect.yaml against a real Prefect server."""

import importlib
import importlib.util
import inspect
import json
import re
import subprocess
import tomllib
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
ADAPTFLOW_EVENTS = {
    "adaptflow.shift.detected",
    "adaptflow.model.promoted",
    "adaptflow.model.rejected",
    "adaptflow.run.degraded",
}
# Environment variables whose value is a credential: in compose they may only be `${VAR}` references.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY|CREDENTIAL", re.I)
REFERENCE = re.compile(r"^\$\{[A-Z_][A-Z0-9_]*(:?[-?][^}]*)?\}$")


def _load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def _prefect_yaml() -> dict:
    return _load_yaml(ROOT / "prefect.yaml")


def _deployments() -> list[dict]:
    return _prefect_yaml()["deployments"]


def _flow_of(entrypoint: str):
    """The object `path/to/file.py:func` names, imported as the package module the file is."""
    path, _, func = entrypoint.partition(":")
    assert path.endswith(".py") and func, f"entrypoint {entrypoint!r} is not path/to/file.py:func"
    assert (ROOT / path).is_file(), f"{path} does not exist"
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, func)


# --- prefect.yaml -------------------------------------------------------------------------------------


def test_prefect_yaml_is_what_prefect_deploy_accepts():
    from prefect.cli.deploy._models import PrefectYamlModel  # the model `prefect deploy` validates with

    model = PrefectYamlModel.model_validate(_prefect_yaml())
    assert [d.name for d in model.deployments] == ["retrain", "extract", "predict"]


@pytest.mark.parametrize("deployment", _deployments(), ids=lambda d: d["name"])
def test_deployment_names_a_flow_and_its_parameters(deployment):
    from prefect import Flow

    flow = _flow_of(deployment["entrypoint"])
    assert isinstance(flow, Flow)
    assert flow.name == deployment["name"]
    signature = inspect.signature(flow.fn).parameters
    parameters = deployment.get("parameters", {})
    assert set(parameters) <= set(signature), f"not parameters of {flow.name}: {set(parameters) - set(signature)}"
    for schedule in deployment.get("schedules") or []:
        # a scheduled run has nobody to fill in the rest: every required parameter must be given
        given = {**parameters, **schedule.get("parameters", {})}
        flow.validate_parameters(given)


@pytest.mark.parametrize("deployment", _deployments(), ids=lambda d: d["name"])
def test_deployment_schedules_are_valid_crons(deployment):
    from prefect.client.schemas.schedules import CronSchedule

    for schedule in deployment.get("schedules") or []:
        cron = CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone", "UTC"))
        assert len(cron.cron.split()) == 5


def test_retrain_runs_nightly_and_backfill_on_demand():
    deployments = {d["name"]: d for d in _deployments()}
    schedules = deployments["retrain"]["schedules"]
    assert [s["cron"] for s in schedules] == ["0 2 * * 1-6", "0 2 * * 0"]  # every night, one a week in full
    assert [s.get("parameters", {}).get("config") for s in schedules] == [None, {"ingest": {"rehash": True}}]
    assert not deployments["extract"].get("schedules") and not deployments["predict"].get("schedules")
    assert deployments["extract"]["work_pool"]["name"] == "gpu"
    assert deployments["predict"]["work_pool"]["name"] == "cpu"


def test_work_pools_are_defined_and_job_variables_are_strings():
    spec = _prefect_yaml()
    pools = spec["definitions"]["work_pools"]
    assert set(pools) == {"cpu", "gpu"}
    for deployment in spec["deployments"]:
        pool = deployment["work_pool"]
        assert pool["name"] in pools, f"{deployment['name']} uses an undefined work pool {pool['name']!r}"
        env = pool.get("job_variables", {}).get("env", {})
        assert all(isinstance(v, str) for v in env.values()), "process and Kubernetes env values are strings"
        assert not any(SECRET_NAME.search(k) for k in env), "credentials come from the worker, not the deployment"
    assert pools["gpu"]["job_variables"]["env"]["CUDA_VISIBLE_DEVICES"] == "0"


def test_pull_step_moves_into_the_code_that_the_images_hold():
    (step,) = _prefect_yaml()["pull"]
    assert step == {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $ADAPTFLOW_HOME }}"}}
    for dockerfile in ("Dockerfile", "Dockerfile.gpu"):
        text = (INFRA / dockerfile).read_text()
        workdir = re.search(r"^WORKDIR\s+(\S+)", text, re.M).group(1)
        assert re.search(rf"ADAPTFLOW_HOME={re.escape(workdir)}\b", text), f"{dockerfile}: ADAPTFLOW_HOME != WORKDIR"


# --- containers ---------------------------------------------------------------------------------------


def _compose() -> dict:
    return _load_yaml(INFRA / "compose.yaml")


def _env_items(node):
    """Every (name, value) of every `environment:` in the compose file, mapping or list form."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "environment":
                items = value.items() if isinstance(value, dict) else (e.split("=", 1) for e in value)
                yield from ((k, str(v)) for k, v in items)
            else:
                yield from _env_items(value)
    elif isinstance(node, list):
        for item in node:
            yield from _env_items(item)


def test_compose_has_the_stack_with_healthchecks():
    services = _compose()["services"]
    assert {"postgres", "prefect-server", "seaweedfs", "worker-cpu", "worker-gpu"} <= set(services)
    for name in ("postgres", "prefect-server", "seaweedfs", "worker-cpu", "worker-gpu"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert services["seaweedfs"]["image"].startswith("chrislusf/seaweedfs")
    assert services["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_DRIVER"] == "postgresql+asyncpg"
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for worker, pool in (("worker-cpu", "cpu"), ("worker-gpu", "gpu")):
        command = services[worker]["command"]
        assert command[:2] == ["worker", "start"] and command[command.index("--pool") + 1] == pool
        assert services[worker]["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    (device,) = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert services["worker-gpu"]["build"]["dockerfile"] == "infra/Dockerfile.gpu"


def test_compose_has_no_plaintext_secret_and_publishes_on_loopback_only():
    compose = _compose()
    secrets = [(k, v) for k, v in _env_items(compose) if SECRET_NAME.search(k)]
    assert {"POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY", "PREFECT_SERVER_DATABASE_PASSWORD"} <= {k for k, _ in secrets}
    for name, value in secrets:
        assert REFERENCE.match(value), f"{name} must come from the environment (${{...}}), not {value!r}"
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_install_the_project(dockerfile):
    lines = [ln for ln in (INFRA / dockerfile).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0].startswith("FROM ")
    text = "\n".join(lines)
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for package in (p.rstrip("*") for p in packages["include"]):
        assert re.search(rf"^COPY {package} {package}$", text, re.M), f"{dockerfile} does not copy {package}/"
    assert re.search(r"^COPY pyproject.toml .*prefect.yaml", text, re.M)
    assert re.search(r"pip install [^\n]*\s\.(\s|$)", text), f"{dockerfile} does not pip install the project"
    assert re.search(r"^USER (?!root)", text, re.M)


# --- Kubernetes ---------------------------------------------------------------------------------------


def _job_template() -> dict:
    return json.loads((INFRA / "k8s" / "gpu-job-template.json").read_text())


def test_k8s_job_template_declares_every_variable_it_uses():
    from prefect.server.schemas.actions import WorkPoolCreate

    template = _job_template()
    WorkPoolCreate(name="gpu", type="kubernetes", base_job_template=template)  # what the server checks
    properties = template["variables"]["properties"]
    assert {"image", "namespace", "env", "gpu_count", "node_selector", "tolerations", "store_secret"} <= set(properties)
    assert properties["gpu_count"]["type"] == "integer" and properties["gpu_count"]["default"] >= 1


def test_k8s_job_template_renders_a_gpu_job():
    """Fill the template the way a worker does: the variables' defaults, then the deployment's job variables."""
    from prefect.utilities.templating import apply_values

    template = _job_template()
    values = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    values.update(env={"CUDA_VISIBLE_DEVICES": "0"}, node_selector={"pool": "h100"}, gpu_count=2)
    config = apply_values(template["job_configuration"], values)
    assert "{{" not in json.dumps(config)

    manifest = config["job_manifest"]
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert manifest["kind"] == "Job" and pod["restartPolicy"] == "Never" and container["name"] == "prefect-job"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert pod["nodeSelector"] == {"pool": "h100"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert container["envFrom"] == [{"secretRef": {"name": "adaptflow-store"}}]
    assert "args" not in container  # no command given: the worker fills in Prefect's own


# --- automations and the local stack ------------------------------------------------------------------


def _create_automations_module():
    spec = importlib.util.spec_from_file_location("create_automations", INFRA / "create_automations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_automations_parse_and_alert_on_adaptflow_events_and_failed_runs():
    module = _create_automations_module()
    block = uuid.uuid4()
    automations = module.load_automations(INFRA / "automations.yaml", block)
    expected = set().union(*(a.trigger.expect for a in automations))
    assert ADAPTFLOW_EVENTS | {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"} <= expected
    assert len({a.name for a in automations}) == len(automations)
    for automation in automations:
        assert automation.trigger.type == "event" and automation.actions
        assert all(a.type == "send-notification" and a.block_document_id == block for a in automation.actions)
    assert _load_yaml(INFRA / "automations.yaml")["notify"].count("/") == 1


def test_local_stack_script_is_valid_bash():
    script = INFRA / "local-stack.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert script.stat().st_mode & 0o111, "local-stack.sh is not executable"
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "start|stop" in usage.stderr


def test_the_local_stack_starts_a_worker_for_every_pool_a_deployment_uses():
    """The retrain deployment targets the gpu pool: a stack with only a cpu worker leaves its nightly run Late."""
    script = (INFRA / "local-stack.sh").read_text()
    (default,) = re.findall(r'^WORKER_POOLS="\$\{WORKER_POOLS:-([^}]*)\}"$', script, re.M)
    used = {d["work_pool"]["name"] for d in _load_yaml(ROOT / "prefect.yaml")["deployments"]}
    assert used <= set(default.split()) and used == {"cpu", "gpu"}
