"""Store credentials from a Prefect Secret block, for workers whose environment holds none.

Called at the start of a flow, in the flow's process: the variables reach its threads (the default task
runner). Dask workers are other processes: give them credentials in their own environment.
"""

import json
import os

from prefect.blocks.system import Secret

from adaptflow.errors import ConfigError

ALLOWED = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
)


def use_credentials(block: str | None) -> None:
    """Export the block's variables to this process's environment; nothing when `block` is None. The
    values are never returned, logged or persisted: this is a plain function, not a task."""
    if not block:
        return
    try:
        value = Secret.load(block).get()
    except ValueError:
        raise ConfigError(
            f"runtime.credentials_block: no Secret block named {block!r} on the Prefect server "
            "(create one with prefect.blocks.system.Secret(value={...}).save(name))"
        ) from None
    try:
        data = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict) or not data or not set(data) <= set(ALLOWED):
        raise ConfigError(
            f"runtime.credentials_block {block!r} must hold a JSON object whose keys are among {', '.join(ALLOWED)}"
        )
    os.environ.update({k: str(v) for k, v in data.items()})
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # filesystems made before this saw other credentials
