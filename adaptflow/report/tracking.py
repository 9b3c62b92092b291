"""Runs mirrored to MLflow, for teams that track their models there (optional: `adaptflow[mlflow]`).

Each run becomes an MLflow run in `tracking.mlflow_experiment`: the config flattened into params
(`adapt.method`, `backbone.image_size`, ...), the selected model's and the baseline's metrics, each
candidate as a nested run with its validator scores, and `summary.json`, `metrics.json` and `report.html`
as artifacts. The run's registered model (weights and card) is logged and registered as a version of the
MLflow model `tracking.mlflow_model`, tagged with its adaptflow version; then MLflow's aliases `champion`
and `challenger` are pointed at the versions adaptflow's registry names. adaptflow's registry is the
source of truth: MLflow mirrors it, and an alias whose adaptflow version has no MLflow twin (registered
before tracking was on) is removed from MLflow rather than left pointing at something else.

Nothing secret is logged: the config holds none by design, the environment is never read into params,
and URIs lose any `user:password@` part. MLflow is imported only when tracking is on.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

from adaptflow.config import TrackingConfig
from adaptflow.manifests import TrackingManifest
from adaptflow.store import storage

ENV = "MLFLOW_TRACKING_URI"
VERSION_TAG = "adaptflow.version"
ALIASES = ("champion", "challenger")
_MAX_BATCH = 100  # params or metrics per MLflow request
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def tracking_uri(cfg: TrackingConfig) -> str | None:
    """Where runs go: `tracking.mlflow_uri`, else MLFLOW_TRACKING_URI, else nowhere (tracking off)."""
    return cfg.mlflow_uri or os.environ.get(ENV) or None


def redact(text: str) -> str:
    """`text` with the credentials of any URI in it (`scheme://user:secret@host`) replaced by `***@`."""
    return _USERINFO.sub("***@", text)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"adapt": {"method": "auto"}}` -> `{"adapt.method": "auto"}`; lists and None as text."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = redact(str(value))
    return flat


def run_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The run's numbers under stable names: the selected model's, the baseline's, the selected candidate's
    validator scores, the shift check's, images and seconds per stage."""
    metrics: dict[str, float | None] = {}
    for prefix, block in (("", summary.get("metrics") or {}), ("baseline.", summary.get("baseline") or {})):
        for split in ("source_test", "target"):
            for k, v in (block.get(split) or {}).items():
                metrics[f"{prefix}{split}.{k}"] = v
        metrics[f"{prefix}source_val_accuracy"] = block.get("source_val_accuracy")
    adaptation = summary.get("adaptation") or {}
    metrics |= {f"selected.{k}": v for k, v in (adaptation.get("scores") or {}).items()}
    metrics["oracle_target_accuracy"] = adaptation.get("oracle_target_accuracy")
    shift = summary.get("shift") or {}
    test = shift.get("test") or {}
    metrics |= {
        "shift.p_value": test.get("p_value"),
        "shift.statistic": test.get("statistic"),
        "shift.domain_auc": shift.get("domain_auc"),
        "shift.score_drop": shift.get("score_drop"),
        "shift.detected": _flag(shift.get("shift_detected")),
    }
    promotion = summary.get("promotion") or {}
    metrics["promoted"] = _flag(promotion.get("promoted"))
    metrics |= {f"images.{d}": v.get("images") for d, v in (summary.get("datasets") or {}).items()}
    metrics |= {f"seconds.{stage}": v for stage, v in (summary.get("timings") or {}).items()}
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and v == v}


def candidate_metrics(candidate: Mapping[str, Any]) -> dict[str, float]:
    values = {
        **{f"score.{k}": v for k, v in (candidate.get("scores") or {}).items()},
        "target_accuracy": candidate.get("target_accuracy"),
        "source_test_accuracy": candidate.get("source_test_accuracy"),
        "collapsed": _flag(candidate.get("collapsed")),
        "seconds": candidate.get("seconds"),
    }
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float) and v == v}


def log_run(summary: Mapping[str, Any], store: str, cfg: TrackingConfig) -> TrackingManifest:
    """Mirror one committed run (its summary.json as a dict) to MLflow; TrackingManifest(status="off") when
    tracking is not configured. Raises what MLflow raises: the caller decides that a run never fails for it."""
    uri = tracking_uri(cfg)
    if uri is None:
        return TrackingManifest(status="off")
    _check_reachable(uri)
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.utils.time import get_current_time_millis

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name(cfg.mlflow_experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.mlflow_experiment)
    now = get_current_time_millis()

    def log(run_id: str, params: dict[str, str], metrics: dict[str, float], tags: dict[str, str]) -> None:
        for chunk in _chunks([Param(k[:250], v[:6000]) for k, v in params.items()]):
            client.log_batch(run_id, params=chunk)
        for chunk in _chunks([Metric(k, v, now, 0) for k, v in metrics.items()]):
            client.log_batch(run_id, metrics=chunk)
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    adaptation = summary.get("adaptation") or {}
    tags = {
        "adaptflow.run_id": summary["run_id"],
        "adaptflow.run_uri": redact(summary["run_uri"]),
        "adaptflow.store": redact(store),
        "adaptflow.status": summary.get("status", "trained"),
        "adaptflow.selected": str(adaptation.get("selected")),
        "adaptflow.config_hash": summary["config_hash"],
    }
    run = client.create_run(experiment_id, run_name=summary["run_id"], tags=tags)
    run_id = run.info.run_id
    ok = False
    try:
        log(run_id, flatten(summary.get("config") or {}), run_metrics(summary), {})
        for candidate in adaptation.get("candidates") or []:
            child = client.create_run(
                experiment_id,
                run_name=candidate["name"],
                tags={"mlflow.parentRunId": run_id, "adaptflow.run_id": summary["run_id"]},
            )
            log(
                child.info.run_id,
                {"name": candidate["name"], "method": candidate["method"], "mode": candidate["mode"]},
                candidate_metrics(candidate),
                {"adaptflow.selected": str(candidate["name"] == adaptation.get("selected")).lower()},
            )
            client.set_terminated(child.info.run_id)
        with tempfile.TemporaryDirectory() as tmp:
            for name, source in (
                ("summary.json", storage.join(summary["run_uri"], "summary.json")),
                ("metrics.json", summary.get("metrics_uri")),
                ("report.html", summary.get("report_uri")),
            ):
                if source and storage.exists(source):
                    path = os.path.join(tmp, name)
                    with open(path, "wb") as f:
                        f.write(storage.read_bytes(source))
                    client.log_artifact(run_id, path)
        model_version = _register(client, run_id, summary, cfg.mlflow_model)
        aliases = mirror_aliases(client, store, cfg.mlflow_model)
        ok = True
    finally:
        client.set_terminated(run_id, "FINISHED" if ok else "FAILED")
    return TrackingManifest(
        status="logged",
        tracking_uri=redact(uri),
        experiment=cfg.mlflow_experiment,
        run_id=run_id,
        model_name=cfg.mlflow_model,
        model_version=model_version,
        aliases=aliases,
    )


def _register(client, run_id: str, summary: Mapping[str, Any], name: str) -> str | None:
    """Log the run's registered model as an MLflow pyfunc (its weights and card inside) and make it a version
    of the MLflow model `name`, tagged with its adaptflow version; None when the run registered nothing."""
    promotion = summary.get("promotion") or {}
    version = promotion.get("version")
    if version is None:
        return None
    existing = _mlflow_version(client, name, version)
    if existing is not None:  # mirrored already (a rerun of this step)
        return existing
    from adaptflow.serve.pyfunc import save_pyfunc

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "model")  # an MLflow pyfunc model: mlflow.pyfunc.load_model serves it
        save_pyfunc(summary["model_uri"], folder)
        client.log_artifacts(run_id, folder, artifact_path="model")
    try:
        client.get_registered_model(name)
    except Exception:  # RESOURCE_DOES_NOT_EXIST: the first model of this name
        client.create_registered_model(name, description="mirrored from adaptflow's registry (the source of truth)")
    artifact_uri = client.get_run(run_id).info.artifact_uri
    mv = client.create_model_version(
        name,
        f"{artifact_uri}/model",
        run_id=run_id,
        tags={
            VERSION_TAG: str(version),
            "adaptflow.method": str((summary.get("adaptation") or {}).get("selected")),
            "adaptflow.model_uri": redact(summary["model_uri"]),
        },
        description=f"adaptflow v{version}: {promotion.get('reason', '')}",
    )
    return str(mv.version)


def mirror_aliases(client, store: str, name: str) -> dict[str, str]:
    """Point MLflow's `champion` and `challenger` of model `name` where adaptflow's registry points them;
    remove those adaptflow does not have (or whose version MLflow does not hold). Returns MLflow's aliases."""
    from adaptflow.models import registry

    wanted = registry.aliases(store)
    try:
        current = dict(client.get_registered_model(name).aliases or {})
    except Exception:  # no model of that name yet: nothing to point
        return {}
    result: dict[str, str] = {}
    for alias in ALIASES:
        target = _mlflow_version(client, name, wanted[alias]) if alias in wanted else None
        if target is not None:
            if current.get(alias) != target:
                client.set_registered_model_alias(name, alias, target)
            result[alias] = target
        elif alias in current:
            client.delete_registered_model_alias(name, alias)
    return result


def sync_aliases(store: str, cfg: TrackingConfig) -> dict[str, str] | None:
    """After a promotion or rollback by hand: mirror the aliases, when tracking is on; None when off."""
    uri = tracking_uri(cfg)
    if uri is None:
        return None
    _check_reachable(uri)
    from mlflow import MlflowClient

    return mirror_aliases(MlflowClient(tracking_uri=uri, registry_uri=uri), store, cfg.mlflow_model)


def _mlflow_version(client, name: str, version: int) -> str | None:
    found = client.search_model_versions(f"name = '{name}' and tags.`{VERSION_TAG}` = '{version}'")
    return str(max(int(mv.version) for mv in found)) if found else None


def _check_reachable(uri: str) -> None:
    """An HTTP tracking server must answer within seconds (MLflow's own client would retry for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    import httpx

    try:
        httpx.get(uri.rstrip("/") + "/health", timeout=5)
    except httpx.HTTPError as e:
        raise ConnectionError(
            f"the MLflow tracking server {redact(uri)} does not answer ({type(e).__name__})"
        ) from None


def _flag(value: Any) -> float | None:
    return None if value is None else float(bool(value))


def _chunks(items: list) -> Iterator[list]:
    for i in range(0, len(items), _MAX_BATCH):
        yield items[i : i + _MAX_BATCH]
