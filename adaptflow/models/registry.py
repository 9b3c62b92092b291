"""The model registry: numbered, immutable model versions on the store, `champion` and `challenger`
aliases, and a promotion gate that moves them.

    {store}/registry/versions/{version:06d}.json   one ModelVersion each, written once, never changed
    {store}/registry/aliases.json                   alias -> version, and each alias's history
    {store}/registry/events/{time}-{id}.json        every promotion, rejection and rollback, with its reason

Version numbers are claimed with a create-only write (an exclusive hard link locally, `If-None-Match`
on S3, a lock in-process for memory://): two concurrent registrations never share a number, the loser
retries with the next one. The alias file is read, modified and rewritten whole (atomically on local
files, as one PUT on object stores): it assumes a **single writer** at a time, which a flow that gates
its own model, or a person at the command line, is. Events are one file each, so they never conflict.

`history[alias]` is a stack whose last entry is the alias's current version: `rollback` pops the
champion's stack and points the alias at the entry below.
"""

from __future__ import annotations

import functools
import hashlib
import json
import posixpath
import re
import subprocess
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from adaptflow.errors import ConfigError, StoreError, UnknownNameError
from adaptflow.manifests import Lineage, ModelVersion
from adaptflow.store import layout, storage

CHAMPION, CHALLENGER = "champion", "challenger"
ALIASES = (CHAMPION, CHALLENGER)
# Float sums like 0.43 + 0.01 land a hair off 0.44: a margin met "exactly" must count as met.
_TOLERANCE = 1e-9
_MAX_CLAIMS = 1000  # version numbers tried by one registration before giving up


class PromotionDecision(BaseModel):
    """What the gate (or a person) decided for `version`, against the champion of that moment."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    promoted: bool
    reason: str
    version: int
    champion_version: int | None  # the champion before the decision
    margin: float | None  # None for a manual promotion
    compared: dict  # metric, challenger and champion values, where the champion's metrics came from


class RegistryEvent(BaseModel):
    """One line of the registry's history: an alias moved (or, for a rejection, the champion stayed)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    at: str
    action: Literal["promoted", "rejected", "rolled_back"]
    version: int  # promoted/rejected: the version decided on; rolled_back: the restored champion
    champion_before: int | None
    champion_after: int | None
    reason: str
    compared: dict = {}


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The installed adaptflow version, plus `+g<commit>` when running from a git checkout of adaptflow.
    Never fails: outside git, or without a git executable, it is the version alone."""
    from importlib.metadata import PackageNotFoundError, version

    import adaptflow

    try:
        base = version("adaptflow")
    except PackageNotFoundError:
        base = adaptflow.__version__
    root = Path(adaptflow.__file__).resolve().parent.parent
    if not (root / ".git").exists():  # installed elsewhere: some other repository's commit would lie
        return base
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return base
    commit = done.stdout.strip()
    return f"{base}+g{commit}" if done.returncode == 0 and commit else base


def dataset_snapshot(fingerprints: Mapping[str, str]) -> str:
    """One hash for the image indexes a model saw: domain -> the ingest manifest's fingerprint."""
    return hashlib.sha256(json.dumps(dict(fingerprints), sort_keys=True).encode()).hexdigest()[:16]


def selection_score(scores: Mapping[str, float], policy: list[str]) -> float | None:
    """A label-free score comparable across runs: the mean of the policy's validator scores; None for an
    empty policy. (Selection within a run ranks candidates; ranks mean nothing across runs, the scores
    themselves do.) Pass only the validators that may judge the model (`monitor.champion.judged_by`)."""
    missing = [name for name in policy if name not in scores]
    if missing:
        raise StoreError(f"scores lack the policy's validators {', '.join(missing)}")
    return sum(float(scores[name]) for name in policy) / len(policy) if policy else None


def decide(
    challenger: ModelVersion | Mapping[str, float | None],
    champion: ModelVersion | Mapping[str, float | None] | None,
    margin: float,
) -> tuple[bool, str]:
    """Should `challenger` replace the champion? Yes when there is none. When both have target accuracy
    (target labels), the challenger must beat the champion's by at least `margin`; otherwise its
    selection score must. Pass the champion's metrics re-scored on the challenger's data where you can:
    stored metrics come from another run's data."""
    promoted, reason, _ = _compare(challenger, champion, margin)
    return promoted, reason


def _compare(challenger, champion, margin: float) -> tuple[bool, str, dict]:
    if margin < 0:
        raise ConfigError(f"the promotion margin must be >= 0, got {margin}")
    if champion is None:
        return True, "no champion yet", {}
    new, old = _metrics_of(challenger), _metrics_of(champion)
    labelled = new.get("target_accuracy") is not None and old.get("target_accuracy") is not None
    metric = "target_accuracy" if labelled else "selection_score"
    label = "target accuracy" if labelled else "selection score"
    a, b = new.get(metric), old.get(metric)
    compared = {"metric": metric, "challenger": a, "champion": b, "margin": margin}
    if a is None:
        return False, f"the challenger has no {label}", compared
    if b is None:
        return True, f"the champion has no {label}", compared
    promoted = a - (b + margin) >= -_TOLERANCE
    reason = f"{label} {_num(a)} {'>=' if promoted else '<'} champion {_num(b)} + margin {_num(margin)}"
    if not labelled:
        reason += " (no target accuracy for both)"
    return promoted, reason, compared


def _metrics_of(x: ModelVersion | Mapping[str, float | None]) -> Mapping[str, float | None]:
    return x.metrics if isinstance(x, ModelVersion) else x


def _num(x: float) -> str:
    return f"{x:.4g}"


def register(
    store: str, model_uri: str, run_id: str, lineage: Lineage, metrics: Mapping[str, float | None], method: str
) -> ModelVersion:
    """Record a model as the next version number (no alias yet: `gate` decides). Safe to call
    concurrently: each call claims its own number."""
    created_at = datetime.now(UTC).isoformat(timespec="seconds")
    version = max(_version_numbers(store), default=0) + 1
    for _ in range(_MAX_CLAIMS):
        try:
            mv = ModelVersion(
                version=version,
                model_uri=model_uri,
                run_id=run_id,
                created_at=created_at,
                lineage=lineage,
                metrics=dict(metrics),
                method=method,
            )
        except ValidationError as e:
            raise StoreError(f"cannot register {model_uri}: {_first_error(e)}") from None
        if storage.create_only(
            layout.version_uri(store, version), json.dumps(mv.model_dump(mode="json"), indent=2).encode()
        ):
            return mv
        version += 1
    raise StoreError(f"could not claim a version number in {layout.registry_uri(store)} after {_MAX_CLAIMS} tries")


def gate(
    store: str,
    version: int,
    champion_metrics: Mapping[str, float | None] | None,
    margin: float,
    challenger_metrics: Mapping[str, float | None] | None = None,
    hold: str | None = None,
) -> PromotionDecision:
    """Apply `decide` to `version` and move the aliases: promoted, it becomes champion (the previous one
    stays in the history for `rollback`); rejected, it becomes challenger. Records the event.
    `champion_metrics` are the champion's metrics re-scored on this run's data; None uses the metrics
    stored with the champion (or promotes at once when there is no champion). `challenger_metrics`, when
    given, stand in for the version's registered ones in the comparison (scored on the same validators as
    the champion's). `hold`, a reason, keeps the version from replacing a champion whatever its numbers;
    with no champion it is not promoted either."""
    candidate = get_version(store, version)
    state = _read_aliases(store)
    champion = state["aliases"].get(CHAMPION)
    if champion == version:
        return _already_champion(version, margin)
    baseline = None
    if champion is not None:
        baseline = champion_metrics if champion_metrics is not None else get_version(store, champion).metrics
    promoted, reason, compared = _compare(challenger_metrics or candidate, baseline, margin)
    if champion is not None:
        compared["champion_metrics"] = "rescored" if champion_metrics is not None else "stored"
    if hold:
        promoted, reason = False, hold
    decision = PromotionDecision(
        promoted=promoted, reason=reason, version=version, champion_version=champion, margin=margin, compared=compared
    )
    _point(state, CHAMPION if promoted else CHALLENGER, version)
    _write_aliases(store, state)
    _record(
        store,
        "promoted" if promoted else "rejected",
        version,
        champion,
        state["aliases"].get(CHAMPION),
        reason,
        compared,
    )
    return decision


def _already_champion(version: int, margin: float | None) -> PromotionDecision:
    return PromotionDecision(
        promoted=True,
        reason=f"v{version} is already the champion",
        version=version,
        champion_version=version,
        margin=margin,
        compared={},
    )


def promote(store: str, version: int, reason: str = "manual") -> PromotionDecision:
    """Make `version` the champion whatever its metrics (a person's decision). Recorded like the gate's."""
    get_version(store, version)  # it must exist
    state = _read_aliases(store)
    champion = state["aliases"].get(CHAMPION)
    if champion == version:
        return _already_champion(version, None)
    _point(state, CHAMPION, version)
    _write_aliases(store, state)
    _record(store, "promoted", version, champion, version, reason)
    return PromotionDecision(
        promoted=True, reason=reason, version=version, champion_version=champion, margin=None, compared={}
    )


def rollback(store: str, reason: str = "rollback") -> RegistryEvent:
    """Point `champion` back at the previous champion in its history; the event says from and to."""
    state = _read_aliases(store)
    stack = state["history"].get(CHAMPION, [])
    if len(stack) < 2:
        current = f"v{stack[-1]} is the only champion there has been" if stack else "there is no champion"
        raise StoreError(f"nothing to roll back to in {layout.registry_uri(store)}: {current}")
    before = stack.pop()
    state["aliases"][CHAMPION] = stack[-1]
    _write_aliases(store, state)
    return _record(store, "rolled_back", stack[-1], before, stack[-1], reason)


def resolve(store: str, ref: str | int) -> ModelVersion:
    """The version `ref` names: an alias (`champion`, `challenger`), a number, or `v3`."""
    if isinstance(ref, int) or re.fullmatch(r"[vV]?\d+", ref):
        return get_version(store, int(str(ref).lstrip("vV")))
    if ref not in ALIASES:
        raise UnknownNameError("alias name", ref, list(ALIASES))  # "alias names": the error adds an s
    version = aliases(store).get(ref)
    if version is None:
        registered = _version_numbers(store)
        if not registered:
            raise StoreError(f"no models registered in {layout.registry_uri(store)}")
        raise StoreError(f"no {ref} in {layout.registry_uri(store)} yet; registered versions: {_names(registered)}")
    return get_version(store, version)


def model_uri_for(store: str, model: str) -> str:
    """A model URI as given, or the URI of the registry entry it names (`champion`, `challenger`, `v3`, `3`)."""
    return resolve(store, model).model_uri if is_ref(model) else model


def is_ref(text: str) -> bool:
    """Whether `text` names a registry entry (alias, `3`, `v3`) rather than a model URI."""
    return text in ALIASES or re.fullmatch(r"[vV]\d+|\d+", text) is not None


def get_version(store: str, version: int) -> ModelVersion:
    uri = layout.version_uri(store, version)
    if not storage.exists(uri):
        registered = _version_numbers(store)
        if not registered:
            raise StoreError(f"no models registered in {layout.registry_uri(store)}")
        raise StoreError(f"no model version {version} in {layout.registry_uri(store)}; versions: {_names(registered)}")
    try:
        return _located(store, ModelVersion.load(uri))
    except ValidationError as e:
        raise StoreError(f"{uri} is not a model version: {_first_error(e)}") from None


def _located(store: str, mv: ModelVersion) -> ModelVersion:
    """`mv` with its model's URI as it is now. A version records the URI it was registered with; a store
    moved or copied elsewhere (another folder, object storage), or written through a path relative to
    another working directory, holds that model at the same place under its own root: `models/{run_id}`,
    `runs/{run_id}/...` or `training/{key}/{candidate}`, the layout `adaptflow.store.layout` gives models."""
    found = re.search(
        rf"(?:^|/)((?:models|runs)/{re.escape(mv.run_id)}(?:/.*)?|training/[0-9a-f]{{16}}/[^/]+)$", mv.model_uri
    )
    if found is None:
        return mv
    here = storage.join(store, found.group(1))
    if here == mv.model_uri or not storage.exists(storage.join(here, "model.json")):
        return mv
    return mv.model_copy(update={"model_uri": here})


def list_versions(store: str) -> list[ModelVersion]:
    """Every registered version, oldest first."""
    return [get_version(store, v) for v in _version_numbers(store)]


def aliases(store: str) -> dict[str, int]:
    return dict(_read_aliases(store)["aliases"])


def events(store: str) -> list[RegistryEvent]:
    """Every promotion, rejection and rollback, oldest first."""
    return [
        RegistryEvent.model_validate(storage.read_json(u))
        for u in storage.list_uris(storage.join(layout.registry_uri(store), "events"), ".json")
    ]


def _version_numbers(store: str) -> list[int]:
    names = (
        posixpath.basename(u) for u in storage.list_uris(storage.join(layout.registry_uri(store), "versions"), ".json")
    )
    return sorted(int(n[:-5]) for n in names if n[:-5].isdigit())


def _names(versions: list[int]) -> str:
    return ", ".join(f"v{v}" for v in versions)


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"


def _read_aliases(store: str) -> dict:
    uri = storage.join(layout.registry_uri(store), "aliases.json")
    if not storage.exists(uri):
        return {"aliases": {}, "history": {}}
    data = storage.read_json(uri)
    aliases = data.get("aliases", {}) if isinstance(data, dict) else None
    history = data.get("history", {}) if isinstance(data, dict) else None
    if (
        not isinstance(data, dict)
        or set(data) - {"aliases", "history"}
        or not isinstance(aliases, dict)
        or not isinstance(history, dict)
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in aliases.values())
        or not all(isinstance(h, list) and all(isinstance(v, int) for v in h) for h in history.values())
    ):
        raise StoreError(
            f'{uri} is not a registry\'s aliases file (expected {{"aliases": {{name: version number}}, '
            f'"history": {{name: [version numbers]}}}}); restore it from the events in '
            f"{storage.join(layout.registry_uri(store), 'events')} or remove it to start the aliases afresh"
        )
    return {"aliases": dict(aliases), "history": {k: list(v) for k, v in history.items()}}


def _write_aliases(store: str, state: dict) -> None:
    storage.write_json(storage.join(layout.registry_uri(store), "aliases.json"), state)


def _point(state: dict, alias: str, version: int) -> None:
    state["aliases"][alias] = version
    stack = state["history"].setdefault(alias, [])
    if not stack or stack[-1] != version:
        stack.append(version)
    if alias == CHAMPION and state["aliases"].get(CHALLENGER) == version:
        del state["aliases"][CHALLENGER]  # a challenger promoted is no longer challenging


def _record(
    store: str,
    action: str,
    version: int,
    before: int | None,
    after: int | None,
    reason: str,
    compared: dict | None = None,
) -> RegistryEvent:
    now = datetime.now(UTC)
    event = RegistryEvent(
        at=now.isoformat(timespec="microseconds"),
        action=action,
        version=version,
        champion_before=before,
        champion_after=after,
        reason=reason,
        compared=compared or {},
    )
    name = f"{now.strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:8]}.json"  # names sort by time
    storage.write_json(storage.join(layout.registry_uri(store), "events", name), event.model_dump(mode="json"))
    return event
