"""Every coordinator module imports on its own: no import cycle hides behind an import
order that happens to work."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import pytest

import cape_coordinator

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(cape_coordinator.__path__, "cape_coordinator.")
    if ".migrations" not in m.name and not m.name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_module_imports_alone(name: str) -> None:
    saved = {k: v for k, v in sys.modules.items() if k.startswith("cape_coordinator")}
    for key in saved:
        del sys.modules[key]
    try:
        importlib.import_module(name)
    finally:
        for key in [k for k in sys.modules if k.startswith("cape_coordinator")]:
            del sys.modules[key]
        sys.modules.update(saved)
