"""`adaptflow label suggest`: which target images of a finished run a person should label."""

from __future__ import annotations

import argparse


def cmd_label_suggest(args: argparse.Namespace) -> int:
    from adaptflow.label.store import labelled_already
    from adaptflow.label.suggest import read_labelled, suggest, write_ask
    from adaptflow.report.records import RunSummary
    from adaptflow.store import storage

    summary = RunSummary.load(storage.join(args.run, "summary.json"))
    labelled = set().union(labelled_already(summary), *(read_labelled(uri) for uri in args.labelled))
    rows = suggest(summary, args.k, args.seed, labelled)
    sheet = write_ask(rows, args.out, summary.datasets["target"].classes, summary.config.links.expiry_s)
    print(f"{len(rows)} images to label (of {args.k} asked), chosen by BADGE on {summary.adaptation.selected}")
    print(f"contact sheet: {sheet}")
    print(args.out)
    return 0


def add_parser(sub) -> None:
    label = sub.add_parser(
        "label",
        help="target labels from a person: which images to ask for",
        description="Choose the target images of a finished run most worth a person's labels.",
    )
    actions = label.add_subparsers(required=True, metavar="ACTION")
    sg = actions.add_parser(
        "suggest",
        help="write a CSV of target images to label, and a contact sheet of them",
        description="BADGE (Ash et al. 2020): images the run's selected model is unsure of, unlike each other. "
        "Writes OUT (uri,label with the labels empty, to fill in) and OUT's name ending in .html (thumbnails, "
        "links, the model's guess). The same run, --k and --seed give the same images. Prints OUT last.",
    )
    sg.add_argument("run", metavar="RUN", help="a finished run's folder (the last line `adaptflow run` prints)")
    sg.add_argument("--k", type=_positive, required=True, help="how many images to suggest")
    sg.add_argument("--out", required=True, help="the CSV to write, e.g. ask.csv")
    sg.add_argument(
        "--labelled",
        action="append",
        default=[],
        metavar="CSV",
        help="a labels CSV (a uri column) whose images are labelled already: never suggested (repeatable); "
        "the run's own --target-train-labels and the labels its store keeps never are either",
    )
    sg.add_argument("--seed", type=int, default=0, help="the seed of the choice (default 0)")
    sg.set_defaults(command=cmd_label_suggest)


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n
