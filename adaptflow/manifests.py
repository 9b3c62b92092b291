"""The small typed records that travel between stages. Data stays in the store; these carry URIs,
counts and fingerprints. Each is frozen and JSON-serialisable, and each output folder's manifest is
written last, as its commit."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from adaptflow import storage
from adaptflow.accounting import Work
from adaptflow.errors import StoreError

SCHEMA_VERSION = 1


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    schema_version: int = SCHEMA_VERSION
    work: Work | None = None  # set by the task that produced it (tasks._work.measured)

    def commit(self, uri: str) -> None:
        """Write this manifest to `uri`; call it after every file it names is written."""
        storage.write_json(uri, self.model_dump(mode="json"))

    @classmethod
    def load(cls, uri: str):
        data = storage.read_json(uri)
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{uri} has schema version {version}, this adaptflow reads version {SCHEMA_VERSION}; "
                "use a new store or the adaptflow release that wrote it"
            )
        return cls.model_validate(data)


class IngestManifest(Manifest):
    """One ingested dataset: `index_uri` lists valid images, `rejects_uri` the refused files."""

    domain: str  # "source", "target" or "target_labels"
    dataset_uri: str
    index_uri: str
    rejects_uri: str
    n_images: int
    n_rejected: int
    classes: list[str]  # sorted; empty for unlabeled data
    fingerprint: str  # hash of the sorted (image_id, label, split) rows: the dataset snapshot
    seconds: float
    bytes_read: int = 0  # every file read while validating
    bytes_written: int = 0  # index and rejects
