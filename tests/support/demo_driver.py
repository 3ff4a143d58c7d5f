"""examples/demo/run_demo.py (not a package) as a module: the demo driver, its log parsing and its checks,
loaded once per process for every test tier that judges syncs by the demo's logs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PATH = Path(__file__).resolve().parents[2] / "examples" / "demo" / "run_demo.py"


def load() -> ModuleType:
    if "run_demo" in sys.modules:
        return sys.modules["run_demo"]
    spec = importlib.util.spec_from_file_location("run_demo", PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_demo"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module
