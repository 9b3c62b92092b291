"""`python -m cli._api_server PORT`: Prefect's temporary API server for one adaptflow command.

What Prefect's own temporary server runs (uvicorn on Prefect's app factory, loopback only, no UI), plus a
watch on the command that started it: started in a session of its own, so that a terminal's Ctrl-C
cannot kill it under a run, it would otherwise outlive a command that was killed outright (SIGKILL).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

_POLL_S = 1.0
_STOP_GRACE_S = 5.0  # after SIGTERM, uvicorn's graceful shutdown gets this long


def _watch(parent: int) -> None:
    """Stop this server once the process that started it is gone (it is re-parented then)."""
    while os.getppid() == parent:
        time.sleep(_POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(_STOP_GRACE_S)
    os._exit(0)


def main(port: int) -> None:
    import uvicorn

    threading.Thread(target=_watch, args=(os.getppid(),), daemon=True, name="parent-watch").start()
    # Exits with status 3 when the port is taken: Prefect's start-up then tries another port.
    uvicorn.run(
        "prefect.server.api.server:create_app",
        factory=True,
        host="127.0.0.1",
        port=port,
        log_level="error",
        lifespan="on",
    )


if __name__ == "__main__":
    main(int(sys.argv[1]))
