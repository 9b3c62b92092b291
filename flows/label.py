from prefect import flow
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput

from adaptflow.config import Config
from tasks.label import record_answers, suggest_labels


class LabelsInput(RunInput):
    """What the Prefect UI asks a person for: the class of each image id (blank: skipped), and who they are."""

    labels: dict[str, str]
    who: str = ""


@flow(name="ask-for-labels")
def ask_for_labels(run: str, store: str, cfg: Config) -> int:
    """Suggest `labeling.ask` target images of the finished `run`, put them on the Prefect UI, and pause
    until a person gives their classes (the run's page: Resume, with a form of image ids); keep the labels
    in the store and return how many were taken. Times out after `labeling.timeout_s` (FlowPauseTimeout)."""
    request = suggest_labels(run, cfg.labeling.ask, cfg.links.expiry_s)
    form = LabelsInput.with_initial_data(
        description=f"The class of each image ({', '.join(request.classes)}); leave one blank to skip it. "
        f"The images: {request.sheet_uri}",
        labels={image_id: "" for image_id in request.images},
    )
    answer = pause_flow_run(wait_for_input=form, timeout=cfg.labeling.timeout_s)
    return record_answers(store, request, answer.labels, answer.who or "prefect-ui")


def labels_from_a_person(run: str, store: str, cfg: Config) -> int:
    """`ask_for_labels`, 0 when no one answered in time: the run goes on without (its own record, the
    ask-for-labels flow run, ends failed, as Prefect marks a pause that timed out)."""
    try:
        return ask_for_labels(run, store, cfg)
    except FlowPauseTimeout:
        return 0
