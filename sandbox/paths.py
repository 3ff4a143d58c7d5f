"""Where things live: the repository, the state directory, the binaries and the Python environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BUILD_SCRIPT = "hack/build-sandbox-bins.sh"
BUILD_TIMEOUT_S = 90 * 60


def repo_root() -> Path:
    """The checkout holding hack/build-sandbox-bins.sh: $WEIGHTSYNC_REPO_ROOT, else this package's parent."""
    env = os.environ.get("WEIGHTSYNC_REPO_ROOT")
    root = Path(env) if env else Path(__file__).resolve().parent.parent
    if not (root / BUILD_SCRIPT).is_file():
        raise FileNotFoundError(
            f"{root / BUILD_SCRIPT} not found: set WEIGHTSYNC_REPO_ROOT to the weightsync checkout"
        )
    return root


def default_state_dir() -> Path:
    """$WEIGHTSYNC_SANDBOX_STATE, else ~/.cache/weightsync/sandbox-state."""
    env = os.environ.get("WEIGHTSYNC_SANDBOX_STATE")
    return Path(env) if env else Path.home() / ".cache" / "weightsync" / "sandbox-state"


def venv_bin_dir() -> Path:
    """The bin directory of the Python environment running this code; pods' `python` is this one."""
    return Path(sys.executable).parent


def build_binaries(log: bool = True) -> Path:
    """Builds the control-plane binaries or reuses the cache; returns their directory."""
    env = os.environ.get("WEIGHTSYNC_SANDBOX_BIN_DIR")
    if env:
        return Path(env)
    script = repo_root() / BUILD_SCRIPT
    proc = subprocess.run(
        ["bash", str(script)],
        stdout=subprocess.PIPE,
        stderr=None if log else subprocess.DEVNULL,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{script} failed with exit code {proc.returncode}; see its output above")
    return Path(lines[-1])
