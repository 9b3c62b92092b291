"""The `adaptflow` command: run, demo, extract, predict, models, backbones.

Exit status: 0 done; 2 an error in the input (a bad config, a missing dataset, a store that cannot be
written, a damaged model), printed as one `error:` line; 3 the infrastructure failed after its retries (a
store unreachable, Prefect's API not starting, a time limit reached), one `error:` line too; 130
interrupted (Ctrl-C): committed work is kept, and the same command resumes. Nothing a user did wrong
ends in a traceback.

Before a command runs, only the standard library and adaptflow's error classes are imported (no torch,
Prefect, pyarrow or fsspec), so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import textwrap
from typing import TYPE_CHECKING

from adaptflow import DEFAULT_STORE
from adaptflow.errors import AdaptflowError, DatasetError, TransientError
from cli import interrupt, prefect_api
from cli.models import cmd_models_export, cmd_models_list, cmd_models_promote, cmd_models_rollback
from cli.output import UserErrorRecords, print_json, progress_on_stderr

if TYPE_CHECKING:
    from adaptflow.config import Config

# The demo runs at 64 px, where EfficientNet-Lite0 embeds a few hundred images/s on 2 cores.
DEMO_SETTINGS = ["backbone.image_size=64", "extract.batch_size=128"]
TIMED_OUT = TransientError.exit_code


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet = getattr(args, "quiet", None)  # None: a short command, with no progress to show
    prefect_api.configure_environment(quiet=bool(quiet))
    for name in ("prefect.flow_runs", "prefect.task_runs", "prefect.flow_engine", "prefect.task_engine"):
        logging.getLogger(name).addFilter(UserErrorRecords())
    with interrupt.interruptible(prefect_api.stop_now), progress_on_stderr(quiet is False):
        try:
            return args.command(args)
        except AdaptflowError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        except TimeoutError as e:  # Prefect's FlowRunTimeoutError or TaskRunTimeoutError
            print(f"error: {_timed_out(e, args)}", file=sys.stderr)
            return TIMED_OUT
        except KeyboardInterrupt:
            interrupt.announce()
            interrupt.exit_now(prefect_api.stop_now)


def _timed_out(e: TimeoutError, args: argparse.Namespace | None = None) -> str:
    """The timeout's line, naming the setting and its value: the one in Prefect's message, else the command's
    config's (the message names the limit of the flow that raised it: "None" when an outer flow re-raised it)."""
    setting = {"FlowRunTimeoutError": "flow_timeout_s", "TaskRunTimeoutError": "task_timeout_s"}.get(type(e).__name__)
    which = {
        "flow_timeout_s": "the run took longer than runtime.flow_timeout_s",
        "task_timeout_s": "a task took longer than runtime.task_timeout_s",
    }.get(setting, "timed out")
    found = re.search(r"timeout of ([0-9.]+) second", str(e))
    limit = float(found[1]) if found else _configured(args, setting) if setting and args is not None else None
    return f"{which}{f' ({limit:g} s)' if limit else ''}; committed work is kept, rerun the same command to resume"


def _configured(args: argparse.Namespace | None, setting: str) -> float | None:
    """runtime.`setting` as the command's --config and --set made it; None when it has none."""
    from adaptflow.config import load_config

    try:
        return getattr(load_config(getattr(args, "config", None), getattr(args, "set", None) or []).runtime, setting)
    except (AdaptflowError, AttributeError):
        return None


def _check_inputs(
    *datasets: str | None, store: str | None = None, cfg: Config | None = None, weights: bool = True
) -> None:
    """Fail in a second, before Prefect starts, on what would fail later anyway: missing datasets first,
    then a store that cannot be written (checking it creates its folder), then the names `cfg` gives
    (`adaptflow.names`: this loads the stages, seconds on a busy machine), then with `weights` its
    backbone's weights file, if one is given and missing."""
    from adaptflow.store import storage

    for uri in datasets:
        if uri and not storage.exists(uri):
            raise DatasetError(f"dataset not found: {uri}")
    if store is not None:
        storage.check_writable(store)
    if cfg is None:
        return
    from adaptflow.names import check_names

    check_names(cfg)
    if weights:
        from adaptflow.extract.backbones import weights_uri

        weights_uri(cfg.backbone)


def _overrides(args: argparse.Namespace) -> list[str]:
    """The command's --set overrides, then the settings its own flags stand for (the flags win)."""
    flags = [f"adapt.method={args.method}"] if getattr(args, "method", None) else []
    return [*args.set, *flags, *(["ingest.rehash=true"] if args.rehash else [])]


def cmd_run(args: argparse.Namespace) -> int:
    from adaptflow.config import load_config

    cfg = load_config(args.config, _overrides(args))
    labels, train_labels = args.target_labels, args.target_train_labels
    _check_inputs(args.source, args.target, labels, train_labels, store=args.store, cfg=cfg)
    run = _retrain(args.source, args.target, labels, args.store, cfg, not args.json, train_labels)
    if args.json:
        from adaptflow.store import storage

        print_json(storage.read_json(storage.join(run, "summary.json")))
    else:
        print(run)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from adaptflow.config import load_config
    from adaptflow.data.demo import make_demo_data
    from adaptflow.store import storage

    cfg = load_config(args.config, [*DEMO_SETTINGS, *_overrides(args)])
    _check_inputs(store=args.store, cfg=cfg)
    with prefect_api.prefect_api():  # one API for every run of the command
        if args.nightly:
            return _nightly_demo(args.store, cfg)
        demo = make_demo_data(storage.join(args.store, "demo-data"), seed=cfg.seed)
        print(
            f"demo data: source {demo.source_uri} (class folders, grey digits), "
            f"target {demo.target_uri} (flat folder, digits on colour photos)"
        )
        run = _retrain(demo.source_uri, demo.target_uri, demo.target_labels_uri, args.store, cfg)
    print(run)
    return 0


def _nightly_demo(store: str, cfg) -> int:
    """Three scheduled-style runs on one store, as a cron deployment would make them."""
    from adaptflow.data.demo import make_nightly_batches
    from adaptflow.models import registry
    from adaptflow.report.records import RunSummary
    from adaptflow.report.tables import headline
    from adaptflow.store import storage

    demo = make_nightly_batches(storage.join(store, "nightly-data"), seed=cfg.seed)
    print(f"nightly demo: source {demo.source_uri}; nights 1-2 from the MNIST-M-style camera, night 3 from a new one")
    for name, images, labels in demo.batches:
        print(f"\n=== {name}: {images}")
        run = _retrain(demo.source_uri, images, labels, store, cfg)
        summary = RunSummary.load(storage.join(run, "summary.json"))
        print(f"{name}: " + " | ".join(headline(summary)))
        print(run)
    print(f"\nchampion: v{registry.aliases(store).get('champion')}; history: {storage.join(store, 'history.html')}")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from adaptflow.config import load_config

    cfg = load_config(args.config, _overrides(args))
    _check_inputs(*args.images, store=args.store, cfg=cfg)
    from flows.extract import backfill  # Prefect loads only once the inputs are known good

    with prefect_api.prefect_api():
        print(backfill(args.images, args.store, cfg))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import posixpath

    from adaptflow.adapt.inference import load_model
    from adaptflow.config import load_config
    from adaptflow.models.registry import model_uri_for
    from adaptflow.store import storage

    cfg = load_config(args.config, _overrides(args))
    _check_inputs(args.images, store=args.store, cfg=cfg, weights=False)  # the model's backbone
    model = model_uri_for(args.store, args.model)  # a bad registry name fails here, before Prefect starts
    load_model(model)  # and so does a damaged model: no weights, an edited card, an unknown backbone
    storage.check_writable(posixpath.dirname(storage.absolute(args.out)))
    from flows.predict import batch_predict  # Prefect loads only once the inputs are known good

    with prefect_api.prefect_api():
        out = batch_predict(model, args.images, args.out, args.store, cfg)
    print(out)
    return 0


def cmd_backbones(args: argparse.Namespace) -> int:
    from adaptflow.extract.backbones import BACKBONES

    print("shortcuts (backbone.name):")
    for name in sorted(BACKBONES):
        print(f"  {name:24} {type(BACKBONES[name]).__name__.removesuffix('Backbone').lower()} {BACKBONES[name].arch}")
    print(BACKBONES_HELP)
    return 0


BACKBONES_HELP = """
Any other model by name:
  timm           convnext_tiny.fb_in22k, vit_small_patch14_dinov2.lvd142m, timm:NAME, hf-hub:ORG/MODEL
                 (`timm.list_models()` lists them)
  torchvision    tv:NAME with its default weights, tv:NAME.WEIGHTS for another enum (tv:resnet50.IMAGENET1K_V1)
  CLIP           clip:ARCH/TAG, an open_clip image encoder with its published weights (clip:ViT-B-16/openai;
                 `open_clip.list_pretrained()` lists them; needs adaptflow[clip]). A run on it adds a
                 zero_shot candidate: the source's class names as prompts, no training

Weights (backbone.weights):
  null           the default: efficientnet_lite0's from its Python package (offline); any other model's from
                 the Hugging Face hub cache (HF_HOME, where timm and open_clip keep downloads) or the torch
                 hub cache (TORCH_HOME, torchvision's); downloaded there only with backbone.download=true,
                 which honours HF_HUB_OFFLINE and HF_ENDPOINT
  PATH or URI    a .safetensors / .pth / .bin state dict of the same architecture
  random         random initialisation (a test or a baseline)"""


def _retrain(
    source: str, target: str, target_labels: str | None, store: str, cfg, table: bool = True, train_labels=None
) -> str:
    from adaptflow.report.records import RunSummary
    from adaptflow.report.tables import render_table
    from adaptflow.store import storage
    from flows.retrain import retrain

    with prefect_api.prefect_api():
        run = retrain(source, target, target_labels, store, cfg, train_labels)
    if table:
        print(render_table(RunSummary.load(storage.join(run, "summary.json"))))
    return run


class _Version(argparse.Action):
    """`--version`: the package version and the git commit it runs from, looked up only when asked."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from adaptflow.models.registry import code_version

        version, _, commit = code_version().partition("+g")
        print(f"adaptflow {version} (git commit {commit or 'unknown: not run from a git checkout'})")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adaptflow",
        description="Transfer learning and domain adaptation for image classifiers, as Prefect flows.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            URIs may be local paths, file://, s3:// or memory:// locations.
            examples:
              adaptflow demo
              adaptflow extract s3://bucket/new_images --store s3://bucket/store
              adaptflow run --source data/old_camera --target data/new_camera --set backbone.image_size=160
              adaptflow predict adaptflow-store/models/RUN_ID new_images/ --out preds.parquet
              adaptflow predict champion new_images/ --out preds.parquet
              adaptflow models list
            exit status: 0 done, 2 error in the input, 3 infrastructure failed after retries (store
            unreachable, Prefect API not starting, time limit), 130 interrupted (rerun to resume)"""),
    )
    p.add_argument("--version", action=_Version, help="print the version and git commit, and exit")
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser, config: bool = True, method: bool = True, long: bool = True) -> None:
        """--store, and for long commands --quiet; with `config`, --config, --set and --rehash (every command
        with a config ingests), and --method unless `method` is False."""
        sp.add_argument(
            "--store", default=DEFAULT_STORE, help=f"feature store, models and runs (default: ./{DEFAULT_STORE})"
        )
        if long:
            sp.add_argument(
                "--quiet",
                "-q",
                action="store_true",
                help="no progress on stderr (and only Prefect's warnings and errors); stdout is unchanged",
            )
        if config:
            sp.add_argument("--config", help="YAML config file (see configs/default.yaml)")
            sp.add_argument(
                "--set",
                action="append",
                default=[],
                metavar="KEY=VALUE",
                help="override one setting, e.g. --set backbone.image_size=64 (repeatable); "
                "--set backbone.name=NAME picks the feature extractor, and `adaptflow backbones` says how to "
                "name any timm, torchvision or CLIP model and where its weights come from",
            )
            sp.add_argument(
                "--rehash",
                action="store_true",
                help="read, hash and decode every file again (ingest.rehash); by default a file unchanged "
                "since the store last ingested its dataset (same size and mtime or ETag) keeps its check",
            )
        if config and method:
            sp.add_argument(
                "--method",
                help="auto (default): train the adaptation candidates and select one "
                "without target labels; an algorithm (source_only, dann, cdan, coral, "
                "mmd, mcc, im, mme, adda; zero_shot on a CLIP backbone) trains only that one; none: only the "
                "source-only head",
            )

    run = sub.add_parser(
        "run",
        help="ingest, extract, train and evaluate on a source and a target dataset",
        description="Train a classifier on labeled source images for unlabeled target images. "
        "Prints a metrics table, then the run folder URI as the last line.",
    )
    run.add_argument(
        "--source",
        required=True,
        help="labeled images: class folders root/<class>/<image>, or a CSV/Parquet manifest with uri,label[,split]",
    )
    run.add_argument("--target", required=True, help="unlabeled images: a flat folder or a manifest")
    run.add_argument(
        "--target-labels",
        help="labels for target images, used for scoring only "
        "(class folders or a uri,label manifest; matched by content)",
    )
    run.add_argument(
        "--target-train-labels",
        help="labels of a few target images the run may use to choose its model (a uri,label manifest or "
        "class folders; every row must be usable); never counted in the target metrics it reports",
    )
    run.add_argument(
        "--json",
        action="store_true",
        help="print the run's summary as one JSON object on stdout "
        "(its run_uri included) instead of the table and the run folder",
    )
    common(run)
    run.set_defaults(command=cmd_run)

    demo = sub.add_parser(
        "demo",
        help="run the whole pipeline offline on a generated digit domain shift",
        description="Generate a source (grey digits) and a target (digits on colour photos) "
        "domain, then run the retrain flow on them.",
    )
    demo.add_argument(
        "--nightly",
        action="store_true",
        help="three scheduled-style runs on new target batches, the third from a new camera: "
        "a champion promoted, a night with no shift that stops early, a shift that retrains",
    )
    common(demo)
    demo.set_defaults(command=cmd_demo)

    ext = sub.add_parser(
        "extract",
        help="embed datasets into the feature store ahead of runs (a backfill)",
        description="Ingest the datasets and embed every valid image the feature store lacks. "
        "Re-running resumes: committed shards are kept. Prints the features URI.",
    )
    ext.add_argument("images", nargs="+", metavar="IMAGES_URI", help="folders of images or manifests")
    common(ext, method=False)
    ext.set_defaults(command=cmd_extract)

    pred = sub.add_parser("predict", help="predict classes for a folder of images with a saved model")
    pred.add_argument(
        "model",
        metavar="MODEL",
        help="a model folder, e.g. STORE/models/RUN_ID, or a version in the "
        "store's registry: champion, challenger, v3 or 3",
    )
    pred.add_argument("images", metavar="IMAGES_URI", help="a folder of images or a manifest")
    pred.add_argument("--out", required=True, help="where to write the predictions Parquet file")
    common(pred, method=False)
    pred.set_defaults(command=cmd_predict)

    models = sub.add_parser(
        "models",
        help="the model registry: list versions, promote one, roll back the champion",
        description="Registered model versions and their champion/challenger aliases.",
    )
    actions = models.add_subparsers(required=True, metavar="ACTION")
    ls = actions.add_parser("list", help="every registered version with its aliases and metrics")
    ls.add_argument(
        "--json",
        action="store_true",
        help="one JSON object on stdout: the registry's aliases and every "
        "version with its lineage, metrics, aliases and exports",
    )
    common(ls, config=False, long=False)
    ls.set_defaults(command=cmd_models_list)
    exp = actions.add_parser(
        "export",
        help="write a model as one ONNX or TorchScript file for serving",
        description="Backbone and head in one file: uint8 RGB images (N, 3, S, S), resized and "
        "centre-cropped as recorded, in; logits and probabilities out. The "
        "preprocessing and classes are in the file's metadata and in OUT.json beside "
        "it. The export is checked against the model before it is written, and "
        "recorded in the registry. Prints a summary, then OUT as the last line.",
    )
    exp.add_argument(
        "model", metavar="MODEL", help="a registry version (champion, challenger, v3 or 3) or a model folder"
    )
    exp.add_argument(
        "--format",
        default="onnx",
        choices=["onnx", "torchscript"],
        help="onnx (default; needs adaptflow[onnx]) or torchscript",
    )
    exp.add_argument("--out", required=True, help="the model file to write, e.g. classifier.onnx (and OUT.json)")
    exp.add_argument("--json", action="store_true", help="print the export's record as one JSON object")
    common(exp, config=False)
    exp.set_defaults(command=cmd_models_export)
    prom = actions.add_parser("promote", help="make a version the champion, whatever its metrics")
    prom.add_argument("version", metavar="VERSION", help="a version number, v3, or an alias (challenger)")
    prom.add_argument("--reason", default="manual", help="why, recorded in the registry's events (default: manual)")
    common(prom, config=False, long=False)
    prom.set_defaults(command=cmd_models_promote)
    rb = actions.add_parser("rollback", help="point champion back at the previous champion")
    rb.add_argument("--reason", default="rollback", help="why, recorded in the registry's events")
    common(rb, config=False, long=False)
    rb.set_defaults(command=cmd_models_rollback)

    from cli import label

    label.add_parser(sub)

    bb = sub.add_parser(
        "backbones",
        help="the backbone shortcuts, how to name any timm or torchvision model, and where weights come from",
        description=BACKBONES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bb.set_defaults(command=cmd_backbones)
    return p


if __name__ == "__main__":
    sys.exit(main())
