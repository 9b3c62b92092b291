"""A person in the loop: a run asks for labels on the Prefect UI and pauses; the answer, given through the
API as the UI gives it, lands in the store, and the run trains again with every label the store holds."""

import os
import threading
import time

import pandas as pd
import pytest

from adaptflow.data.ingest import ingest, read_index
from adaptflow.label.store import answered, labelled_already, labels_for_run, record_labels, stored_labels
from adaptflow.report.records import RunSummary
from adaptflow.store import storage


def test_the_store_keeps_every_label_given_and_a_run_reads_those_of_its_target(demo_data, fast_config, tmp_path):
    store = str(tmp_path / "store")
    assert stored_labels(store).empty
    target = ingest(demo_data.target_uri, "target", str(tmp_path / "target"), fast_config.ingest)
    index = read_index(target).sort_values("image_id").reset_index(drop=True)
    assert labels_for_run(store, target, str(tmp_path / "none.csv")) is None
    first = index.head(3).assign(label=["1", "2", "3"])
    assert record_labels(store, first, "ana") == 3
    again = index.iloc[2:4].assign(label=["7", "8"])  # a second opinion on one image replaces the first
    assert record_labels(store, again, "bo") == 4
    table = stored_labels(store).set_index("image_id")
    assert table.label.tolist() == ["1", "2", "7", "8"] and table.who.tolist() == ["ana", "ana", "bo", "bo"]
    assert table.given_at.str.match(r"\d{4}-\d\d-\d\dT").all()
    gone = pd.DataFrame({"image_id": ["0" * 64], "uri": ["/moved/away.png"], "label": ["5"]})
    record_labels(store, gone, "cy")  # an image no longer in the target: kept, not used
    csv = pd.read_csv(labels_for_run(store, target, str(tmp_path / "run.csv")), dtype=str)
    assert sorted(csv.uri) == sorted(index.uri.head(4)) and sorted(csv.label) == ["1", "2", "7", "8"]

    taken, refused = answered(
        {"a": "/x/a.png", "b": "/x/b.png", "c": "/x/c.png"}, {"a": "3", "b": "", "c": "cat", "z": "1"}, ["1", "3"]
    )
    assert taken.to_dict("records") == [{"image_id": "a", "uri": "/x/a.png", "label": "3"}]
    assert refused == ["c: unknown class 'cat' (known: 1, 3)", "z: not one of the images asked about"]


def test_labels_given_on_the_command_line_are_kept_and_join_those_given_before(demo_data, fast_config, tmp_path):
    from adaptflow.data.labels import merged
    from adaptflow.label.store import keep_given

    store = str(tmp_path / "store")
    target = ingest(demo_data.target_uri, "target", str(tmp_path / "target"), fast_config.ingest)
    index = read_index(target).sort_values("image_id").reset_index(drop=True)

    def labels(rows, name):
        csv = tmp_path / f"{name}.csv"
        rows[["uri", "label"]].to_csv(csv, index=False)
        out = str(tmp_path / name)
        return ingest(str(csv), "target_train_labels", out, fast_config.ingest, labels_for=target.index_uri)

    before = index.iloc[0:3].assign(label=["1", "2", "3"])
    record_labels(store, before, "ana")
    given = labels(index.iloc[2:5].assign(label=["9", "4", "5"]), "given")  # image 2 labelled anew
    assert keep_given(store, given, "command line") == 3
    assert keep_given(store, given, "command line") == 0  # the same labels again: nothing new
    table = stored_labels(store).set_index("image_id")
    assert table.label.tolist() == ["1", "2", "9", "4", "5"]
    assert table.who.tolist() == ["ana", "ana", "command line", "command line", "command line"]
    stored = labels(pd.read_csv(labels_for_run(store, target, str(tmp_path / "s.csv")), dtype=str), "stored")
    both = merged(given, labels(before, "before"), str(tmp_path / "all"))
    every = read_index(both).set_index("image_id").label
    assert every.sort_index().tolist() == ["1", "2", "9", "4", "5"]  # the newer word on image 2
    assert read_index(stored).set_index("image_id").label.sort_index().tolist() == every.sort_index().tolist()


def _paused_flow_run(timeout: float = 240.0):
    """The flow run waiting for input, once there is one."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    paused = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=paused)
        if runs:
            return runs[0]
        time.sleep(1)
    pytest.fail("no flow run paused for labels")


@pytest.mark.slow
def test_a_run_asks_a_person_pauses_and_trains_again_with_the_answer(
    demo_data_40, fast_config, tmp_path, prefect_harness
):
    from prefect.flow_runs import resume_flow_run

    from flows.retrain import retrain

    store = str(tmp_path / "store")
    settings = fast_config.model_dump(mode="json") | {"labeling": {"ask": 6, "timeout_s": 600}}
    out = {}
    thread = threading.Thread(
        target=lambda: out.setdefault(
            "run", retrain(demo_data_40.source_uri, demo_data_40.target_uri, None, store, settings)
        )
    )
    thread.start()
    paused = _paused_flow_run()
    assert paused.name and paused.flow_id
    # what the person sees: the ask file and its contact sheet in the first run's folder
    (first,) = [storage.join(store, "runs", r) for r in os.listdir(os.path.join(store, "runs"))]
    asked = pd.read_csv(storage.join(first, "ask", "ask.csv"), dtype=str)
    assert len(asked) == 6 and asked.label.isna().all() and storage.exists(storage.join(first, "ask", "ask.html"))
    truth = pd.read_csv(demo_data_40.target_labels_uri, dtype=str)
    truth["uri"] = [os.path.join(os.path.dirname(demo_data_40.target_labels_uri), u) for u in truth.uri]
    ids = read_index(RunSummary.load(storage.join(first, "summary.json")).datasets["target"]).set_index("uri").image_id
    answers = {ids.loc[u]: truth.set_index("uri").label.loc[u] for u in asked.uri}
    answers[next(iter(answers))] = ""  # one image skipped
    resume_flow_run(paused.id, run_input={"labels": answers, "who": "tester"})
    thread.join(600)
    assert not thread.is_alive()

    second = out["run"]
    assert second != first
    kept = stored_labels(store)
    assert len(kept) == 5 and set(kept.who) == {"tester"} and set(kept.image_id) <= set(answers)
    summary = RunSummary.load(storage.join(second, "summary.json"))
    assert summary.datasets["target_train_labels"].images == 5
    assert summary.adaptation.labelled + summary.adaptation.labelled_trained == 5
    assert summary.shift is None or summary.shift.retrain  # a champion from the first run: new labels retrain
    # a person is never asked about those images again
    assert labelled_already(summary) == set(asked.uri[asked.uri.map(ids).isin(kept.image_id)])
