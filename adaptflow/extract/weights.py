"""Reading weights files from any fsspec URI: safetensors, or torch files loaded with weights_only."""

from __future__ import annotations

import functools
import hashlib
import io
import posixpath
from collections.abc import Callable, Mapping
from typing import Any

import torch

from adaptflow.errors import AdaptflowError
from adaptflow.store import storage


def file_stamp(uri: str) -> tuple[int, str]:
    """(size, modification time) of a weights file: a changed file means a new build and a new hash."""
    info = storage.info(uri)
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or info.get("ETag")
    return int(info.get("size") or 0), str(mtime)


@functools.lru_cache(maxsize=32)
def file_sha256(uri: str, size: int, mtime: str) -> str:
    h = hashlib.sha256()
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _read_safetensors(data: bytes) -> Any:
    from safetensors.torch import load

    return load(data)


def _read_torch(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


_READERS: dict[str, Callable[[bytes], Any]] = {
    ".safetensors": _read_safetensors,
    ".pth": _read_torch,
    ".pt": _read_torch,
    ".bin": _read_torch,
}


def read_state_dict(uri: str, name: str) -> dict[str, torch.Tensor]:
    suffix = posixpath.splitext(uri)[1].lower()
    if suffix not in _READERS:
        raise AdaptflowError(
            f"backbone {name!r}: cannot read weights {uri}: expected a file ending in {', '.join(_READERS)}"
        )
    try:
        obj = _READERS[suffix](storage.read_bytes(uri))
    except Exception as e:  # a corrupt file may raise anything from pickle, zip or safetensors
        raise AdaptflowError(f"backbone {name!r}: cannot read weights {uri}: {e}") from None
    for wrapper in ("state_dict", "model"):  # training checkpoints keep the weights one level down
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise AdaptflowError(f"backbone {name!r}: {uri} does not hold a state dict of tensors")
    state_dict = dict(obj)
    if state_dict and all(k.startswith("module.") for k in state_dict):  # saved from DataParallel
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    return state_dict
