"""adaptflow: transfer learning and domain adaptation for image classifiers.

This package is the Prefect-free library. `tasks/` wraps it in Prefect tasks, `flows/` wires the
tasks, and `cli/` is the command line.
"""

import os

# Arrow allocates through malloc, which `tasks._work.release_memory` trims after each task (`bound_allocators`
# says why). Arrow reads this when pyarrow loads, so it is set here, before any of the package imports pyarrow;
# a user's own setting stands.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

from adaptflow.errors import AdaptflowError  # noqa: E402

__all__ = ["DEFAULT_STORE", "AdaptflowError"]
__version__ = "0.1.0"

DEFAULT_STORE = "adaptflow-store"  # the store when none is named: a folder in the working directory
