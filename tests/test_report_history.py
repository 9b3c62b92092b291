import re

import matplotlib.pyplot as plt
import pytest

from adaptflow.report.history import HistoryRow, read_summaries, render_history, rows_from_summaries, write_history
from adaptflow.store import storage


def _summary(run_id: str, finished_at: str, **extra) -> dict:
    """A summary.json as a run writes it, with the operations keys (shift, promotion) on top."""
    return {
        "schema_version": 1,
        "run_id": run_id,
        "run_uri": f"store/runs/{run_id}",
        "finished_at": finished_at,
        "datasets": {
            "source": {"uri": "data/src", "images": 300, "rejected": 2, "classes": ["a", "b"]},
            "target": {"uri": "data/new", "images": 120, "rejected": 0, "classes": []},
        },
        "extraction": {"images_requested": 420, "images_cached": 380, "images_extracted": 40},
        "metrics": {
            "source_val_accuracy": 0.91,
            "source_test": {"accuracy": 0.9, "macro_f1": 0.89, "n": 60},
            "target": {"accuracy": 0.71, "macro_f1": 0.7, "n": 120},
        },
        "adaptation": {"selected": "dann", "scores": {"source_val_acc": 0.91, "im": 0.5, "selection_score": 1.5}},
        "shift": _monitor_shift(0.012, 0.005, "shift detected: MMD² 0.0120, p = 0.005 < 0.05"),
        "promotion": {"promoted": True, "reason": "target proxy improved", "version": 3, "champion_version": 3},
        **extra,
    }


def _monitor_shift(statistic: float, p_value: float, reason: str) -> dict:
    """summary["shift"] as the monitor writes it: a ShiftManifest whose test is a ShiftTest."""
    detected = p_value < 0.05
    return {
        "champion_version": 3,
        "domain_auc": 0.55,
        "champion": None,
        "score_drop": 0.01,
        "degraded": False,
        "shift_detected": detected,
        "retrain": detected,
        "reason": reason,
        "test": {
            "schema_version": 1,
            "statistic": statistic,
            "p_value": p_value,
            "n_reference": 500,
            "n_batch": 120,
            "n_permutations": 200,
            "detected": detected,
            "alpha": 0.05,
        },
    }


SUMMARIES = [
    _summary(
        "r2-rejected",
        "2025-06-02T09:00:00+00:00",
        metrics={"source_test": {"accuracy": 0.88}, "target": None},
        adaptation={
            "selected": "dann",
            "policy": ["source_val_acc", "im", "bnm"],
            "scores": {"source_val_acc": 0.9, "im": 0.5, "bnm": 0.4, "snd": 9.0},
        },
        shift=_monitor_shift(0.02, 0.004975, "shift detected: MMD² 0.0200, p = 0.005 < 0.05"),
        promotion={
            "version": 4,
            "promoted": False,
            "reason": "selection score 0.6 < champion 0.7 + margin 0",
            "champion_version": 3,
            "champion_after": 3,
            "compared": {"metric": "selection_score"},
        },
    ),
    _summary("r1-promoted", "2025-06-01T09:00:00+00:00"),  # a promotion without champion_after
    {
        "schema_version": 1,
        "run_id": "r3-quiet",
        "finished_at": "2025-06-03T09:00:00+00:00",
        "status": "no_shift",
        "datasets": {"source": {"images": 300}, "target": {"images": 80}},
        "extraction": {"images_extracted": 80},
        "shift": _monitor_shift(-0.0001, 0.62, "no shift: MMD² -0.0001, p = 0.620 >= 0.05"),
        "promotion": None,
        "model_uri": "",
        "metrics": {},
        "baseline": {},
        "adaptation": {},
        "timings": {},
    },
]


def test_rows_read_every_field():
    rows = rows_from_summaries(SUMMARIES)
    assert [r.run_id for r in rows] == ["r2-rejected", "r1-promoted", "r3-quiet"]  # input order kept
    promoted = rows[1]
    assert promoted == HistoryRow(
        run_id="r1-promoted",
        finished_at="2025-06-01T09:00:00+00:00",
        images_processed=420,
        images_extracted=40,
        target_accuracy=0.71,
        source_test_accuracy=0.9,
        selection_score=1.5,
        shift_statistic=0.012,
        shift_p_value=0.005,
        shift_detected=True,
        decision="promoted",
        reason="target proxy improved",
        champion_version=3,
    )
    rejected, quiet = rows[0], rows[2]  # the shapes the monitor and the registry write
    assert rejected.decision == "rejected" and rejected.target_accuracy is None and rejected.champion_version == 3
    assert rejected.reason == "selection score 0.6 < champion 0.7 + margin 0"
    assert rejected.selection_score == pytest.approx(0.6)  # the registry's: mean of the policy's scores
    assert (rejected.shift_statistic, rejected.shift_p_value, rejected.shift_detected) == (0.02, 0.004975, True)
    assert quiet.decision == "no shift" and quiet.reason == "no shift: MMD² -0.0001, p = 0.620 >= 0.05"
    assert (quiet.shift_detected, quiet.shift_p_value, quiet.champion_version) == (False, 0.62, 3)  # champion stays
    assert (quiet.images_processed, quiet.images_extracted, quiet.target_accuracy) == (380, 80, None)


def test_rows_tolerate_missing_and_malformed_keys():
    rows = rows_from_summaries(
        [
            {"run_id": "bare"},
            {
                "run_id": "odd",
                "datasets": {"source": {"images": "many"}, "target": None},
                "metrics": {"target": 0.5},
                "shift": {"test": {"statistic": float("nan"), "p_value": True}, "shift_detected": "yes"},
                "adaptation": {"scores": None},
                "promotion": {"promoted": True, "version": 4},
                "status": "failed",
                "error": "disk full",
            },
            {"finished_at": "2025-01-01", "promotion": {"promoted": True, "version": 7}},
            {
                "run_id": "terse",
                "status": "no_shift",
                "shift": {"test": {"statistic": 0.001, "p_value": 0.3}, "shift_detected": False},
                "adaptation": {"scores": {"im": 0.5}, "policy": ["im", "bnm"]},
            },
            "not a summary",
        ]
    )
    assert len(rows) == 4
    bare = rows[0]
    assert (bare.images_processed, bare.images_extracted, bare.decision, bare.reason) == (0, None, "completed", "")
    assert all(
        getattr(bare, f) is None
        for f in (
            "target_accuracy",
            "source_test_accuracy",
            "selection_score",
            "shift_statistic",
            "shift_p_value",
            "shift_detected",
            "champion_version",
        )
    )
    odd = rows[1]
    assert (odd.decision, odd.reason, odd.images_processed) == ("failed", "disk full", 0)
    assert odd.shift_statistic is None and odd.shift_p_value is None and odd.shift_detected is None
    assert odd.champion_version == 4  # promoted without a champion_version: the new version is the champion
    assert (rows[2].run_id, rows[2].decision, rows[2].champion_version) == ("?", "promoted", 7)
    terse = rows[3]
    assert (terse.decision, terse.reason, terse.shift_detected, terse.champion_version) == (
        "no shift",
        "no shift detected (p = 0.3)",
        False,
        None,
    )
    assert terse.selection_score is None  # the policy's scores are incomplete


def _table_rows(page: str) -> list[str]:
    return re.findall(r"<tbody>.*?</tbody>", page, flags=re.S)[0].split("</tr>")[:-1] if "<tbody>" in page else []


def _assert_self_contained(page: str) -> None:
    links = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", page, flags=re.I)
    assert not [u for u in links if not u.startswith("data:") and not re.fullmatch(r"runs/[\w-]+/report\.html", u)]
    assert not re.search(r"(?:https?:)?//[\w.-]+\.\w", page)
    assert "<script" not in page.lower() and "<link" not in page.lower() and "@import" not in page
    assert not plt.get_fignums()


def test_three_runs_newest_first_with_badges_and_plots():
    page = render_history(rows_from_summaries(SUMMARIES))
    assert "<title>adaptflow run history</title>" in page
    rows = _table_rows(page)
    assert [re.search(r"<code>(.*?)</code>", r).group(1) for r in rows] == ["r3-quiet", "r2-rejected", "r1-promoted"]
    assert 'badge b-no-shift">no shift<' in rows[0] and 'badge b-rejected">rejected<' in rows[1]
    assert 'badge b-promoted">promoted<' in rows[2] and "2025-06-01 09:00" in rows[2]
    assert ">0.600<" in rows[1] and ">-0.0001<" in rows[0]  # the selection score; MMD² to 3 significant digits
    assert "3 runs, 2025-06-01 09:00 to 2025-06-03 09:00" in page
    assert "champion: version 3 (as of run r3-quiet)" in page
    assert page.count('src="data:image/png;base64,') == 1 and "<h2>Over time</h2>" in page
    _assert_self_contained(page)


def test_zero_and_one_run_render_and_say_so():
    empty = render_history([])
    assert "No committed runs in this store yet" in empty and "<table" not in empty and "<img" not in empty
    _assert_self_contained(empty)
    one = render_history(rows_from_summaries(SUMMARIES[1:2]))
    assert "Only one run so far" in one and len(_table_rows(one)) == 1 and one.count("<img") == 1
    _assert_self_contained(one)


def test_user_text_is_escaped():
    page = render_history(
        rows_from_summaries([_summary("<run>", "x", promotion={"promoted": False, "reason": "<b>worse</b> & $x$"})])
    )
    assert "&lt;run&gt;" in page and "<run>" not in page and "&lt;b&gt;worse&lt;/b&gt; &amp; $x$" in page
    assert "<b>worse" not in page


@pytest.mark.parametrize("protocol", ["file", "memory"])
def test_write_history_reads_committed_runs(protocol, tmp_path, memory_uri):
    store = str(tmp_path / "store") if protocol == "file" else memory_uri
    for s in SUMMARIES:
        storage.write_json(storage.join(store, "runs", s["run_id"], "summary.json"), s)
    storage.write_json(storage.join(store, "runs", "r4-running", "metrics.json"), {})  # no summary: not committed
    storage.write_bytes(storage.join(store, "runs", "r5-corrupt", "summary.json"), b"{not json")
    storage.write_bytes(storage.join(store, "runs", "stray.txt"), b"")
    summaries = read_summaries(store)
    assert [s["run_id"] for s in summaries] == ["r1-promoted", "r2-rejected", "r3-quiet", "r5-corrupt"]
    assert summaries[-1]["status"] == "unreadable" and "not valid JSON" in summaries[-1]["reason"]
    uri = write_history(store)
    assert uri == storage.join(store, "history.html")
    page = storage.read_bytes(uri).decode("utf-8")
    assert len(_table_rows(page)) == 4 and "r4-running" not in page and 'b-other">unreadable<' in page
    _assert_self_contained(page)


def test_write_history_on_an_empty_store(memory_uri):
    assert read_summaries(memory_uri) == []
    assert "No committed runs" in storage.read_bytes(write_history(memory_uri)).decode("utf-8")


def test_a_trained_run_shows_the_promotion_decision_not_its_status():
    from adaptflow.report.history import rows_from_summaries

    (row,) = rows_from_summaries(
        [
            {
                "run_id": "r",
                "status": "trained",
                "promotion": {
                    "promoted": False,
                    "reason": "selection score 0.4 < 0.5",
                    "version": 2,
                    "champion_version": 1,
                    "champion_after": 1,
                },
            }
        ]
    )
    assert (row.decision, row.reason, row.champion_version) == ("rejected", "selection score 0.4 < 0.5", 1)


def test_each_run_links_its_report_and_shows_the_score_its_version_was_registered_with(memory_uri):
    from adaptflow.models import registry

    store = memory_uri
    lineage = registry.Lineage(
        dataset_snapshot="d" * 16, extractor_fingerprint="f" * 16, config_hash="c" * 16, code_version="0.1.0"
    )
    metrics = {"source_val_accuracy": 0.9, "target_accuracy": None, "source_test_accuracy": 0.88}
    for v, score in ((1, 0.1), (2, 0.2), (3, 0.832)):  # the gate's score: the validators that may judge it
        mv = registry.register(
            store, f"{store}/models/m{v}", f"r{v}", lineage, {**metrics, "selection_score": score}, "dann"
        )
        assert mv.version == v
    for s in SUMMARIES:
        storage.write_json(
            storage.join(store, "runs", s["run_id"], "summary.json"),
            {**s, "report_uri": f"{store}/runs/{s['run_id']}/report.html"},
        )
    page = storage.read_bytes(write_history(store)).decode("utf-8")
    _assert_self_contained(page)  # links to the reports beside it, nothing fetched
    cells = {
        run: re.findall(r'<td class="n">([^<]*)</td>', row)
        for row in _table_rows(page)
        for run in re.findall(r"<code>(r\d-\w+)</code>", row)
    }
    # r1-promoted registered version 3: its score as registered (0.832), not its summary's selection_score (1.5)
    assert "0.832" in cells["r1-promoted"] and "1.5" not in cells["r1-promoted"]
    # r2-rejected's version 4 is not in the registry: the mean of its policy's scores, as before
    assert "0.600" in cells["r2-rejected"]
    for run in ("r1-promoted", "r2-rejected", "r3-quiet"):
        assert f'<a href="runs/{run}/report.html"><code>{run}</code></a>' in page
