import json
import re

import matplotlib.pyplot as plt
import numpy as np
import pytest

from adaptflow.evaluate.metrics import classification_metrics
from adaptflow.report.html import embed_2d, render_report, write_report
from adaptflow.store import storage

CLASSES = ["<b>&cat", "dog", "50$ \\frac{$"]  # HTML to escape; a `$` pair that would crash mathtext
SECTIONS = [
    "Summary",
    "Candidates",
    "Classification metrics",
    "Source test",
    "Target",
    "Domain gap",
    "Feature embedding (t-SNE)",
    "Training curves",
]


def _metrics(seed: int, n: int = 60) -> dict:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    pred = np.where(rng.random(n) < 0.7, y, rng.integers(0, 3, n))
    return classification_metrics(y, pred, CLASSES)


def _domains(seed: int, ns: int = 30, nt: int = 20, d: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(ns, d)), rng.normal(1.0, 1.0, size=(nt, d))


def _candidate(name, method, mode, scores, collapsed, acc, **hparams):
    return {
        "name": name,
        "method": method,
        "mode": mode,
        "hparams": hparams,
        "scores": scores,
        "collapsed": collapsed,
        "target_accuracy": acc,
        "seconds": 12.5,
        "steps": 300,
        "total_steps": 300,
        "stopped_at_rung": None,
    }


@pytest.fixture(scope="module")
def report() -> dict:
    cands = [
        _candidate(
            "source_only",
            "source_only",
            "features",
            {"source_val_acc": 0.90, "im": 0.2, "bnm": 0.3, "entropy": -0.4},
            False,
            0.21,
            lr=0.01,
        ),
        _candidate(
            "entmin <i>",
            "im",
            "features",
            {"source_val_acc": 0.30, "im": 0.01, "bnm": 0.1, "entropy": -0.01},
            True,
            0.05,
            lr=0.01,
        ),
        _candidate(
            "dann",
            "dann",
            "images",
            {"source_val_acc": 0.88, "im": 0.6, "bnm": 0.5, "entropy": -0.3},
            False,
            0.83,
            lr=0.001,
            trade_off=1.0,
        ),
        _candidate(
            "cdan",
            "cdan",
            "images",
            {"source_val_acc": 0.87, "im": 0.5, "bnm": 0.6, "entropy": -0.2},
            False,
            0.86,
            lr=0.001,
        ),
    ]
    step = np.arange(1, 6)
    return {
        "run_id": "run-<42>",
        "summary": {"source images": 300, "target images": 200, "rejected": 3, "backbone": "resnet18"},
        "candidates": cands,
        "selection": {
            "index": 2,
            "reason": "best mean rank 0.83 over source_val_acc, im, bnm",
            "policy": ["source_val_acc", "im", "bnm"],
            "oracle_index": 3,
            "ranks": [0.33, None, 0.83, 0.67],
            "reference_index": 0,
            "confident": True,
            "confidence": "no worse than source-only source_only on any validator that may judge it",
        },
        "metrics": {"source_test": _metrics(0), "target": _metrics(1)},
        "domain_gap": {
            "before": {"proxy_a_distance": 1.6, "mmd": 0.21},
            "after": {"proxy_a_distance": 0.4, "mmd": 0.03},
        },
        "embeddings": {"before": embed_2d(*_domains(0), max_points=40), "after": embed_2d(*_domains(1), max_points=40)},
        "curves": {
            c["name"]: [{"step": int(s), "loss": float(2 / s), "cls_loss": float(1 / s)} for s in step] for c in cands
        },
    }


@pytest.fixture(scope="module")
def page(report) -> str:
    return render_report(report)


def _rows(page: str) -> list[str]:
    return re.findall(r"<tr(?: class=\"[^\"]*\")?><td class=\"n\">\d+</td>.*?</tr>", page)


def test_every_section_is_rendered(page):
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in page or f"<h3>{title}</h3>" in page, title
    assert "selected dann (images); target accuracy 0.830 vs source-only 0.210" in page
    assert "run-&lt;42&gt;" in page and "run-<42>" not in page


def test_candidates_are_in_selection_order_with_markers(page):
    rows = _rows(page)
    assert len(rows) == 4
    assert rows[0].startswith('<tr class="selected">') and "badge b-selected" in rows[0] and ">dann<" in rows[0]
    assert "badge b-oracle" in rows[1] and ">cdan<" in rows[1]
    assert ">source_only<" in rows[2] and "badge b-reference" in rows[2]
    assert rows[3].startswith('<tr class="collapsed">') and "entmin &lt;i&gt;" in rows[3]
    assert "<th>target acc</th>" in page
    assert "Selected vs oracle</b>: target accuracy 0.830 vs 0.860 (gap 0.030)" in page


def test_candidates_stopped_by_successive_halving_say_when(report):
    cands = [{**c, "steps": 100, "stopped_at_rung": 0} if c["name"] == "cdan" else c for c in report["candidates"]]
    rows = _rows(render_report({**report, "candidates": cands}))
    stopped = next(r for r in rows if ">cdan<" in r)
    assert "100 / 300" in stopped and "stopped after rung 1" in stopped
    assert all("stopped after" not in r and "300" in r for r in rows if r is not stopped)


def test_low_confidence_is_said_at_the_top_and_under_the_candidates(report):
    unsure = {
        **report,
        "selection": {
            **report["selection"],
            "confident": False,
            "confidence": "source-only source_only scores higher on im 0.6 < 0.7",
        },
    }
    page = render_report(unsure)
    assert "LOW CONFIDENCE: source-only source_only scores higher on im 0.6 &lt; 0.7" in page
    assert "<b>Low confidence</b>: source-only source_only scores higher on im" in page
    assert "Confident: no worse than source-only" in render_report(report)


def test_user_text_is_escaped(page):
    assert "&lt;b&gt;&amp;cat" in page and "<b>&cat" not in page
    assert "<i>" not in page


def test_plots_are_embedded_pngs_and_nothing_is_fetched(page):
    assert page.count('<img alt="') == page.count('src="data:image/png;base64,') == 4  # 2 confusions, t-SNE, curves
    links = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", page, flags=re.I)
    assert links and not [u for u in links if u.lower().startswith(("http:", "https:", "//"))]
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert not plt.get_fignums()  # nothing left open in pyplot's registry


def test_absent_sections_are_skipped():
    page = render_report({"run_id": "r1", "metrics": {"source_test": _metrics(0), "target": None}})
    assert "<h2>Classification metrics</h2>" in page and "<h3>Source test</h3>" in page
    for title in ["Summary", "Candidates", "Domain gap", "Feature embedding (t-SNE)", "Training curves"]:
        assert f"<h2>{title}</h2>" not in page
    assert "<h3>Target</h3>" not in page and page.count("data:image/png;base64,") == 1
    assert "source test accuracy" in page
    assert "<h2>" not in render_report({"run_id": "bare"})


def test_label_free_verdict_and_no_accuracy_column(report):
    cands = [{**c, "target_accuracy": None} for c in report["candidates"]]
    page = render_report(
        {"run_id": "r", "candidates": cands, "selection": {**report["selection"], "oracle_index": None}}
    )
    assert "label-free scores source_val_acc 0.880, im 0.600, bnm 0.500 (no target labels)" in page
    assert "target acc" not in page and "badge b-oracle" not in page and "Selected vs oracle" not in page


def test_all_collapsed_is_flagged(report):
    cands = [{**c, "collapsed": True} for c in report["candidates"]]
    page = render_report({"run_id": "r", "candidates": cands, "selection": {"index": 0, "reason": "all collapsed"}})
    assert "WARNING: the selected model is collapsed" in page
    assert _rows(page)[0].startswith('<tr class="selected collapsed">')


def test_embed_2d_shapes_and_determinism():
    s, t = _domains(0)
    a = embed_2d(s[:12], t[:8], seed=3)
    assert np.shape(a["source"]) == (12, 2) and np.shape(a["target"]) == (8, 2)
    assert json.loads(json.dumps(a)) == a
    b = embed_2d(s, t, seed=3, max_points=20)  # balanced: half of the budget per domain
    assert np.shape(b["source"]) == (10, 2) and np.shape(b["target"]) == (10, 2)
    assert b == embed_2d(s, t, seed=3, max_points=20)
    c = embed_2d(s[:2, :1], t[:1, :1])  # tiny and one-dimensional still embeds
    assert np.shape(c["source"]) == (2, 2) and np.shape(c["target"]) == (1, 2)
    with pytest.raises(ValueError, match="at least one target sample"):
        embed_2d(s, t[:0])


def test_embed_2d_of_features_that_are_all_the_same_draws_one_point():
    """A backbone that sees nothing (random tv:mobilenet_v3_small at 32 px gave every image the same
    features) made sklearn's t-SNE crash the whole run with a segmentation fault."""
    same = np.ones((40, 16))
    flat = embed_2d(same, same[:30], seed=0)
    assert flat == {"source": [[0.0, 0.0]] * 40, "target": [[0.0, 0.0]] * 30}
    broken = embed_2d(np.full((5, 4), np.nan), np.zeros((5, 4)))  # a model that outputs NaN: no crash either
    assert np.shape(broken["source"]) == (5, 2)


def test_write_report_round_trips(report, page, memory_uri):
    uri = storage.join(memory_uri, "report.html")
    write_report(uri, report)
    assert storage.read_bytes(uri).decode("utf-8") == page  # rendering is deterministic too


def test_numpy_scalars_read_as_numbers(report):
    cands = [{**c, "scores": {k: np.float32(v) for k, v in c["scores"].items()}} for c in report["candidates"]]
    page = render_report(
        {"run_id": "r", "candidates": cands, "selection": {**report["selection"], "index": np.int64(2)}}
    )
    assert _rows(page)[0].startswith('<tr class="selected">') and '<td class="n">0.880</td>' in page


def test_training_curves_plot_the_losses_not_the_seconds():
    from adaptflow.report.html import curve_keys

    rung = [
        {"step": 50, "loss": 1.2, "transfer": 0.6, "elapsed_s": 31.0},
        {"step": 100, "loss": 0.9, "elapsed_s": 62.0},
    ]
    over = [{"step": 150, "loss": 0.8, "elapsed_s": 2.0, "budget_exceeded": 1.0}]  # a rung's clock restarts
    assert curve_keys(rung + over, "step") == ["loss", "transfer"]
