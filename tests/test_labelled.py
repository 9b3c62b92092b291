"""Target labels a run may use (`--target-train-labels`): every row usable or one clear error, never counted
in a reported target metric, and selection that listens to them only as far as they can tell candidates
apart."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from adaptflow.adapt import candidates as adaptation
from adaptflow.adapt import plan as planning
from adaptflow.adapt.labelled import MIN_LABELS, by_labels, interval
from adaptflow.adapt.selection import Candidate, Selection
from adaptflow.config import IngestConfig
from adaptflow.data.ingest import ingest, read_index
from adaptflow.data.labels import check_train_labels, held_out
from adaptflow.errors import DatasetError
from adaptflow.manifests import RunData
from adaptflow.store import storage

CFG = IngestConfig(workers=2)


def _candidates(*names: str) -> list[Candidate]:
    return [Candidate(n, {"source_val_acc": 0.9}, False, source_only=n.startswith("source_only")) for n in names]


def _label_free(pick: int, reference: int | None = 0, ranks=(0.5, 1.0, 0.0)) -> Selection:
    return Selection(pick, "best mean rank", True, "no worse than source-only", reference, list(ranks))


def _right(n: int, k: int) -> np.ndarray:
    """Right on the first `k` of `n` labelled images."""
    return np.arange(n) < k


def test_labels_overrule_a_label_free_pick_they_show_is_worse():
    cands = _candidates("source_only-images", "dann-images", "cdan-images")
    # the label-free rules liked dann; 50 labels say it is right on 20, cdan on 40: significantly apart
    outcomes = [_right(50, 30), _right(50, 20), _right(50, 40)]
    picked = by_labels(_label_free(1), cands, outcomes)
    assert picked.index == 2 and picked.reason.startswith("chosen by 50 labelled target images: 0.800")
    # against the source-only reference's 30 of the same 50, 40 is no worse: confident, with its interval
    low, high = interval(outcomes[2])
    assert low < 0.8 < high and f"{low:.3f}-{high:.3f}" in picked.confidence and picked.confident


def test_a_label_free_pick_within_the_labels_noise_stands():
    cands = _candidates("source_only-images", "dann-images", "cdan-images")
    # 37 against 39 right of 50: a few images apart, which fifty labels cannot call
    outcomes = [_right(50, 30), _right(50, 37), _right(50, 39)]
    picked = by_labels(_label_free(1), cands, outcomes)
    assert picked.index == 1 and picked.reason.startswith("label-free pick kept")
    # with too few labels, they do not choose at all (and the reason says so)
    few = [o[: MIN_LABELS - 1] for o in [_right(50, 0), _right(50, 0), _right(50, 50)]]
    kept = by_labels(_label_free(1), cands, few)
    assert kept.index == 1 and f"fewer than {MIN_LABELS}" in kept.reason


def test_a_pick_the_labels_put_below_source_only_is_not_confident():
    cands = _candidates("source_only-images", "dann-images", "cdan-images")
    # every adapted candidate lost to the reference; the reference is also the most accurate: it wins
    worse = [_right(60, 50), _right(60, 20), _right(60, 22)]
    assert by_labels(_label_free(1), cands, worse).index == 0
    # the reference was stopped early (None rank) or missing: the pick stands on the labels alone
    no_ref = by_labels(_label_free(2, reference=None), cands, [_right(60, 0), _right(60, 20), _right(60, 59)])
    assert no_ref.index == 2 and not no_ref.confident and "no source-only reference" in no_ref.confidence


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def target(tmp_path):
    folder = tmp_path / "target"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.png").write_bytes(_png(i))
    (tmp_path / "elsewhere.png").write_bytes(_png(99))
    return ingest(str(folder), "target", str(tmp_path / "t"), CFG)


def _labels(tmp_path, name: str, rows: str, target):
    csv = tmp_path / "target" / f"{name}.csv"
    csv.write_text("uri,label\n" + rows)
    out = str(tmp_path / name)
    m = ingest(str(csv), "target_train_labels", out, CFG, classes=["cat", "dog"], labels_for=target.index_uri)
    return check_train_labels(m, target)


@pytest.mark.parametrize(
    "rows, reason",
    [
        ("0.png,cat\n1.png,bird\n", "1.png: unknown label 'bird'"),
        ("0.png,cat\n../elsewhere.png,dog\n", "elsewhere.png: outside dataset root"),
        ("0.png,cat\n0.png,cat\n", "duplicate of"),
        ("1.png,dog\n0.png,cat\n0.png,dog\n", "conflicting labels for identical images"),
        ("0.png,cat\nmissing.png,dog\n", "missing.png: "),
    ],
)
def test_a_bad_training_labels_csv_is_one_clear_error(tmp_path, target, rows, reason):
    with pytest.raises(DatasetError, match=r"of the training labels in .* cannot be used \(") as failed:
        _labels(tmp_path, "bad", rows, target)
    assert reason in str(failed.value)


def test_an_image_not_in_the_target_is_refused_and_scoring_labels_leave_the_used_ones_out(tmp_path, target):
    (tmp_path / "target" / "late.png").write_bytes(_png(98))  # in the folder, but not in the target ingested
    with pytest.raises(DatasetError, match=r"1 of the training labels .*late\.png: not one of the target's images"):
        _labels(tmp_path, "stray", "0.png,cat\nlate.png,dog\n", target)

    used = _labels(tmp_path, "used", "0.png,cat\n1.png,dog\n", target)
    csv = tmp_path / "target" / "scoring.csv"
    csv.write_text("uri,label\n" + "".join(f"{i}.png,{'cat' if i % 2 else 'dog'}\n" for i in range(4)))
    scoring = ingest(str(csv), "target_labels", str(tmp_path / "s"), CFG, classes=["cat", "dog"])
    left = held_out(scoring, used, str(tmp_path / "held-out"))
    assert sorted(read_index(left).uri.str.rsplit("/", n=1).str[-1]) == ["2.png", "3.png"]
    assert left.n_images == 2 and left.fingerprint != scoring.fingerprint
    with pytest.raises(DatasetError, match="nothing is left to score the run on"):
        held_out(used, used, str(tmp_path / "none-left"))


def test_labelled_target_images_train_every_candidate_and_judge_none(run_inputs, tmp_path):
    """`--target-train-labels`: half of each class's labels join a candidate's supervised rows, the other half
    judges it; the candidate learns the target from them, and no image is on both sides."""
    from adaptflow.adapt.labelled import LABELLED_SHARE, split_labels, with_labelled

    cfg, d, plan, root = run_inputs
    fit, judge = split_labels(d["target_labels"], 0.5, cfg.seed, str(tmp_path / "split"))
    fit_ids, judge_ids = set(read_index(fit).image_id), set(read_index(judge).image_id)
    assert fit_ids and judge_ids and not fit_ids & judge_ids
    assert fit_ids | judge_ids == set(read_index(d["target_labels"]).image_id)
    per_class = read_index(d["target_labels"]).label.value_counts()
    assert read_index(fit).label.value_counts().to_dict() == (per_class // 2).loc[lambda n: n > 0].to_dict()
    assert split_labels(d["target_labels"], 0.5, cfg.seed, str(tmp_path / "again"))[0].fingerprint == fit.fingerprint
    none, everything = split_labels(d["target_labels"], 0.0, cfg.seed, str(tmp_path / "zero"))
    assert none is None and everything.n_images == d["target_labels"].n_images

    source_train = read_index(d["source"]).query("split == 'train'")
    for few in (read_index(fit).head(5), read_index(fit)):  # a few labels are repeated; many are there once
        share = (~with_labelled(source_train, few).image_id.isin(source_train.image_id)).mean()
        assert LABELLED_SHARE <= share < max(LABELLED_SHARE + 0.05, len(few) / (len(few) + len(source_train)) + 0.01)
    base = dict(data=RunData(source=d["source"], target=d["target"], features=plan), cfg=cfg)
    key = planning.training_key(cfg, d["source"], d["target"], None, plan)
    assert planning.training_key(cfg, d["source"], d["target"], None, plan, fit) != key

    spec = next(s for s in planning.plan_candidates(cfg, cuda=False) if s.name == "source_only-features")
    truth = read_index(d["target_labels"]).set_index("image_id").label

    def accuracy(c, ids):
        predicted = storage.read_table(c.predictions_uri).to_pandas().set_index("image_id").prediction
        ids = sorted(ids & set(predicted.index))
        return float((predicted.loc[ids] == truth.loc[ids]).mean())

    without = adaptation.train_candidate(spec, **base, out_uri=f"{root}/labelled/without")
    with_ = adaptation.train_candidate(spec, **base, out_uri=f"{root}/labelled/with", fit_labels=fit)
    # here 0.23 -> 1.00 on the images trained on, and 0.23 -> 0.44 on the others of the target
    assert accuracy(with_, fit_ids) > accuracy(without, fit_ids) + 0.2
    assert accuracy(with_, judge_ids) > accuracy(without, judge_ids) + 0.1
