"""The monitor's memory between runs, kept in the store: what it measured of a champion, so that a night
whose data barely moved does not measure it again (`monitor.champion.score_champion`, `reference_mix`).

    {store}/monitor/scores/{key}.json      the champion's scores, and the samples they were measured on
    {store}/monitor/seen/{key}.json        its scores on two datasets (by fingerprint) scored before
    {store}/monitor/reference/{key}.json   its predicted class mix on its own target images
    {store}/monitor/tests/{key}.json       the image shift test of a target against its reference images
    {store}/monitor/samples/{key}.npz      the embeddings of a champion's reference sample for that test

A key hashes what the numbers depend on (the model, the features, the policy, the seed, the sample size).
A record that is missing, unreadable or from another key is measured again: nothing here is needed.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
from pydantic import ValidationError

from adaptflow.errors import StoreError, StoreUnavailableError
from adaptflow.manifests import ModelScores, ShiftTest
from adaptflow.store import storage


def key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def scores(store: str, key: str, source_ids: list[str], target_ids: list[str], reuse: float) -> ModelScores | None:
    """The scores kept under `key` if they were measured on these source samples and on at least `reuse` of
    this target sample (its share recorded in `ModelScores.reused`); else None."""
    record = _read(storage.join(store, "monitor", "scores", f"{key}.json"))
    if record is None or record.get("source") != _hash(source_ids) or not target_ids:
        return None
    measured = set(record.get("target") or [])
    share = sum(d in measured for d in _digests(target_ids)) / len(target_ids)
    if share < reuse:
        return None
    try:
        kept = ModelScores.model_validate(record["scores"])
    except (KeyError, ValidationError):
        return None
    return kept.model_copy(update={"reused": round(share, 4)})


def keep_scores(store: str, key: str, scores: ModelScores, source_ids: list[str], target_ids: list[str]) -> None:
    storage.write_json(
        storage.join(store, "monitor", "scores", f"{key}.json"),
        {"scores": scores.model_dump(mode="json"), "source": _hash(source_ids), "target": _digests(target_ids)},
    )


def seen(store: str, key: str) -> ModelScores | None:
    """The scores kept under `key` for the very datasets of this run (`keep_seen`)."""
    record = _read(storage.join(store, "monitor", "seen", f"{key}.json"))
    try:
        return ModelScores.model_validate(record["scores"]) if record else None
    except (KeyError, ValidationError):
        return None


def keep_seen(store: str, key: str, scores: ModelScores) -> None:
    storage.write_json(
        storage.join(store, "monitor", "seen", f"{key}.json"), {"scores": scores.model_dump(mode="json")}
    )


def reference_mix(store: str, key: str) -> tuple[list[float], int] | None:
    record = _read(storage.join(store, "monitor", "reference", f"{key}.json"))
    try:
        return ([float(v) for v in record["shares"]], int(record["n"])) if record else None
    except (KeyError, TypeError, ValueError):
        return None


def keep_reference_mix(store: str, key: str, mix: tuple[list[float], int]) -> None:
    storage.write_json(storage.join(store, "monitor", "reference", f"{key}.json"), {"shares": mix[0], "n": mix[1]})


def image_test(store: str, key: str) -> tuple[ShiftTest | None, float | None, int | None, str | None] | None:
    """The shift test kept under `key` (`monitor.shift`: test, domain AUC, new images, why untested)."""
    record = _read(storage.join(store, "monitor", "tests", f"{key}.json"))
    try:
        test = None if record["test"] is None else ShiftTest.model_validate(record["test"])
        return test, record["auc"], record["n_new"], record["untested"]
    except (KeyError, TypeError, ValidationError):
        return None


def keep_image_test(
    store: str, key: str, outcome: tuple[ShiftTest | None, float | None, int | None, str | None]
) -> None:
    test, auc, n_new, untested = outcome
    storage.write_json(
        storage.join(store, "monitor", "tests", f"{key}.json"),
        {"test": test and test.model_dump(mode="json"), "auc": auc, "n_new": n_new, "untested": untested},
    )


def reference_features(store: str, key: str) -> np.ndarray | None:
    """The (n, D) reference embeddings kept under `key` (`keep_reference_features`)."""
    uri = storage.join(store, "monitor", "samples", f"{key}.npz")
    try:
        with np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False) as found:
            x = found["embeddings"]
    except StoreUnavailableError:
        raise
    except (StoreError, ValueError, OSError, EOFError, KeyError):
        return None
    return x.astype(np.float32) if x.ndim == 2 else None


def keep_reference_features(store: str, key: str, x: np.ndarray) -> None:
    """Kept compressed, in float16 where that loses nothing (the feature store keeps float16 embeddings): at
    most 1.3 MB for 500 embeddings of 1,280, less where they compress as the shards do."""
    half = x.astype(np.float16)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, embeddings=half if np.array_equal(half.astype(x.dtype), x) else x)
    storage.write_bytes(storage.join(store, "monitor", "samples", f"{key}.npz"), buffer.getvalue())


def _read(uri: str) -> dict | None:
    """The record at `uri`; None when there is none, or one that is not JSON."""
    try:
        record = storage.read_json(uri)
    except StoreUnavailableError:
        raise
    except StoreError:
        return None
    return record if isinstance(record, dict) else None


def _hash(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def _digests(ids: list[str]) -> list[str]:
    """8 bytes per image id: enough to tell 2,000 images apart, a fraction of the ids' size."""
    return [hashlib.blake2b(i.encode(), digest_size=8).hexdigest() for i in ids]
