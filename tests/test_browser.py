"""The HTML pages render in a real browser: headless Chromium loads a run report and the history page
from a loopback HTTP server, inside a checker page whose script reads the loaded document (title,
table rows, images decoded, resources fetched); a screenshot of each page must not be blank."""

import functools
import html
import http.server
import json
import os
import re
import shutil
import subprocess
import threading

import numpy as np
import pytest
from PIL import Image
from test_report_history import SUMMARIES
from test_report_html import _candidate, _domains, _metrics

from adaptflow.report.history import write_history
from adaptflow.report.html import embed_2d, write_report
from adaptflow.store import storage

CHROMIUM = next(
    (
        p
        for p in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"))
        if p and os.path.exists(p)
    ),
    None,
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed (looked for /usr/bin/chromium and chromium/chromium-browser on PATH)",
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
]
LAUNCH_TIMEOUT_S = 30  # a launch takes 1-3 s; this only stops a hung browser from hanging the suite

# Runs inside the checker page once the framed page (and so every image in it) has loaded.
CHECKER = """<!DOCTYPE html><html><head><meta charset="utf-8"><title>checker</title></head><body>
<iframe id="page" src="{page}" style="width:1280px;height:900px"></iframe><pre id="result"></pre>
<script>
document.getElementById("page").addEventListener("load", () => {{
  const w = document.getElementById("page").contentWindow, d = w.document;
  const images = [...d.images];
  document.getElementById("result").textContent = JSON.stringify({{
    title: d.title,
    h1: d.querySelector("h1") ? d.querySelector("h1").textContent : null,
    rows: d.querySelectorAll("tbody tr").length,
    images: images.length,
    broken: images.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt),
    smallest: Math.min(...images.map(i => Math.min(i.naturalWidth, i.naturalHeight))),
    svgs: d.querySelectorAll("svg").length,
    fetched: w.performance.getEntriesByType("resource").map(e => e.name),
    width: d.documentElement.scrollWidth, height: d.documentElement.scrollHeight,
  }});
}});
</script></body></html>
"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requested: list[str] = []

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        type(self).requested.append(self.path)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A folder of pages on a loopback HTTP server: report.html (a run report with every section) and
    history.html (three runs), each with a checker page; yields (folder, base URL, requested paths)."""
    root = tmp_path_factory.mktemp("site")
    cands = [
        _candidate(
            "source_only", "source_only", "features", {"source_val_acc": 0.9, "im": 0.2, "bnm": 0.3}, False, 0.21
        ),
        _candidate("dann", "dann", "images", {"source_val_acc": 0.88, "im": 0.6, "bnm": 0.5}, False, 0.83, lr=0.001),
        _candidate("im", "im", "features", {"source_val_acc": 0.3, "im": 0.01, "bnm": 0.1}, True, 0.05),
    ]
    write_report(
        str(root / "report.html"),
        {
            "run_id": "browser-run",
            "summary": {"source images": 300, "target images": 200, "rejected": 3},
            "candidates": cands,
            "selection": {"index": 1, "reason": "best mean rank", "policy": ["source_val_acc", "im", "bnm"]},
            "metrics": {"source_test": _metrics(0), "target": _metrics(1)},
            "domain_gap": {
                "before": {"proxy_a_distance": 1.6, "mmd": 0.21},
                "after": {"proxy_a_distance": 0.4, "mmd": 0.03},
            },
            "embeddings": {
                "before": embed_2d(*_domains(0), max_points=30),
                "after": embed_2d(*_domains(1), max_points=30),
            },
            "curves": {c["name"]: [{"step": s, "loss": 2 / s} for s in range(1, 6)] for c in cands},
        },
    )
    store = str(root / "store")
    for s in SUMMARIES:
        storage.write_json(storage.join(store, "runs", s["run_id"], "summary.json"), s)
    shutil.copy(write_history(store), root / "history.html")
    for name in ("report", "history"):
        (root / f"check-{name}.html").write_text(CHECKER.format(page=f"{name}.html"))
    _QuietHandler.requested = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}", _QuietHandler.requested
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _chromium(tmp_path, *args: str) -> str:
    """Run headless Chromium with a throwaway profile and home; returns stdout."""
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    env = {**os.environ, "HOME": str(profile)}
    proc = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _rendered(tmp_path, url: str) -> dict:
    dom = _chromium(tmp_path, "--virtual-time-budget=5000", "--window-size=1400,1000", "--dump-dom", url)
    found = re.search(r'<pre id="result">(.*?)</pre>', dom, flags=re.S)
    assert found and found.group(1), f"the checker script did not run; DOM: {dom[:2000]}"
    return json.loads(html.unescape(found.group(1)))


def _assert_not_blank(png_path) -> None:
    img = np.asarray(Image.open(png_path).convert("L"), dtype=np.float64)
    assert img.shape == (1000, 1280)
    inked = (img < 200).mean()  # text, table rules, plot lines and fills on a white page
    assert 0.01 < inked < 0.9 and img.std() > 10, (inked, img.std())


@pytest.mark.parametrize(
    "name, title, rows, images",
    [
        # summary 3, candidates 3, per-class 3 x 2 splits, domain gap 2; PNGs: 2 confusions, t-SNE, curves
        ("report", "adaptflow run browser-run", 3 + 3 + 3 * 2 + 2, 4),
        ("history", "adaptflow run history", 3, 1),
    ],
)
def test_page_renders_in_chromium(site, tmp_path, name, title, rows, images):
    root, base, requested = site
    result = _rendered(tmp_path, f"{base}/check-{name}.html")
    assert result["title"] == title and result["h1"]
    assert result["rows"] == rows
    assert result["images"] == images and result["broken"] == [] and result["smallest"] > 100
    assert result["svgs"] == 0  # plots are PNGs, not inline SVG
    assert result["fetched"] == [], "the page loaded resources of its own"
    assert result["width"] <= 1300 and result["height"] > 600  # laid out in the frame's width, not collapsed
    served = {f"/{p}.html" for p in ("report", "history", "check-report", "check-history")} | {"/favicon.ico"}
    assert f"/{name}.html" in requested and set(requested) <= served, requested  # nothing else asked of the server

    shot = tmp_path / f"{name}.png"
    _chromium(tmp_path, "--window-size=1280,1000", f"--screenshot={shot}", f"{base}/{name}.html")
    _assert_not_blank(shot)
