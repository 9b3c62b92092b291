from prefect import get_run_logger, task

from adaptflow.config import TrackingConfig
from adaptflow.manifests import TrackingManifest
from adaptflow.report import tracking
from adaptflow.report.records import RunSummary


@task(name="track-run")  # not retried: MLflow being away must cost the run seconds, not minutes
def track_run(summary: RunSummary, store: str, cfg: TrackingConfig) -> TrackingManifest | None:
    """Mirror the committed run to MLflow when tracking is on (tracking.mlflow_uri or MLFLOW_TRACKING_URI):
    params, metrics, artifacts, the registered model and its aliases. Never fails the run: whatever goes
    wrong (MLflow not installed, its server away, a store error) is one warning and None."""
    try:
        return tracking.log_run(summary.model_dump(mode="json"), store, cfg)
    except ImportError:
        get_run_logger().warning(
            "MLflow tracking is on but MLflow is not installed: pip install 'adaptflow[mlflow]'"
            "; the run itself is complete"
        )
    except Exception as e:  # noqa: BLE001 - tracking is a mirror: nothing it does may fail the run
        get_run_logger().warning(
            "MLflow tracking failed, the run itself is complete: %s: %s",
            type(e).__name__,
            tracking.redact(str(e).strip().splitlines()[0] if str(e).strip() else ""),
        )
    return None
