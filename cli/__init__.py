"""The adaptflow command line."""

import os

# Arrow allocates through malloc, which `tasks._work.release_memory` trims after each task (its
# `bound_allocators` says why); Arrow reads this when pyarrow loads, so it is set before anything imports it.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
