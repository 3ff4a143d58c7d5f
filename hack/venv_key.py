"""The name of the shared dependency environment hack/venv.sh makes: keyed by the Python version and the
declared dependencies only, so editing tool settings reuses it.

    python hack/venv_key.py pyproject.toml    # prints e.g. py311-5342d00becea
"""

from __future__ import annotations

import hashlib
import json
import sys
import tomllib


def dependency_key(pyproject: str) -> str:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    deps = json.dumps([project["dependencies"], project["optional-dependencies"]], sort_keys=True)
    return f"py{sys.version_info[0]}{sys.version_info[1]}-{hashlib.sha256(deps.encode()).hexdigest()[:12]}"


if __name__ == "__main__":
    print(dependency_key(sys.argv[1]))
