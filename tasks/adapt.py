from prefect import task

from adaptflow import adaptation, progress
from adaptflow.adaptation import CandidateManifest, CandidateSpec, SelectionManifest
from adaptflow.config import Config
from adaptflow.features import ExtractionPlan, resolve_device
from adaptflow.manifests import IngestManifest
from adaptflow.pipeline import ModelManifest
from adaptflow.storage import join
from tasks._work import measured


@task(name="plan-candidates")
def plan_candidates(cfg: Config) -> list[CandidateSpec]:
    """The adaptation candidates to train: methods x modes x hyperparameter draws x seeds."""
    return adaptation.plan_candidates(cfg, cuda=resolve_device(cfg.extract.device).type == "cuda")


@task(name="train-candidate")
@measured
def train_candidate(spec: CandidateSpec, source: IngestManifest, target: IngestManifest,
                    target_labels: IngestManifest | None, features: ExtractionPlan, cfg: Config,
                    candidates_uri: str) -> CandidateManifest:
    """Train one adaptation candidate into `candidates_uri/<name>` and score it without target labels."""
    device = str(resolve_device(cfg.extract.device))
    out_uri = join(candidates_uri, spec.name)
    with progress.task(f"train {spec.name}", unit="steps"):
        return adaptation.train_candidate(spec, source, target, target_labels, features, cfg, out_uri, device)


@task(name="select-model")
@measured
def select_model(head: ModelManifest, candidates: list[CandidateManifest], cfg: Config) -> SelectionManifest:
    """Pick the model without target labels; never a collapsed one."""
    return adaptation.select_model(head, candidates, cfg.adapt.policy)
