"""Prefect's API for one command: the server PREFECT_API_URL names, or a temporary one this command
starts and stops (Prefect's "ephemeral" mode, SQLite in PREFECT_HOME).

The temporary server is adaptflow's own start of Prefect's, with two differences that matter on a
terminal and on a busy machine:
- it runs in a session of its own: a terminal's Ctrl-C goes to the whole process group and used to kill
  the server under the run, which then retried a dead socket every 7 s instead of stopping. It stops with
  the command, or by itself once the command is gone (`cli._api_server`).
- a fresh database is migrated first, once, with no time limit (12 s measured on a busy 2-core machine),
  and the server's own start-up then waits up to PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, 120 s
  unless set (Prefect's default of 20 s was too short for a fresh start there: 13-17 s measured). When it
  still does not start, the error says what to do.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adaptflow.errors import ApiUnavailableError

STARTUP_TIMEOUT_S = 120
_HINT = (
    "wait for the machine to be less busy and rerun, raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, "
    "or start a server once (`prefect server start`) and set PREFECT_API_URL to it"
)


def configure_environment(quiet: bool = False) -> None:
    """Prefect settings for a command-line run, set before Prefect is imported; the user's own win. Quiet:
    Prefect's console shows warnings and errors only (its logs still reach the API in full)."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if quiet:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    # The ephemeral API's telemetry service races the run for its SQLite file ("database is locked").
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@contextmanager
def prefect_api() -> Iterator[None]:
    """Make sure a Prefect API is there for the duration: PREFECT_API_URL's, or a temporary server."""
    import prefect  # noqa: F401  (its console logging is set up on import)
    from prefect.settings import get_current_settings

    from cli.output import skip_user_errors_on_console

    skip_user_errors_on_console()
    settings = get_current_settings()
    if settings.api.url:
        _check_answers(settings.api.url)
        yield
        return
    if _running_server() is not None:  # started earlier in this process (a test's harness, say): theirs to stop
        yield
        return
    if not settings.server.ephemeral.enabled:
        raise ApiUnavailableError(
            "no Prefect API: set PREFECT_API_URL to a running server (`prefect server start`)"
            ", or allow a temporary one with PREFECT_SERVER_ALLOW_EPHEMERAL_MODE=true"
        )
    ephemeral = settings.server.ephemeral
    timeout = (
        ephemeral.startup_timeout_seconds
        if "startup_timeout_seconds" in ephemeral.model_fields_set
        else STARTUP_TIMEOUT_S
    )
    _migrate_fresh_database(settings)
    server = _detached_server()
    try:
        server.start(timeout=timeout)
    except Exception:
        server.stop()
        raise ApiUnavailableError(f"Prefect's temporary API server did not start within {timeout} s; {_HINT}") from None
    try:
        yield
    finally:
        _send_what_is_queued()
        server.stop()


def _send_what_is_queued() -> None:
    """Send the logs and events still queued for the API while the temporary server is there to take them.
    A run's last logs (its "Finished in state" lines) wait in a batch for up to 2 s; sent after the stop,
    they were lost, with "Error logging to API" on stderr and up to a minute of the client's retries."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=10)


def _check_answers(api_url: str) -> None:
    """The server PREFECT_API_URL names must answer (any HTTP answer will do: Cloud asks for a key)."""
    import httpx

    try:
        httpx.get(f"{api_url.rstrip('/')}/health", timeout=10)
    except httpx.HTTPError as e:
        raise ApiUnavailableError(
            f"the Prefect API at {api_url} (PREFECT_API_URL) does not answer ({e}); start "
            "it (`prefect server start`), or unset PREFECT_API_URL for a temporary one"
        ) from None


def stop_now() -> None:
    """Ask the temporary server to stop without waiting for it (the command is exiting at once)."""
    server = _running_server()
    if server is not None and server.server_process is not None:
        server.server_process.terminate()


def _running_server():
    if "prefect.server.api.server" not in sys.modules:  # never imported: nothing was started
        return None
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer._instances.get(None)
    return server if server is not None and server.running else None


def _migrate_fresh_database(settings) -> None:
    """A SQLite database that does not exist yet is created and migrated here, outside the start-up wait."""
    url = settings.server.database.connection_url
    url = url.get_secret_value() if url is not None else ""
    if not url.startswith("sqlite") or ":///" not in url:
        return
    path = url.split(":///", 1)[1]
    if path in ("", ":memory:") or Path(path).exists():
        return
    print("preparing Prefect's database (first run on this PREFECT_HOME) ...", file=sys.stderr, flush=True)
    done = subprocess.run(
        [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"], capture_output=True, text=True
    )
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ApiUnavailableError(f"could not create Prefect's database at {path}: {last[0]}")


def _detached_server():
    """Prefect's temporary server object, registered where Prefect's clients look for it (one per process,
    keyed by port None), whose process is `cli._api_server` in a session of its own."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class DetachedServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            # The environment Prefect gives its own server: no UI, services for an ephemeral server.
            env = {
                **os.environ,
                "PREFECT_UI_ENABLED": "0",
                "PREFECT__SERVER_EPHEMERAL": "1",
                "PREFECT__SERVER_FINAL": "1",
                **get_current_settings().to_environment_variables(exclude_unset=True),
            }
            return subprocess.Popen(
                [sys.executable, "-m", "cli._api_server", str(self.port)], env=env, start_new_session=True
            )

    SubprocessASGIServer._instances.pop(None, None)  # one that never started, or was stopped
    return DetachedServer()
