"""Every benchmark still imports against the library: a rename that leaves one behind fails here, not on
the day someone needs its numbers (benchmarks/adaptation.py once imported a function config.py had lost)."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_a_benchmark_imports(path, monkeypatch):
    monkeypatch.syspath_prepend(str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, path.stem, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)  # its imports and definitions; main() runs only as a script
    assert callable(getattr(module, "main", None)) or path.stem == "shifts", f"{path.name} has no main()"
