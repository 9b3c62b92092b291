"""adaptflow: transfer learning and domain adaptation for image classifiers.

This package is the Prefect-free library. `tasks/` wraps it in Prefect tasks, `flows/` wires the
tasks, and `cli/` is the command line.
"""

from adaptflow.errors import AdaptflowError

__all__ = ["DEFAULT_STORE", "AdaptflowError"]
__version__ = "0.1.0"

DEFAULT_STORE = "adaptflow-store"  # the store when none is named: a folder in the working directory
