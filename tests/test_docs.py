"""The examples in the public docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["graphmerge.config", "graphmerge.merge", "graphmerge.graph.analyse",
           "graphmerge.graph.oracle", "graphmerge.io.atomic", "graphmerge.plan"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
