"""The examples in the docstrings of the losses and validators run and print what they show.

Each public function there documents its maths with an example (formula, paper, shapes, example, as
TLlib's docstrings do); running them keeps the examples honest, and a function without one fails here.
"""

import doctest
import inspect

import pytest

from adaptflow.adapt import losses, validators

MODULES = [losses, validators]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples_pass(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"no examples ran in {module.__name__}"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {module.__name__}"


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_every_public_function_has_an_example(module):
    public = [
        name
        for name, obj in vars(module).items()
        if inspect.isfunction(obj) and obj.__module__ == module.__name__ and not name.startswith("_")
    ]
    assert public
    bare = [name for name in public if ">>>" not in (inspect.getdoc(getattr(module, name)) or "")]
    assert not bare, f"public functions of {module.__name__} without an example: {bare}"
