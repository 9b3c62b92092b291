"""Training checkpoints in the store: enough to resume a candidate exactly where it stopped.

    {folder}/state.safetensors   the algorithm's weights and buffers, and every optimizer tensor
    {folder}/checkpoint.json     the step, the optimizer's and scheduler's other state; written last

Everything is tensors in safetensors plus JSON: nothing read back is unpickled. With the training
loop's per-step seeding (`adapt.train`), resuming at step k gives the model an uninterrupted run gives.
"""

from __future__ import annotations

from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from adaptflow.adapt.contract import Algorithm
from adaptflow.errors import StoreError
from adaptflow.store import storage

_MODEL, _OPTIMIZER = "model.", "optimizer."


def save_checkpoint(folder: str, algorithm: Algorithm, step: int) -> None:
    """The algorithm after `step` updates (its optimizer and scheduler included), tensors first."""
    optimizer = algorithm.configure_optimizer()
    tensors = {_MODEL + k: v.detach().cpu().contiguous() for k, v in algorithm.state_dict().items()}
    opt = optimizer.state_dict()
    state_meta: dict[str, dict] = {}
    for index, values in opt["state"].items():
        state_meta[str(index)] = {}
        for name, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"{_OPTIMIZER}{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                state_meta[str(index)][name] = value
    scheduler = {k: v for k, v in algorithm.scheduler.state_dict().items() if k != "lr_lambdas"}
    storage.write_bytes(storage.join(folder, "state.safetensors"), save_safetensors(tensors))
    storage.write_json(
        storage.join(folder, "checkpoint.json"),
        {"step": step, "param_groups": opt["param_groups"], "state": state_meta, "scheduler": scheduler},
    )


def checkpoint_step(folder: str) -> int | None:
    """The step a committed checkpoint under `folder` holds; None when there is none."""
    uri = storage.join(folder, "checkpoint.json")
    return int(storage.read_json(uri)["step"]) if storage.exists(uri) else None


def load_checkpoint(folder: str, algorithm: Algorithm) -> int:
    """Restore `algorithm` (built as it was: same method, hyperparameters, featurizer) from `folder`;
    returns the step it stopped at."""
    meta = storage.read_json(storage.join(folder, "checkpoint.json"))
    tensors = load_safetensors(storage.read_bytes(storage.join(folder, "state.safetensors")))
    try:
        algorithm.load_state_dict({k[len(_MODEL) :]: v for k, v in tensors.items() if k.startswith(_MODEL)})
    except RuntimeError as e:
        raise StoreError(f"the checkpoint at {folder} does not fit this candidate: {str(e).splitlines()[0]}") from None
    optimizer = algorithm.configure_optimizer()
    state: dict[int, dict] = {int(i): dict(values) for i, values in meta["state"].items()}
    for key, value in tensors.items():
        if key.startswith(_OPTIMIZER):
            index, name = key[len(_OPTIMIZER) :].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    device = next(algorithm.parameters()).device
    state = {i: {k: v.to(device) if isinstance(v, Tensor) else v for k, v in s.items()} for i, s in state.items()}
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    algorithm.scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    return int(meta["step"])
