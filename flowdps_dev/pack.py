"""Import this checkout as the package ``flowdps`` (outside ComfyUI: scripts, benchmarks, the demo).

The pack's root is a package whose folder name is not a valid module name, and it must never be imported as
top-level ``nodes`` / ``operators`` (ComfyUI has its own ``nodes``): it is loaded from its ``__init__.py`` under
the name ``flowdps``, the same way tests/conftest.py does.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def import_pack(name: str = "flowdps") -> ModuleType:
    """The pack as the package ``name`` (imported once; later calls return the same module)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
