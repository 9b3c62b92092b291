"""Prefect flows: wiring only. Each reads as the list of its stages.

Each entry flow (`retrain`, `extract`, `predict`: what the command line calls and `prefect.yaml` deploys)
validates its config and runs its stages as a subflow on the task runner, and within the time limits,
that `config.runtime` names: a deployment's run gets its config only as a parameter, after its own flow
has started."""

import adaptflow  # noqa: F401  first: it chooses Arrow's allocator before pyarrow loads
