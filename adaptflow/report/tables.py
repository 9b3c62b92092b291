"""A run summary as people read it: the terminal's table and headline, the rows and markdown of Prefect's
artifacts, and `fmt`, the one number formatter every table and page uses."""

from __future__ import annotations

import os

from adaptflow.manifests import ClassMix
from adaptflow.report.records import RunSummary, StageStats


def metrics_rows(summary: RunSummary) -> list[dict]:
    """One row per (model, scored split), for tables (Prefect artifact, command-line output)."""
    if summary.status == "no_shift":
        return []
    selected = summary.adaptation.selected
    rows = []
    for model, m in (("source-only head", summary.baseline), (selected, summary.metrics)):
        for split, scores in (("source test", m.source_test), ("target", m.target)):
            if scores:
                rows.append({"model": model, "split": split, **scores.model_dump()})
        if selected == "head":
            break
    return rows


def headline(summary: RunSummary) -> list[str]:
    """What happened, in a line or three: the shift check, the selection, the promotion decision."""
    lines = []
    if summary.shift:
        lines.append(f"shift check against champion v{summary.shift.champion_version}: {summary.shift.reason}")
    if summary.status == "no_shift":
        lines.append("no retraining: the champion stays")
        return lines
    a = summary.adaptation
    if a.class_mix is not None:
        lines.append(class_mix_line(a.class_mix))
    lines.append(f"selected: {a.selected} ({a.reason})")
    if a.labelled or a.labelled_trained:
        lines.append(
            f"target labels for training: {a.labelled_trained} trained every candidate, {a.labelled} judged them; "
            "no metric counts them"
        )
    if a.prior_corrected:
        lines.append(f"{a.selected} predicts under the estimated class mix (prior-corrected; adapt.prior_correction)")
    if not a.confident:
        lines.append(f"low confidence: {a.confidence}")
    stopped = [c for c in a.candidates if c.stopped_at_rung is not None]
    if stopped:
        lines.append(
            "successive halving stopped " + ", ".join(f"{c.name} at step {c.steps} of {c.total_steps}" for c in stopped)
        )
    if a.regret is not None:
        lines.append(
            f"target labels (scoring only): selected {a.selected_target_accuracy:.3f}, oracle "
            f"{a.oracle} {a.oracle_target_accuracy:.3f}, regret {a.regret:.3f}"
        )
    if summary.promotion:
        p = summary.promotion
        verdict = "promoted to champion" if p.promoted else "kept as challenger"
        lines.append(f"registered as v{p.version}, {verdict}: {p.reason}")
        if p.stand_in_version is not None:
            lines.append(
                f"the source-only reference {a.reference} was registered as "
                f"v{p.stand_in_version} and promoted to champion in its place"
            )
    return lines


def class_mix_line(mix: ClassMix, top: int = 3) -> str:
    """The estimated target class mix in one line: its largest shares beside the source's, and whether it
    differs from the source's (`adapt.priors.label_shift`)."""
    from adaptflow.adapt.priors import label_shift, total_variation

    order = sorted(range(len(mix.classes)), key=lambda i: -mix.estimate[i])[:top]
    shares = ", ".join(
        f"{mix.classes[i]} {fmt(mix.estimate[i])} [{fmt(mix.low[i])}-{fmt(mix.high[i])}] (source {fmt(mix.source[i])})"
        for i in order
    )
    absent = [mix.classes[i] for i in range(len(mix.classes)) if mix.high[i] < 0.01]
    verdict = "differs from the source's" if label_shift(mix) else "no clear difference from the source's"
    tail = f"; absent: {', '.join(absent)}" if absent else ""
    return (
        f"target class mix (estimated by {mix.method} from {mix.model or 'the source-only model'}, "
        f"{int(mix.level * 100)}% intervals): {shares}{tail}; {verdict} (total variation "
        f"{fmt(total_variation(mix.estimate, mix.source))})"
    )


def render_markdown(summary: RunSummary) -> str:
    ex = summary.extraction
    lines = [f"# adaptflow run `{summary.run_id}`", ""] + [f"- {line}" for line in headline(summary)]
    if summary.status != "no_shift":
        lines += ["", "| model | split | accuracy | macro-F1 | n |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['model']} | {r['split']} | {fmt(r['accuracy'])} | {fmt(r['macro_f1'])} | {r['n']} |"
            for r in metrics_rows(summary)
        ]
    lines += ["", "| dataset | images | rejected | files read | unchanged, not read |", "|---|---|---|---|---|"]
    lines += [
        f"| {d} | {v.images} | {v.rejected} | {v.files_read} | {v.files_reused} |" for d, v in summary.datasets.items()
    ]
    lines += [
        "",
        f"Extraction: {ex.images_extracted} images embedded, {ex.images_cached} reused from the "
        f"feature store, {ex.images_per_second or '-'} images/s.",
        "",
        "| stage | seconds | images | images/s | MB read | MB written | orchestration |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {stage} | {st.seconds:.1f} | {st.images or ''} | {st.images_per_second or ''} | "
        f"{st.bytes_read / 1e6:.1f} | {st.bytes_written / 1e6:.1f} | {_pct(st.orchestration_share)} |"
        for stage, st in _stages(summary).items()
    ]
    if summary.status != "no_shift":
        lines += [
            "",
            f"Model: `{summary.model_uri}`  ",
            f"Predictions: `{summary.predictions_uri}`  ",
            f"Report: `{summary.report_uri}`",
        ]
    return "\n".join(lines)


def fmt(x: float | None, spec: str = ".3f", missing: str = "") -> str:
    """A number for a text table; `missing` stands for None."""
    return missing if x is None else format(x, spec)


def _short(validator: str) -> str:
    """A column title for a validator: `source_val_acc` is long."""
    return {"source_val_acc": "src val"}.get(validator, validator)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


_STAGE_ORDER = ("ingest", "extract", "monitor", "train", "evaluate", "promote")


def _stages(summary: RunSummary) -> dict[str, StageStats]:
    """Per-stage statistics in pipeline order (JSON keeps keys sorted); summaries written before they
    existed have wall times only."""
    stages = summary.stages or {stage: StageStats(seconds=sec) for stage, sec in summary.timings.items()}
    rank = {stage: i for i, stage in enumerate(_STAGE_ORDER)}
    return dict(sorted(stages.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def render_table(summary: RunSummary) -> str:
    """A plain-text report for the terminal: accuracy, images processed, time per stage."""
    ex = summary.extraction
    a = summary.adaptation
    lines = [f"adaptflow run {summary.run_id}", *headline(summary)]
    if metrics_rows(summary):
        lines += ["", f"{'model':<24}{'split':<13}{'accuracy':>10}{'macro-F1':>10}{'n':>7}"]
        lines += [
            f"{r['model']:<24}{r['split']:<13}{fmt(r['accuracy']):>10}{fmt(r['macro_f1']):>10}{r['n']:>7}"
            for r in metrics_rows(summary)
        ]
    if a.candidates:
        known = any(c.target_accuracy is not None for c in a.candidates)
        policy = [v for v in a.policy if all(v in c.scores for c in a.candidates)]
        lines += [
            "",
            f"{'candidate':<24}"
            + "".join(f"{_short(v):>9}" for v in policy)
            + f"{'rank':>7}"
            + f"{'collapsed':>11}"
            + (f"{'target*':>9}" if known else "")
            + f"{'seconds':>9}",
        ]
        lines += [
            f"{c.name:<24}"
            + "".join(f"{c.scores[v]:>9.3f}" for v in policy)
            + f"{fmt(c.rank, '.2f'):>7}{'yes' if c.collapsed else 'no':>11}"
            + (f"{fmt(c.target_accuracy):>9}" if known else "")
            + f"{c.seconds:>9.1f}"
            for c in a.candidates
        ]
        if known:
            lines.append(f"* target labels used for scoring only; oracle pick: {a.oracle}")
    lines += ["", f"{'dataset':<14}{'images':>10}{'rejected':>10}{'read':>10}{'unchanged':>11}"]
    lines += [
        f"{d:<14}{v.images:>10}{v.rejected:>10}{v.files_read:>10}{v.files_reused:>11}"
        for d, v in summary.datasets.items()
    ]
    lines += [
        "",
        f"extraction: {ex.images_extracted} embedded, {ex.images_cached} reused, "
        f"{ex.images_per_second or '-'} images/s",
        "",
        f"{'stage':<14}{'seconds':>10}{'images/s':>10}{'MB read':>10}{'MB written':>12}{'orchestration':>15}",
    ]
    lines += [
        f"{stage:<14}{st.seconds:>10.1f}{st.images_per_second or '':>10}{st.bytes_read / 1e6:>10.1f}"
        f"{st.bytes_written / 1e6:>12.1f}{_pct(st.orchestration_share):>15}"
        for stage, st in _stages(summary).items()
    ]
    if summary.report_uri:
        lines += ["", f"report: {summary.report_uri}"]
    return "\n".join(lines)


def shift_row(summary: RunSummary) -> dict:
    sh, test = summary.shift, summary.shift.test if summary.shift else None
    return {
        "champion": f"v{sh.champion_version if sh else None}",
        "mmd2": test.statistic if test else None,
        "p_value": test.p_value if test else None,
        "alpha": test.alpha if test else None,
        "domain_auc": sh.domain_auc if sh else None,
        "shift_detected": sh.shift_detected if sh else None,
        "champion_selection_score": sh.champion.selection_score if sh and sh.champion else None,
        "score_drop": sh.score_drop if sh else None,
        "degraded": sh.degraded if sh else None,
        "retrain": sh.retrain if sh else None,
        "reason": sh.reason if sh else None,
    }


def promotion_row(summary: RunSummary) -> dict:
    p = summary.promotion
    c = (p.compared if p else None) or {}
    return {
        "version": f"v{p.version if p else None}",
        "promoted": p.promoted if p else None,
        "metric": c.get("metric"),
        "challenger": c.get("challenger"),
        "champion": c.get("champion"),
        "margin": c.get("margin"),
        "champion_before": p.champion_version if p else None,
        "champion_after": p.champion_after if p else None,
        "reason": p.reason if p else None,
    }


def stage_rows(summary: RunSummary) -> list[dict]:
    return [{"stage": stage, **st.model_dump()} for stage, st in _stages(summary).items()]


def candidate_rows(summary: RunSummary) -> list[dict]:
    return [
        {
            "candidate": c.name,
            "selected": c.name == summary.adaptation.selected,
            **{k: round(v, 4) for k, v in c.scores.items()},
            "rank": c.rank,
            "collapsed": c.collapsed,
            "target_accuracy (labels, scoring only)": c.target_accuracy,
            "seconds": c.seconds,
        }
        for c in summary.adaptation.candidates
    ]


def as_link(uri: str) -> str:
    """A clickable form of a store URI: local paths become file:// URLs."""
    return uri if "://" in uri else "file://" + os.path.abspath(uri)
