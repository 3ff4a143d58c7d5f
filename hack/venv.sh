#!/usr/bin/env bash
# Creates (or reuses) the project's virtualenv under ~/.cache and installs weightsync into it, editable.
# The third-party dependencies are keyed by a hash of pyproject.toml, so a fresh clone reuses them and a
# dependency change builds a new environment. Prints the virtualenv's path last.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
cache="${WEIGHTSYNC_CACHE:-$HOME/.cache/weightsync}"
# Keyed by the Python version and the declared dependencies only, so editing tool settings reuses it.
key="$("$python" - "$root/pyproject.toml" <<'PY'
import hashlib, json, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
deps = json.dumps([project["dependencies"], project["optional-dependencies"]], sort_keys=True)
print(f"py{sys.version_info[0]}{sys.version_info[1]}-{hashlib.sha256(deps.encode()).hexdigest()[:12]}")
PY
)"
venv="$cache/venv-$key"
log() { printf '[venv %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

mkdir -p "$cache"
exec 9>"$cache/venv.lock"
flock 9  # two callers at once (a test run and a demo) must not build the same environment twice
if [[ ! -f "$venv/.complete" ]]; then
  log "creating $venv (torch and the other dependencies come from PyPI; the first time takes a few minutes)"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install --progress-bar off "$root[dev]" >&2
  "$venv/bin/python" -m pip uninstall -q -y weightsync >&2
  touch "$venv/.complete"
fi
# Editable, so the environment always runs this checkout's code.
"$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$root" >&2
echo "$venv"
