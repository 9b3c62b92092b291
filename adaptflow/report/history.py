"""One self-contained HTML page with every committed run of a store: what each run did with the
champion, how accuracy and the measured shift moved over time, and how many images went through.

Runs are read from their `summary.json` (a run without one is not committed and is left out), each
turned into a `HistoryRow` by `rows_from_summaries`, which takes any missing or malformed key as
unknown. The page is built with `adaptflow.report.html`'s helpers: inline CSS, plots as base64 PNGs from
Agg-canvas figures, user text escaped; it loads nothing from anywhere.
"""

from __future__ import annotations

import math
import posixpath
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from numbers import Integral, Real

import numpy as np
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict

from adaptflow.errors import StoreError
from adaptflow.models import registry
from adaptflow.report.html import CSS, escape, figure_img, html_table, mpl_text, num_cell
from adaptflow.store import storage

_FINISHED = ("", "ok", "completed", "succeeded", "success", "trained")  # statuses that say nothing beyond "it ran"
_BADGES = {
    "promoted": "#1a7f37",
    "rejected": "#cf222e",
    "no shift": "#6e7781",
    "failed": "#82071e",
    "completed": "#0969da",
}
_HISTORY_CSS = (
    "".join(f".b-{d.replace(' ', '-')}{{background:{c};color:#fff}}" for d, c in _BADGES.items())
    + ".b-other{background:#d0d7de;color:#1f2328}td.reason{max-width:360px}"
)
_MAX_TICKS = 12


class HistoryRow(BaseModel):
    """One run as the history page shows it; None means the summary did not say."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    finished_at: str  # ISO 8601 as the summary wrote it; "" when missing
    images_processed: int  # images ingested, summed over the run's datasets (target labels not counted again)
    images_extracted: int | None  # images embedded by this run (the rest came from the feature store)
    target_accuracy: float | None
    source_test_accuracy: float | None
    selection_score: float | None
    shift_statistic: float | None
    shift_p_value: float | None
    shift_detected: bool | None
    decision: str  # "promoted", "rejected", "no shift", "failed", "completed" (no promotion step), ...
    reason: str
    champion_version: int | None  # the champion's version once this run was done
    class_mix: str = ""  # the target's estimated class mix in brief, and how far the champion's predicted one moved
    report: str = ""  # the run's report, relative to the history page beside `runs/`; "" when it has none


def _at(d: object, *keys: str) -> object:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _float(x: object) -> float | None:
    return float(x) if isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x) else None


def _int(x: object) -> int | None:
    return int(x) if isinstance(x, Integral) and not isinstance(x, bool) else None


def _str(x: object) -> str:
    return x if isinstance(x, str) else ""


def _selection_score(adaptation: object) -> float | None:
    """`scores.selection_score` when the summary has one, else the registry's: the mean of the policy's
    validator scores (what the promotion gate compares across runs)."""
    scores, policy = _at(adaptation, "scores"), _at(adaptation, "policy")
    given = _float(_at(scores, "selection_score"))
    if given is not None or not isinstance(scores, dict) or not isinstance(policy, list) or not policy:
        return given
    if not all(_float(scores.get(name)) is not None for name in policy):
        return None
    return _float(registry.selection_score(scores, policy))


def _champion(promotion: dict | None, shift: dict) -> int | None:
    """The champion's version once the run was done. A promotion's `champion_after` says it; without
    one, a promoted run's own version, else the `champion_version` it was compared with; a run that
    reached no promotion (no shift) kept the champion its batch was tested against."""
    if promotion is None:
        return _int(shift.get("champion_version"))
    if "champion_after" in promotion:
        return _int(promotion["champion_after"])
    if promotion.get("promoted") is True and _int(promotion.get("version")) is not None:
        return _int(promotion["version"])
    return _int(promotion.get("champion_version"))


def _report_link(summary: dict, run_id: str) -> str:
    """`runs/<id>/report.html` when the run's report lies in its folder, as every run writes it: relative, so
    the link holds wherever the store is read from (a local folder, a synced copy, a bucket's web view)."""
    uri = _str(summary.get("report_uri"))
    return f"runs/{run_id}/report.html" if uri and uri.endswith(f"/{run_id}/report.html") else ""


def _row(summary: dict, registered: Mapping[int, float | None] | None = None) -> HistoryRow:
    shift = summary.get("shift") if isinstance(summary.get("shift"), dict) else {}
    test = shift.get("test") if isinstance(shift.get("test"), dict) else {}  # null when the run had no test
    promotion = summary.get("promotion") if isinstance(summary.get("promotion"), dict) else None
    status = _str(summary.get("status"))
    p_value = _float(test.get("p_value"))
    if status not in _FINISHED:
        decision = status.replace("_", " ")  # "no_shift" -> "no shift", "failed", ...
    elif promotion is not None:
        decision = "promoted" if promotion.get("promoted") is True else "rejected"
    else:
        decision = "completed"
    reason = next(
        (
            r
            for r in (
                _str(_at(promotion, "reason")),
                _str(summary.get("reason")),
                _str(summary.get("error")),
                _str(shift.get("reason")),
            )
            if r
        ),
        "",
    )
    if not reason and decision == "no shift" and p_value is not None:
        reason = f"no shift detected (p = {p_value:.3g})"
    datasets = summary.get("datasets") if isinstance(summary.get("datasets"), dict) else {}
    detected = shift.get("shift_detected")
    return HistoryRow(
        run_id=_str(summary.get("run_id")) or "?",
        finished_at=_str(summary.get("finished_at")),
        images_processed=sum(
            _int(_at(d, "images")) or 0 for name, d in datasets.items() if not name.endswith("labels")
        ),
        images_extracted=_int(_at(summary, "extraction", "images_extracted")),
        target_accuracy=_float(_at(summary, "metrics", "target", "accuracy")),
        source_test_accuracy=_float(_at(summary, "metrics", "source_test", "accuracy")),
        selection_score=registered[version]
        if registered and (version := _int(_at(promotion, "version"))) in registered
        else _selection_score(summary.get("adaptation")),
        shift_statistic=_float(test.get("statistic")),
        shift_p_value=p_value,
        shift_detected=detected if isinstance(detected, bool) else None,
        decision=decision,
        reason=reason,
        champion_version=_champion(promotion, shift),
        class_mix=_class_mix(summary.get("adaptation"), shift),
        report=_report_link(summary, _str(summary.get("run_id"))),
    )


def _class_mix(adaptation: object, shift: dict) -> str:
    """'0: 0.70 (source 0.10)' for the estimate's largest share, and 'moved 0.12' for the monitor's
    class-mix test; '' when the summary has neither (a run of an earlier release)."""
    parts = []
    mix = _at(adaptation, "class_mix")
    estimate, source, classes = (_at(mix, k) for k in ("estimate", "source", "classes"))
    if isinstance(estimate, list) and isinstance(source, list) and isinstance(classes, list) and estimate:
        i = max(range(len(estimate)), key=lambda k: _float(estimate[k]) or 0.0)
        if i < len(source) and i < len(classes):
            parts.append(f"{_str(classes[i])}: {_float(estimate[i]) or 0:.2f} (source {_float(source[i]) or 0:.2f})")
    moved = _float(_at(shift, "class_mix", "total_variation"))
    if moved is not None:
        parts.append(f"moved {moved:.2f}" + (" (shift)" if _at(shift, "class_mix", "detected") is True else ""))
    return "; ".join(parts)


def rows_from_summaries(
    summaries: list[dict], registered: Mapping[int, float | None] | None = None
) -> list[HistoryRow]:
    """One row per run summary dict, in the given order; entries that are not dicts are skipped. A run that
    registered a version in `registered` ({version: selection score as registered}) shows that score: the
    one the gate compares across runs, over the validators that may judge the model.

    Reads run_id, finished_at, datasets.*.images (summed over every dataset the run ingested),
    extraction.images_extracted, metrics.target.accuracy, metrics.source_test.accuracy,
    adaptation.scores.selection_score (else the mean of adaptation.policy's scores), shift.test.{statistic,
    p_value}, shift.shift_detected and shift.reason (the monitor's ShiftManifest, the only shape a run has
    written), promotion.{promoted, reason, version, champion_version, champion_after} and status. The
    decision is the status when it says more than "finished" ("no_shift" reads "no shift"), else
    "promoted"/"rejected" from the promotion, else "completed".
    """
    return [_row(s, registered) for s in summaries if isinstance(s, dict)]


def _when(row: HistoryRow) -> datetime:
    """`finished_at` as an aware datetime (naive read as UTC); unreadable ones sort first."""
    try:
        t = datetime.fromisoformat(row.finished_at)
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _short_time(row: HistoryRow) -> str:
    t = _when(row)
    return t.strftime("%Y-%m-%d %H:%M") if t.year > 1 else (row.finished_at or "–")


def _badge(decision: str) -> str:
    cls = decision.replace(" ", "-") if decision in _BADGES else "other"
    return f'<span class="badge b-{cls}">{escape(decision)}</span>'


def _overview(rows: list[HistoryRow]) -> str:
    """`rows` oldest first."""
    if not rows:
        return '<p class="note">No committed runs in this store yet: the history fills in as runs finish.</p>'
    counts = Counter(r.decision for r in rows)
    text = f"{len(rows)} run{'s' if len(rows) > 1 else ''}"
    text += f", {_short_time(rows[0])} to {_short_time(rows[-1])}" if len(rows) > 1 else f", {_short_time(rows[0])}"
    text += " · " + ", ".join(f"{n} {d}" for d, n in counts.most_common())
    champion = next((r for r in reversed(rows) if r.champion_version is not None), None)
    if champion is not None:
        text += f" · champion: version {champion.champion_version} (as of run {champion.run_id})"
    out = f'<p class="verdict">{escape(text)}</p>'
    if len(rows) == 1:
        out += '\n<p class="note">Only one run so far: the trends below fill in as more runs finish.</p>'
    return out


def _runs_table(rows: list[HistoryRow]) -> str:
    """`rows` newest first."""
    head = [
        "finished",
        "run",
        "decision",
        "reason",
        "images",
        "extracted",
        "target acc",
        "source test acc",
        "selection score",
        "shift MMD²",
        "shift p",
        "class mix",
        "champion",
    ]
    body = [
        [
            escape(_short_time(r)),
            f'<a href="{escape(r.report)}"><code>{escape(r.run_id)}</code></a>'
            if r.report
            else f"<code>{escape(r.run_id)}</code>",
            _badge(r.decision),
            ("reason", escape(r.reason)),
            num_cell(r.images_processed),
            num_cell(r.images_extracted),
            num_cell(r.target_accuracy),
            num_cell(r.source_test_accuracy),
            num_cell(r.selection_score),
            num_cell(r.shift_statistic, ".3g"),
            num_cell(r.shift_p_value, ".3g"),
            escape(r.class_mix),
            num_cell(r.champion_version),
        ]
        for r in rows
    ]
    return "<h2>Runs</h2>\n" + f'<div class="scroll">{html_table(head, body)}</div>'


def _series(rows: list[HistoryRow], field: str) -> np.ndarray:
    return np.array([np.nan if getattr(r, field) is None else getattr(r, field) for r in rows], dtype=np.float64)


def _trends(rows: list[HistoryRow]) -> str:
    """Three panels over the runs, oldest on the left: accuracy, measured shift, images processed."""
    x = np.arange(len(rows))
    fig = Figure(figsize=(max(6.0, min(14.0, 2.0 + 0.45 * len(rows))), 8.4), dpi=100, layout="constrained")
    acc, shift, images = fig.subplots(3, 1, sharex=True)
    for field, label, colour in (
        ("target_accuracy", "target accuracy", "#ff7f0e"),
        ("source_test_accuracy", "source test accuracy", "#1f77b4"),
    ):
        y = _series(rows, field)
        if np.isfinite(y).any():
            acc.plot(x, y, marker="o", color=colour, label=label)
    acc.set(ylabel="accuracy", title="Accuracy per run")

    stat = _series(rows, "shift_statistic")
    if np.isfinite(stat).any():
        shift.plot(x, stat, color="#6e7781", lw=1)
        hit = np.array([r.shift_detected is True for r in rows])
        shift.scatter(x[hit], stat[hit], color="#cf222e", zorder=3, label="shift detected")
        shift.scatter(x[~hit], stat[~hit], facecolors="none", edgecolors="#6e7781", zorder=3, label="not detected")
        shift.axhline(0.0, color="#d0d7de", lw=0.8)
    else:
        shift.text(0.5, 0.5, "no shift measured yet", ha="center", va="center", transform=shift.transAxes)
    shift.set(ylabel="MMD²", title="Shift of each run's batch from the champion's data")

    images.bar(x, [r.images_processed for r in rows], color="#8c959f", width=0.6)
    images.set(ylabel="images", title="Images processed per run")

    promoted = [k for k, r in enumerate(rows) if r.decision == "promoted"]
    for ax in (acc, shift, images):
        for k in promoted:
            ax.axvline(
                k,
                color="#1a7f37",
                ls="--",
                lw=1,
                alpha=0.5,
                label="promoted" if ax is acc and k == promoted[0] else None,
            )
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    step = math.ceil(len(rows) / _MAX_TICKS)
    images.set_xticks(x[::step], [mpl_text(_short_time(r)) for r in rows[::step]], rotation=30, ha="right")
    images.set_xlim(-0.6, len(rows) - 0.4)
    return "<h2>Over time</h2>\n" + figure_img(fig, "accuracy, shift and images processed per run")


def render_history(rows: list[HistoryRow]) -> str:
    """The whole HTML page: an overview line, every run newest first, and the trends over time. Any
    number of runs renders, none included; rows are ordered by `finished_at` whatever their order."""
    oldest_first = sorted(rows, key=_when)
    body = ["<h1>adaptflow run history</h1>", _overview(oldest_first)]
    if rows:
        body += [_runs_table(oldest_first[::-1]), _trends(oldest_first)]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>adaptflow run history</title>'
        f"<style>{CSS}{_HISTORY_CSS}</style></head>\n<body><main>\n" + "\n".join(body) + "\n</main></body></html>\n"
    )


def read_summaries(store_uri: str) -> list[dict]:
    """Every committed run's summary under `{store}/runs/`, by folder name. A folder without a
    summary.json is a run still going or one that crashed, and is left out; a summary that cannot be
    read becomes {"run_id", "status": "unreadable", "reason"} so the page shows it rather than fail."""
    runs = storage.join(store_uri, "runs")
    names = sorted(posixpath.basename(e["name"].rstrip("/")) for e in storage.ls(runs) if e.get("type") == "directory")
    summaries = []
    for name in names:
        uri = storage.join(runs, name, "summary.json")
        if not storage.exists(uri):
            continue
        try:
            summary = storage.read_json(uri)
        except StoreError as e:
            summary = {"status": "unreadable", "reason": str(e)}
        if isinstance(summary, dict):
            summaries.append({"run_id": name, **summary})
    return summaries


def _registered_scores(store_uri: str, summaries: list[dict]) -> dict[int, float | None]:
    """{version: its registered selection score} for each version a run's promotion names; a version the
    registry cannot read is left out (its row falls back to the summary's scores)."""
    versions = {_int(_at(s.get("promotion"), "version")) for s in summaries} - {None}
    scores = {}
    for v in sorted(versions):
        try:
            scores[v] = _float(registry.get_version(store_uri, v).metrics.get("selection_score"))
        except (StoreError, OSError, ValueError):
            continue
    return scores


def write_history(store_uri: str) -> str:
    """Write `{store}/history.html` from every committed run; returns its URI."""
    uri = storage.join(store_uri, "history.html")
    summaries = read_summaries(store_uri)
    page = render_history(rows_from_summaries(summaries, _registered_scores(store_uri, summaries)))
    storage.write_bytes(uri, page.encode("utf-8"))
    return uri
