"""The examples in the public API's docstrings run, and give what they show."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import app
import rldiag

HEAVY = ("rldiag.demo", "rldiag.record.integrations")
"""Modules whose import loads torch or a trainer (seconds each): run with the slow tests."""
PAGES = "app.pages"
"""Dash pages register themselves with a running app (``dash.register_page``): imported by the app only."""


def _modules() -> list[str]:
    names = []
    for pkg in (rldiag, app):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if not info.name.endswith("__main__") and not info.name.startswith(PAGES):
                names.append(info.name)
    return [pkg.__name__ for pkg in (rldiag, app)] + sorted(names)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n.startswith(HEAVY) else n for n in _modules()]
)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed"
