"""Every name a config gives, checked by the registry that resolves it (as timm's `_registry.py` resolves
a model name): backbones, algorithms and methods, hyperparameters, validators.

`adaptflow.config` only parses: it holds the settings' types and ranges and imports no stage, so it sits
below every stage folder. This module sits above them and is called where a run starts: by the CLI after it
has checked the inputs, and by each flow on its first line, so a deployment given a bad name fails before
any work, with every bad name listed at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from adaptflow.adapt.algorithms import check_hparam, check_method, get_algorithm
from adaptflow.adapt.validators import get_validator
from adaptflow.config import Config
from adaptflow.errors import ConfigError, UnknownNameError
from adaptflow.extract.backbones import backbone_spec


def _named(cfg: Config) -> Iterable[tuple[str, list[str], Callable[[str], object]]]:
    """(setting, the names it gives, the registry lookup that resolves each)."""
    a = cfg.adapt
    yield "backbone.name", [cfg.backbone.name], backbone_spec
    yield "adapt.method", [a.method], check_method
    yield "adapt.methods", a.methods, get_algorithm
    yield "adapt.image_methods", a.image_methods or [], get_algorithm
    yield "adapt.hparams", list(a.hparams), check_hparam
    yield "adapt.policy", a.policy, get_validator
    yield "promotion.policy", cfg.promotion.policy, get_validator


def check_names(cfg: Config) -> Config:
    """`cfg` if every name in it resolves; else one ConfigError listing each bad one with the valid names."""
    problems = []
    for setting, names, resolve in _named(cfg):
        for name in names:
            try:
                resolve(name)
            except UnknownNameError as e:
                problems.append(f"  {setting}: {e} (got {name!r})")
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(problems))
    return cfg
