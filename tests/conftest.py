"""Shared pytest configuration: the sandbox fixtures (sandbox, namespace, kube_api), and tests/support on
the import path (the member processes of runtime tests are spawned, and import their scenarios from there)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "support"))

pytest_plugins = ["weightsync.sandbox.pytest_plugin"]
