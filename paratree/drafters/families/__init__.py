"""One module per drafter family; importing this package registers every module in it.

A new family is one new file here that calls `registry.register_drafter` (and, for a trained
head, `registry.register_family`): nothing else names it.
"""

from __future__ import annotations

import importlib
import pkgutil

for _mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_mod.name}")
