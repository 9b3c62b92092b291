"""One self-contained HTML page per run: what was trained, what was picked and why, how it scores,
how far apart the domains are before and after adaptation, and how training went.

`render_report` reads a JSON-ready dict in which every key but `run_id` is optional; a section whose
key is absent or empty is left out. Plots are PNGs embedded as base64 and the CSS is inline: the page
loads nothing from anywhere. Figures are `matplotlib.figure.Figure`s on an Agg canvas, never pyplot's,
so no global backend is switched and no figure is left registered in a long-lived worker.

`CSS`, `escape`, `num_cell`, `html_table`, `figure_img` and `mpl_text` are the building blocks the
history page (`adaptflow.report.history`) shares.
"""

from __future__ import annotations

import base64
import html
import io
import math
from numbers import Integral, Real

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.manifold import TSNE
from threadpoolctl import threadpool_limits

from adaptflow.adapt.selection import finite_or_lowest
from adaptflow.store import storage

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;margin:0}
main{max-width:1240px;margin:0 auto;padding:24px 32px 48px}
h1{font-size:22px;margin:0 0 6px}h3{font-size:15px;margin:18px 0 6px}
h2{font-size:18px;margin:32px 0 8px;padding-bottom:4px;border-bottom:1px solid #d0d7de}
code{font-size:13px;background:#f6f8fa;padding:1px 4px;border-radius:3px}
.verdict{font-size:16px;margin:4px 0 0}.note{color:#57606a;margin:6px 0}
table{border-collapse:collapse;margin:6px 0}
th,td{padding:4px 7px;border-bottom:1px solid #e5e7eb;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
th.policy{text-decoration:underline}.hp{font-size:12px;color:#57606a;max-width:280px}.scroll{overflow-x:auto}
tr.selected td{background:#e6f4ea}tr.collapsed td{background:#fdecea}
.badge{display:inline-block;font-size:11px;font-weight:600;padding:0 6px;border-radius:8px;margin-right:3px}
.b-selected{background:#1a7f37;color:#fff}.b-oracle{background:#8250df;color:#fff}.b-reference{background:#57606a;color:#fff}
.b-collapsed{background:#cf222e;color:#fff}
.row{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}img{max-width:100%;height:auto}
"""
_COLOURS = {"source": "#1f77b4", "target": "#ff7f0e"}
_GAP_NAMES = {"proxy_a_distance": "proxy A-distance (0 to 2)", "mmd": "MMD² (multi-kernel)"}


def embed_2d(source_feats: np.ndarray, target_feats: np.ndarray, seed: int = 0, max_points: int = 1000) -> dict:
    """t-SNE of both domains in one embedding, so their overlap can be read off the picture.

    Each domain contributes up to max_points // 2 rows drawn without replacement with `seed`, so
    n_s = min(Ns, max_points // 2) and likewise n_t. Perplexity is min(30, (n - 1) / 3) of the n rows
    embedded (sklearn needs it below n). Returns {"source": (n_s, 2), "target": (n_t, 2)} as lists.
    """
    rng = np.random.default_rng(seed)
    parts = []
    for name, x in (("source", source_feats), ("target", target_feats)):
        if len(x) == 0:
            raise ValueError(f"embed_2d needs at least one {name} sample")
        x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
        parts.append(x[np.sort(rng.choice(len(x), min(len(x), max(max_points // 2, 1)), replace=False))])
    x = np.nan_to_num(np.concatenate(parts), nan=0.0, posinf=0.0, neginf=0.0)
    if not np.ptp(x, axis=0).any():  # every image the same point (a backbone that sees nothing): so drawn;
        # sklearn's Barnes-Hut t-SNE divides by the spread and crashed the process (SIGSEGV) on it
        return {"source": [[0.0, 0.0]] * len(parts[0]), "target": [[0.0, 0.0]] * len(parts[1])}
    if x.shape[1] < 2:  # PCA init needs two feature columns; a zero column leaves distances alone
        x = np.pad(x, ((0, 0), (0, 2 - x.shape[1])))
    perplexity = max(1.0, min(30.0, (len(x) - 1) / 3))
    # One OpenMP thread: the result is the same, and on 2 busy shared cores 2 spinning threads made a
    # 1000-point embedding take 36-56 s instead of 10-12 s (50 points: 6 s instead of 0.2 s).
    with threadpool_limits(1, user_api="openmp"):
        y = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(x)
    y = np.round(y.astype(np.float64), 4)
    return {"source": y[: len(parts[0])].tolist(), "target": y[len(parts[0]) :].tolist()}


def render_report(report: dict) -> str:
    """The whole HTML page for `report` (see the module docstring)."""
    body = [_header(report)]
    body += [section(report) for key, section in _SECTIONS if report.get(key)]
    title = html.escape(f"adaptflow run {report['run_id']}")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{CSS}</style></head>\n<body><main>\n" + "\n".join(body) + "\n</main></body></html>\n"
    )


def write_report(uri: str, report: dict) -> None:
    storage.write_bytes(uri, render_report(report).encode("utf-8"))


def escape(x: object) -> str:
    """`x` as text safe inside HTML."""
    return html.escape(str(x))


def _num(x: float | int | None, spec: str = ".3f") -> str:
    """Numbers (numpy's too) formatted; None as a dash; anything else as escaped text."""
    if x is None:
        return "–"
    if isinstance(x, bool) or not isinstance(x, Real):
        return escape(x)
    return str(int(x)) if isinstance(x, Integral) else format(float(x), spec)


def mpl_text(text: object) -> str:
    """Text for a matplotlib label: a user's `$` must not switch on (and crash) mathtext."""
    return str(text).replace("$", r"\$")


def figure_img(fig: Figure, alt: str) -> str:
    """An `<img>` holding `fig` as an embedded PNG: the page needs no file beside it."""
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def num_cell(x: float | int | None, spec: str = ".3f") -> tuple[str, str]:
    """A right-aligned number cell for `html_table`."""
    return "n", _num(x, spec)


def html_table(head: list[str], rows: list[list], classes: list[str] | None = None) -> str:
    """`head`: plain text or a ready `<th>`; a cell: HTML escaped by the caller, or (css class, HTML)."""
    th = "".join(h if h.startswith("<th") else f"<th>{escape(h)}</th>" for h in head)
    trs = []
    for k, row in enumerate(rows):
        cls = f' class="{classes[k]}"' if classes and classes[k] else ""
        tds = "".join(f'<td class="{c[0]}">{c[1]}</td>' if isinstance(c, tuple) else f"<td>{c}</td>" for c in row)
        trs.append(f"<tr{cls}>{tds}</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(trs)}</tbody></table>"


def _selected(report: dict) -> tuple[int | None, int | None]:
    """(selected index, oracle index); the oracle defaults to the best known target accuracy."""
    cands, sel = report.get("candidates") or [], report.get("selection") or {}
    index, oracle = sel.get("index"), sel.get("oracle_index")
    known = [i for i, c in enumerate(cands) if c.get("target_accuracy") is not None]
    if oracle is None and known:
        oracle = max(known, key=lambda i: (finite_or_lowest(cands[i]["target_accuracy"]), -i))
    valid = [int(i) if isinstance(i, Integral) and 0 <= i < len(cands) else None for i in (index, oracle)]
    return valid[0], valid[1]


def _describe(c: dict) -> str:
    name, method, mode = c.get("name", "?"), c.get("method"), c.get("mode")
    inside = ", ".join(str(x) for x in ((method if method != name else None), mode) if x)
    return f"{name} ({inside})" if inside else str(name)


def _verdict(report: dict) -> str:
    cands, (i, _) = report.get("candidates") or [], _selected(report)
    metrics = report.get("metrics") or {}
    target = metrics.get("target") or {}
    if i is None:
        for key, label in (("target", "target accuracy"), ("source_test", "source test accuracy")):
            if (metrics.get(key) or {}).get("accuracy") is not None:
                return f"{label} {_num(metrics[key]['accuracy'])}"
        return ""
    c = cands[i]
    acc = c.get("target_accuracy") if c.get("target_accuracy") is not None else target.get("accuracy")
    if acc is not None:
        base = next(
            (
                x["target_accuracy"]
                for x in cands
                if x is not c and x.get("method") == "source_only" and x.get("target_accuracy") is not None
            ),
            None,
        )
        text = f"selected {_describe(c)}; target accuracy {_num(acc)}"
        text += f" vs source-only {_num(base)}" if base is not None else ""
    else:
        scores = c.get("scores") or {}
        names = [n for n in ((report.get("selection") or {}).get("policy") or scores) if n in scores]
        text = f"selected {_describe(c)}; label-free scores " + ", ".join(f"{n} {_num(scores[n])}" for n in names)
        text += " (no target labels)"
    if (report.get("selection") or {}).get("confident") is False:
        text += " — LOW CONFIDENCE: " + str(report["selection"].get("confidence", ""))
    return text + (" — WARNING: the selected model is collapsed" if c.get("collapsed") else "")


def _header(report: dict) -> str:
    verdict = _verdict(report)
    out = f"<h1>adaptflow run <code>{escape(report['run_id'])}</code></h1>"
    return out + (f'\n<p class="verdict">{escape(verdict)}</p>' if verdict else "")


def _summary(report: dict) -> str:
    rows = [[escape(k), num_cell(v) if isinstance(v, Real) else escape(v)] for k, v in report["summary"].items()]
    return "<h2>Summary</h2>\n" + html_table(["", "value"], rows)


def _order(cands: list[dict], chosen: int | None, ranks: list) -> list[int]:
    """Indices in selection order: the chosen one first, then by the selection's own mean rank
    (`adapt.selection`), unranked (collapsed) ones last; ties go to the earlier candidate."""
    rank = {i: r for i, r in enumerate(ranks or []) if r is not None}
    return sorted(range(len(cands)), key=lambda i: (i != chosen, i not in rank, -rank.get(i, 0.0), i))


def _steps(c: dict) -> str:
    """Steps trained of the budget; where successive halving stopped the candidate, after which rung."""
    steps, total = c.get("steps"), c.get("total_steps")
    if steps is None:
        return "–"
    text = f"{steps:,}" + (f" / {total:,}" if total and total != steps else "")
    if c.get("stopped_at_rung") is not None:
        text += f'<div class="hp">stopped after rung {c["stopped_at_rung"] + 1}</div>'
    return text


def _candidates(report: dict) -> str:
    cands, sel = report["candidates"], report.get("selection") or {}
    chosen, oracle = _selected(report)
    policy = list(sel.get("policy") or [])
    mean_rank = {i: r for i, r in enumerate(sel.get("ranks") or []) if r is not None}
    order = _order(cands, chosen, sel.get("ranks") or [])
    reference = sel.get("reference_index")
    validators = list(dict.fromkeys(policy + [k for c in cands for k in (c.get("scores") or {})]))
    show_acc = any(c.get("target_accuracy") is not None for c in cands)
    head = [
        "#",
        "",
        "name",
        "method",
        "mode",
        *(["mean rank"] if mean_rank else []),
        *(f'<th class="policy">{escape(v)}</th>' if v in policy else v for v in validators),
        "collapsed",
        *(["target acc"] if show_acc else []),
        "steps",
        "seconds",
    ]
    rows, classes = [], []
    for rank, i in enumerate(order, 1):
        c = cands[i]
        marks = (("selected", i == chosen), ("oracle", i == oracle), ("reference", i == reference))
        badges = "".join(f'<span class="badge b-{b}">{b}</span>' for b, on in marks if on)
        hp = ", ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in (c.get("hparams") or {}).items()
        )
        scores = c.get("scores") or {}
        rows.append(
            [
                ("n", str(rank)),
                badges,
                f'{escape(c.get("name", "?"))}<div class="hp">{escape(hp)}</div>',
                escape(c.get("method", "")),
                escape(c.get("mode", "")),
                *([num_cell(mean_rank.get(i), ".2f")] if mean_rank else []),
                *(num_cell(scores.get(v)) for v in validators),
                '<span class="badge b-collapsed">collapsed</span>' if c.get("collapsed") else "no",
                *([num_cell(c.get("target_accuracy"))] if show_acc else []),
                _steps(c),
                num_cell(c.get("seconds"), ".1f"),
            ]
        )
        classes.append(" ".join(k for k, on in (("selected", i == chosen), ("collapsed", c.get("collapsed"))) if on))
    notes = []
    if policy:
        notes.append(
            f"Ranked by mean rank (1 best) over {escape(', '.join(policy))} (underlined) among the "
            "non-collapsed candidates, each judged only by the validators its own training did not "
            "optimise; collapsed ones are listed last and picked only if every candidate collapsed. "
            "The reference is the source-only candidate a cautious run falls back to."
        )
    if sel.get("reason"):
        notes.append(f"Selection: {escape(sel['reason'].rstrip('.'))}.")
    if sel.get("confidence"):
        label = "Confident" if sel.get("confident", True) else "<b>Low confidence</b>"
        notes.append(f"{label}: {escape(sel['confidence'])}.")
    if chosen is not None and oracle is not None:
        a, b = cands[chosen].get("target_accuracy"), cands[oracle].get("target_accuracy")
        if a is not None and b is not None:
            gap = "the same model" if chosen == oracle else f"gap {_num(b - a)}"
            notes.append(
                f"<b>Selected vs oracle</b>: target accuracy {_num(a)} vs {_num(b)} ({gap}); the oracle "
                "peeks at target labels and is shown for reference only."
            )
    return (
        '<h2>Candidates</h2>\n<div class="scroll">'
        + html_table(head, rows, classes)
        + "</div>"
        + "".join(f'\n<p class="note">{n}</p>' for n in notes)
    )


def _confusion_png(m: dict, title: str) -> str:
    cm = np.asarray(m["confusion_matrix"], dtype=np.float64)
    names = [mpl_text(c) for c in (m.get("classes") or list(m.get("per_class") or range(len(cm))))]
    c = len(cm)
    size = min(2.6 + 0.3 * c, 9.0)  # inches: 10 classes fit beside their per-class table
    fig = Figure(figsize=(size + 0.9, size), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)  # colour by share of the true class: rare classes read too
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(c), names, rotation=45, ha="right")
    ax.set_yticks(range(c), names)
    if c <= 20:
        for (r, k), v in np.ndenumerate(cm):
            ax.text(
                k, r, f"{v:.0f}", ha="center", va="center", fontsize=8, color="white" if share[r, k] > 0.5 else "black"
            )
    ax.set(xlabel="predicted", ylabel="true", title=f"{title}: confusion matrix")
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of the true class")
    return figure_img(fig, f"{title} confusion matrix")


def _metrics(report: dict) -> str:
    parts = ["<h2>Classification metrics</h2>"]
    for key, title in (("source_test", "Source test"), ("target", "Target")):
        m = report["metrics"].get(key)
        if not m:
            continue
        parts.append(
            f"<h3>{title}</h3>\n<p>accuracy <b>{_num(m.get('accuracy'))}</b> · macro-F1 "
            f"<b>{_num(m.get('macro_f1'))}</b> · n {_num(m.get('n'))}</p>"
        )
        table = (
            html_table(
                ["class", "precision", "recall", "F1", "support"],
                [
                    [escape(name), *(num_cell(v.get(k)) for k in ("precision", "recall", "f1", "support"))]
                    for name, v in (m.get("per_class") or {}).items()
                ],
            )
            if m.get("per_class")
            else ""
        )
        plot = _confusion_png(m, title) if m.get("confusion_matrix") else ""
        parts.append(f'<div class="row">{table}{plot}</div>')
    return "\n".join(parts)


def _domain_gap(report: dict) -> str:
    gap = report["domain_gap"]
    before, after = gap.get("before") or {}, gap.get("after") or {}
    rows = []
    for k in dict.fromkeys([*before, *after]):
        b, a = before.get(k), after.get(k)
        change = a - b if isinstance(a, Real) and isinstance(b, Real) else None
        rows.append([escape(_GAP_NAMES.get(k, k)), num_cell(b, ".4g"), num_cell(a, ".4g"), num_cell(change, "+.4g")])
    return (
        "<h2>Domain gap</h2>\n"
        + html_table(["measure", "before", "after", "change"], rows)
        + '\n<p class="note">Lower is closer: 0 means the domains cannot be told apart.</p>'
    )


def _class_mix(report: dict) -> str:
    """The target's class mix: the source's shares, the estimate with its interval, and with target labels
    (scoring only) the true shares, as a table and a bar chart."""
    mix = report["class_mix"]
    classes, source, estimate = mix["classes"], mix["source"], mix["estimate"]
    low, high, true = mix["low"], mix["high"], mix.get("true")
    head = ["class", "source share", "estimated target share", "interval"] + (["true target share"] if true else [])
    rows = [
        [escape(c), num_cell(source[i]), num_cell(estimate[i]), escape(f"{_num(low[i])} - {_num(high[i])}")]
        + ([num_cell(true[i])] if true else [])
        for i, c in enumerate(classes)
    ]
    fig = Figure(figsize=(max(5.0, 0.55 * len(classes) + 2), 3.2), dpi=100, layout="constrained")
    ax = fig.subplots()
    x, w = np.arange(len(classes)), 0.8 / (3 if true else 2)
    err = [np.subtract(estimate, low), np.subtract(high, estimate)]
    ax.bar(x - w, source, w, label="source", color=_COLOURS["source"])
    ax.bar(x, estimate, w, yerr=np.clip(err, 0, None), label="target (estimated)", color=_COLOURS["target"])
    if true:
        ax.bar(x + w, true, w, label="target (labels)", color="#6e7781")
    ax.set(xticks=x, ylabel="share of images")
    ax.set_xticklabels([mpl_text(c) for c in classes], rotation=45 if len(classes) > 12 else 0)
    ax.legend(fontsize=8)
    verdict = (
        "The estimate differs from the source's mix: adaptation that aligns the target with the source's "
        "balance is at risk, and selection checks the pick against it."
        if mix.get("label_shift")
        else "No clear difference from the source's mix."
    )
    return (
        "<h2>Target class mix</h2>\n"
        + html_table(head, rows)
        + "\n"
        + figure_img(fig, "class mix of source and target")
        + f'\n<p class="note">Estimated without target labels by {escape(mix["method"])} from the outputs of '
        f"{escape(mix.get('model') or 'the source-only model')} ({int(100 * mix['level'])}% bootstrap intervals). "
        f"{verdict} When the target's images also look different from the source's, a source-only model's "
        "mistakes can look like a class mix of their own: read it as evidence, not truth.</p>"
    )


def _embeddings(report: dict) -> str:
    panels = [(k, report["embeddings"][k]) for k in ("before", "after") if report["embeddings"].get(k)]
    if not panels:
        return ""
    fig = Figure(figsize=(5.2 * len(panels), 4.8), dpi=100, layout="constrained")
    for ax, (when, emb) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        for domain in ("source", "target"):
            xy = np.asarray(emb.get(domain) or np.zeros((0, 2)), dtype=np.float64).reshape(-1, 2)
            ax.scatter(xy[:, 0], xy[:, 1], s=7, alpha=0.6, color=_COLOURS[domain], label=f"{domain} ({len(xy)})")
        ax.set(title=f"{when} adaptation", xticks=[], yticks=[])
        ax.legend(loc="best", fontsize=9, markerscale=2)
    return (
        "<h2>Feature embedding (t-SNE)</h2>\n"
        + figure_img(fig, "t-SNE of source and target features")
        + '\n<p class="note">Source and target embedded together; well-mixed colours mean aligned features.</p>'
    )


_NOT_LOSSES = {"elapsed_s", "budget_exceeded"}


def curve_keys(points: list[dict], x_key: str | None) -> list[str]:
    """What a training curve plots against `x_key`: its losses, not the seconds or flags logged beside
    them (seconds restart at each rung of successive halving and dwarf the losses)."""
    return list(
        dict.fromkeys(
            k
            for p in points
            for k, v in p.items()
            if k != x_key and k not in _NOT_LOSSES and isinstance(v, Real) and not isinstance(v, bool)
        )
    )


def _curves(report: dict) -> str:
    curves = report["curves"]
    n = len(curves)
    cols = min(n, 3)
    fig = Figure(figsize=(4.2 * cols, 3.2 * math.ceil(n / cols)), dpi=100, layout="constrained")
    for ax, (name, points) in zip(
        fig.subplots(math.ceil(n / cols), cols, squeeze=False).ravel(), curves.items(), strict=False
    ):
        x_key = next((k for k in ("step", "epoch") if points and k in points[0]), None)
        xs = [p.get(x_key, j) for j, p in enumerate(points)] if x_key else list(range(len(points)))
        keys = curve_keys(points, x_key)
        for k in keys:
            ax.plot(xs, [p.get(k, np.nan) for p in points], label=mpl_text(k), lw=2.0 if k == "loss" else 1.2)
        ax.set(title=mpl_text(name), xlabel=x_key or "point")
        if keys:
            ax.legend(fontsize=8)
    for ax in fig.axes[n:]:
        ax.set_axis_off()
    return "<h2>Training curves</h2>\n" + figure_img(fig, "training curves")


_SECTIONS = (
    ("summary", _summary),
    ("candidates", _candidates),
    ("metrics", _metrics),
    ("class_mix", _class_mix),
    ("domain_gap", _domain_gap),
    ("embeddings", _embeddings),
    ("curves", _curves),
)
