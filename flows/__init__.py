"""Prefect flows: wiring only. Each reads as the list of its stages.

Each entry flow (`retrain`, `extract`, `predict`: what the command line calls and `prefect.yaml` deploys)
validates its config and runs its stages as a subflow on the task runner, and within the time limits,
that `config.runtime` names: a deployment's run gets its config only as a parameter, after its own flow
has started."""

import os

# Arrow allocates through malloc, which `tasks._work.release_memory` trims after each task (its
# `bound_allocators` says why); Arrow reads this when pyarrow loads, so it is set before anything imports it.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
