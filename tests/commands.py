"""Command lines the subprocess tests (test_faults, test_interrupt) run."""

import sys


def extract_command(demo_data, store: str) -> list[str]:
    """`adaptflow extract` of the demo data into `store`: many small shards, no decoding workers."""
    return [
        sys.executable,
        "-m",
        "cli.main",
        "extract",
        demo_data.source_uri,
        demo_data.target_uri,
        "--store",
        store,
        "--set",
        "extract.shard_size=8",
        "--set",
        "extract.num_workers=0",
        "--set",
        "backbone.image_size=128",
        "--set",
        "extract.compact_min_shards=0",
    ]
