"""`adaptflow models`: the registry from the command line: list its versions, export one for serving, promote
one to champion by hand, or roll the champion back. Each change of the champion is mirrored to MLflow when
MLFLOW_TRACKING_URI is set."""

from __future__ import annotations

import argparse
import sys

from adaptflow import progress
from cli.output import print_json


def cmd_models_list(args: argparse.Namespace) -> int:
    from adaptflow.models import registry
    from adaptflow.report.tables import fmt
    from adaptflow.store import layout

    versions = registry.list_versions(args.store)
    if args.json:
        from adaptflow.serve.export import list_exports

        exports = list_exports(args.store)
        print_json(
            {
                "registry": layout.registry_uri(args.store),
                "aliases": registry.aliases(args.store),
                "versions": [
                    {
                        **v.model_dump(mode="json", exclude={"schema_version", "work"}),
                        "aliases": sorted(a for a, n in registry.aliases(args.store).items() if n == v.version),
                        "exports": [
                            e.model_dump(mode="json", exclude={"schema_version", "work"})
                            for e in exports
                            if e.version == v.version
                        ],
                    }
                    for v in versions
                ],
            }
        )
        return 0
    if not versions:
        print(f"no models registered in {layout.registry_uri(args.store)}")
        return 0
    named: dict[int, list[str]] = {}
    for alias, version in sorted(registry.aliases(args.store).items()):
        named.setdefault(version, []).append(alias)
    print(f"{'version':<9}{'aliases':<21}{'created':<27}{'method':<18}{'selection':>10}{'target acc':>12}  run id")
    for v in versions:
        score, accuracy = (fmt(v.metrics.get(k), missing="-") for k in ("selection_score", "target_accuracy"))
        print(
            f"{'v' + str(v.version):<9}{','.join(named.get(v.version, [])) or '-':<21}{v.created_at:<27}"
            f"{v.method:<18}{score:>10}{accuracy:>12}  {v.run_id}"
        )
    return 0


def cmd_models_export(args: argparse.Namespace) -> int:
    import posixpath

    from adaptflow.serve.export import export_registered
    from adaptflow.store import storage

    out = storage.absolute(args.out)
    storage.check_writable(posixpath.dirname(out))
    with progress.task(f"export {args.model} to {args.format}"):
        manifest = export_registered(args.store, args.model, out, args.format)
    if args.json:
        print_json(manifest.model_dump(mode="json", exclude={"schema_version", "work"}))
        return 0
    source = f"v{manifest.version}" if manifest.version is not None else manifest.model_uri
    print(
        f"exported {source} ({manifest.kind} model, {manifest.method}, {len(manifest.classes)} classes, "
        f"{manifest.input_size} px) as {manifest.format}: {manifest.bytes / 1e6:.1f} MB; probabilities within "
        f"{manifest.max_abs_diff:.1e} of the model; metadata in {manifest.metadata_uri}"
    )
    print(manifest.uri)
    return 0


def cmd_models_promote(args: argparse.Namespace) -> int:
    from adaptflow.models import registry

    version = registry.resolve(args.store, args.version).version
    decision = registry.promote(args.store, version, reason=args.reason)
    before = f"v{decision.champion_version}" if decision.champion_version is not None else "none"
    print(f"champion: {before} -> v{decision.version} ({decision.reason})")
    _mirror_to_mlflow(args.store)
    return 0


def cmd_models_rollback(args: argparse.Namespace) -> int:
    from adaptflow.models import registry

    event = registry.rollback(args.store, reason=args.reason)
    print(f"champion: v{event.champion_before} -> v{event.champion_after} ({event.reason})")
    _mirror_to_mlflow(args.store)
    return 0


def _mirror_to_mlflow(store: str) -> None:
    """With MLFLOW_TRACKING_URI set, point MLflow's aliases where the registry now points them. The registry
    has changed already: MLflow being away is a warning (the next tracked run mirrors them again)."""
    import os

    from adaptflow.report import tracking

    if not os.environ.get(tracking.ENV):
        return
    from adaptflow.config import TrackingConfig
    from adaptflow.models import registry

    try:
        mirrored = tracking.sync_aliases(store, TrackingConfig()) or {}
    except Exception as e:  # noqa: BLE001 - a mirror must not turn a done promotion into a failure
        print(
            f"warning: MLflow aliases not mirrored ({type(e).__name__}: {tracking.redact(str(e))[:200]})",
            file=sys.stderr,
        )
        return
    ours = registry.aliases(store)
    print("MLflow aliases mirrored: " + (", ".join(f"{a} -> v{ours[a]}" for a in sorted(mirrored)) or "none"))
