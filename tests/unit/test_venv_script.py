"""hack/venv.sh: every checkout runs its own code, even while another checkout on the machine uses the
same cached dependencies. The shared dependency environment here is a small stand-in (a virtualenv that
sees this test run's packages through a .pth file), so the test copies megabytes, not torch."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "hack/venv.sh", "hack/venv_key.py",
           "weightsync", "operator", "runtime", "sandbox"]


def _dependency_key() -> str:
    """The name hack/venv.sh gives the shared environment for this pyproject.toml and Python."""
    spec = importlib.util.spec_from_file_location("venv_key", ROOT / "hack" / "venv_key.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.dependency_key(str(ROOT / "pyproject.toml")))


def _shared_environment(cache: Path) -> Path:
    shared = cache / f"venv-{_dependency_key()}"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(shared)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(shared), "platbase": str(shared)}))
    here = sysconfig.get_path("purelib")
    (site / "zz_dependencies.pth").write_text(f"import site; site.addsitedir({here!r})\n")
    (shared / ".complete").touch()
    return shared


def _checkout(path: Path) -> Path:
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, path / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, path / name)
    return path


def _venv(checkout: Path, cache: Path) -> Path:
    env = {**os.environ, "WEIGHTSYNC_CACHE": str(cache), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(checkout / "hack" / "venv.sh")], env=env, capture_output=True, text=True,
                          check=False, timeout=600)
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip().splitlines()[-1])


def _runs_code_of(venv: Path) -> Path:
    done = subprocess.run([str(venv / "bin" / "python"), "-c", "import weightsync.runtime as r; print(r.__file__)"],
                          capture_output=True, text=True, cwd="/", check=True)
    return Path(done.stdout.strip()).parent.parent


def test_two_checkouts_each_run_their_own_code_from_one_dependency_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shared = _shared_environment(cache)
    first, second = _checkout(tmp_path / "first"), _checkout(tmp_path / "second")

    first_venv = _venv(first, cache)
    second_venv = _venv(second, cache)

    assert first_venv != second_venv
    assert _runs_code_of(first_venv) == first  # the second checkout's set-up did not take it over
    assert _runs_code_of(second_venv) == second
    assert not list(Path(sysconfig.get_path("purelib", vars={"base": str(shared)})).glob("weightsync*")), \
        "the shared environment holds no checkout's install"
    script = (first_venv / "bin" / "weightsync-sandbox").read_text().splitlines()[0]
    assert script == f"#!{first_venv}/bin/python"

    assert _venv(first, cache) == first_venv  # reused, not copied again
    shutil.rmtree(first)
    _venv(second, cache)
    assert not first_venv.exists(), "a removed checkout's environment is pruned"
