"""The monitor keeps what it measured of a champion in the store: a night whose samples barely moved reuses
it, with no model loaded and no feature read; one whose samples moved measures again."""

import pyarrow as pa
import pytest

from adaptflow.data.ingest import ingest
from adaptflow.manifests import Champion, RunData
from adaptflow.monitor import champion as scoring
from adaptflow.store import storage

POLICY = ["source_val_acc", "im", "bnm"]


@pytest.fixture
def store(headed_store):
    return headed_store


@pytest.fixture
def measured(monkeypatch):
    """The models `_score` measures from here on."""
    calls = []
    score = scoring._score
    monkeypatch.setattr(scoring, "_score", lambda model_uri, *a: calls.append(model_uri) or score(model_uri, *a))
    return calls


def _data(source, target, target_labels, features) -> RunData:
    return RunData(source=source, target=target, target_labels=target_labels, features=features)


def _champion(head, reference: str) -> Champion:
    return Champion(
        version=1, model_uri=head.model_uri, run_id="r0", selection_score=0.5, reference_index_uri=reference
    )


def test_the_champions_scores_kept_at_promotion_are_reused_while_the_sample_holds(store, tmp_path, measured):
    root, src, tgt, plan, head = store
    kept = scoring.score_model(head.model_uri, _data(src, tgt, None, plan), POLICY, samples=60, keep_in=root)
    champion = _champion(head, tgt.index_uri)

    same = scoring.score_champion(root, champion, _data(src, tgt, None, plan), POLICY, samples=60, reuse=0.95)
    assert measured == [head.model_uri] and same.reused == 1.0  # measured once, at "promotion"
    assert same.model_copy(update={"reused": None}) == kept

    # a night later two new images of the 60 in the sample: 58 / 60 of it was measured, more than 0.95 not
    grown_uri = _grown(tgt.index_uri, src.index_uri, 2, str(tmp_path / "g.parquet"))
    grown = tgt.model_copy(update={"index_uri": grown_uri, "fingerprint": "grown"})
    assert (
        scoring.score_champion(root, champion, _data(src, grown, None, plan), POLICY, samples=60, reuse=0.9).reused < 1
    )
    assert len(measured) == 1
    again = scoring.score_champion(root, champion, _data(src, grown, None, plan), POLICY, samples=60, reuse=0.99)
    assert again.reused is None and len(measured) == 2  # measured again, and kept for the nights after
    fresh = scoring.score_model(head.model_uri, _data(src, grown, None, plan), POLICY, samples=60)
    assert again == fresh


def test_target_labels_or_another_policy_are_measured_again(store, demo_data, measured):
    from adaptflow.config import IngestConfig

    root, src, tgt, plan, head = store
    scoring.score_model(head.model_uri, _data(src, tgt, None, plan), POLICY, samples=60, keep_in=root)
    labels = ingest(demo_data.target_labels_uri, "target_labels", f"{root}/ingest/labels", IngestConfig(workers=2))
    champion = _champion(head, tgt.index_uri)
    with_labels = scoring.score_champion(root, champion, _data(src, tgt, labels, plan), POLICY, samples=60)
    assert with_labels.reused is None and with_labels.target_accuracy is not None
    other = scoring.score_champion(root, champion, _data(src, tgt, None, plan), ["bnm"], samples=60)
    assert other.reused is None and set(other.scores) == {"source_val_acc", "bnm"}
    assert len(measured) == 3


def test_the_reference_mix_is_what_the_promoting_run_measured(store, measured):
    root, src, tgt, plan, head = store
    kept = scoring.score_model(head.model_uri, _data(src, tgt, None, plan), POLICY, samples=60, keep_in=root)
    champion = _champion(head, tgt.index_uri)
    assert scoring.reference_mix(champion, plan, samples=60, store=root) == (kept.predicted_mix, kept.n_scored)
    assert scoring.reference_mix(champion, plan, samples=60) == (kept.predicted_mix, kept.n_scored)  # measured


def test_a_damaged_record_is_measured_again(store, measured):
    root, src, tgt, plan, head = store
    scoring.score_model(head.model_uri, _data(src, tgt, None, plan), POLICY, samples=50, keep_in=root)
    for folder in ("scores", "seen"):
        for uri in storage.list_uris(storage.join(root, "monitor", folder), ".json"):
            storage.write_bytes(uri, b"{")
    scores = scoring.score_champion(
        root, _champion(head, tgt.index_uri), _data(src, tgt, None, plan), POLICY, samples=50
    )
    assert scores.reused is None and len(measured) == 2


def test_a_quiet_night_on_the_same_datasets_reads_no_index(store, measured, monkeypatch):
    """The champion's scores on the very datasets of an earlier run (by fingerprint) and the shift test of
    the same target against the same reference are what that run found: no index or feature is read."""
    from adaptflow.config import MonitorConfig
    from adaptflow.monitor import shift

    root, src, tgt, plan, head = store
    first = scoring.score_model(head.model_uri, _data(src, tgt, None, plan), POLICY, samples=60, keep_in=root)
    champion = _champion(head, src.index_uri)  # the target's images are all new against this reference
    tested = shift.check_shift(champion, tgt, plan, first, MonitorConfig(), store=root)
    assert tested.test is not None and tested.n_new == tgt.n_images

    def no_reads(*a, **k):
        raise AssertionError("read a table")

    monkeypatch.setattr(storage, "read_table", no_reads)
    again = scoring.score_champion(root, champion, _data(src, tgt, None, plan), POLICY, samples=60)
    assert len(measured) == 1 and again.reused == 1.0
    assert again.model_copy(update={"reused": None}) == first
    retested = shift.check_shift(champion, tgt, plan, again, MonitorConfig(), store=root)
    assert (retested.test, retested.domain_auc, retested.n_new) == (tested.test, tested.domain_auc, tested.n_new)
    trained_with = champion.model_copy(
        update={"reference_index_uri": tgt.index_uri, "reference_fingerprint": tgt.fingerprint}
    )
    quiet = shift.check_shift(trained_with, tgt, plan, again, MonitorConfig())
    assert quiet.n_new == 0 and quiet.test is None and "no new target images" in quiet.reason


def _grown(index_uri: str, other_uri: str, n: int, out_uri: str) -> str:
    """`index_uri`'s images and `n` of `other_uri`'s, which sort into the validation sample."""
    from adaptflow.adapt.samples import sample_key, validation_sample

    table, other = storage.read_table(index_uri), storage.read_table(other_uri)
    mine = validation_sample(table.to_pandas(), 60, 0)
    theirs = validation_sample(other.to_pandas(), 1000, 0)
    # images that the seeded hash puts before the current sample's last: they enter it
    last = max(sample_key(i, 0) for i in mine.image_id)
    entering = [i for i in theirs.image_id if sample_key(i, 0) < last][:n]
    assert len(entering) == n
    added = other.filter(pa.compute.is_in(other["image_id"], pa.array(entering))).select(table.column_names)
    storage.write_table(out_uri, pa.concat_tables([table, added.cast(table.schema)]))
    return out_uri


def test_a_night_with_new_images_reads_the_reference_sample_from_the_memo(store, monkeypatch):
    """The champion's reference sample lies among every image of the feature shards; its embeddings are
    read from them once, then from the memo, and the test is the one the shards would give."""
    from adaptflow.config import MonitorConfig
    from adaptflow.monitor import shift

    root, src, tgt, plan, head = store
    champion = _champion(head, src.index_uri)  # the target's images are all new against this reference
    for folder in ("samples", "tests"):  # what earlier tests on this store kept
        for uri in storage.list_uris(storage.join(root, "monitor", folder)):
            storage.remove(uri)
    read = []
    load = shift.load_features
    monkeypatch.setattr(shift, "load_features", lambda uri, ids: read.append(len(ids)) or load(uri, ids))
    first = shift.check_shift(champion, tgt, plan, None, MonitorConfig(), store=root)
    assert first.test is not None and len(read) == 2  # the reference sample, then the new images
    assert storage.list_uris(storage.join(root, "monitor", "samples"), ".npz")

    night = tgt.model_copy(update={"fingerprint": "a later night"})  # its shift test is not kept: measured
    remembered = shift.check_shift(champion, night, plan, None, MonitorConfig(), store=root)
    assert len(read) == 3  # the new images alone
    measured = shift.check_shift(champion, night, plan, None, MonitorConfig())
    assert len(read) == 5 and remembered.test == measured.test and remembered.domain_auc == measured.domain_auc
