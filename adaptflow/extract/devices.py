"""The torch device every computing stage runs on."""

from __future__ import annotations

from adaptflow.errors import ConfigError


def resolve_device(name: str):
    """The torch device a setting names (`extract.device`: auto, cpu, cuda, cuda:1, ...); auto picks CUDA when
    there is one. Every stage that computes (extraction, training, prediction) runs where this says."""
    import torch  # here, not at the top: the command line's --help must not load torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"extract.device is {name!r} but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)
