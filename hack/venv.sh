#!/usr/bin/env bash
# Creates (or reuses) this checkout's virtualenv under ~/.cache, with weightsync installed into it, editable.
# The third-party dependencies live in one shared environment, keyed by a hash of pyproject.toml, so a fresh
# clone reuses them and a dependency change builds a new one. Each checkout runs from its own copy of that
# environment, made of hard links (seconds, next to no disk), so two checkouts testing at once each run
# their own code. Prints the checkout's virtualenv's path last.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
cache="${WEIGHTSYNC_CACHE:-$HOME/.cache/weightsync}"
key="$("$python" "$root/hack/venv_key.py" "$root/pyproject.toml")"
shared="$cache/venv-$key"
checkout_id="$(printf '%s' "$root" | sha256sum | cut -c1-12)"
venv="$cache/checkouts/$checkout_id-$key"
log() { printf '[venv %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

mkdir -p "$cache/checkouts"
exec 9>"$cache/venv.lock"
flock 9  # two callers at once (a test run and a demo) must not build or copy the same environment twice
if [[ ! -f "$shared/.complete" ]]; then
  log "creating $shared (torch and the other dependencies come from PyPI; the first time takes a few minutes)"
  rm -rf "$shared"
  "$python" -m venv "$shared"
  "$shared/bin/python" -m pip install -q --upgrade pip >&2
  "$shared/bin/python" -m pip install --progress-bar off "$root[dev]" >&2
  "$shared/bin/python" -m pip uninstall -q -y weightsync >&2
  touch "$shared/.complete"
fi

# Checkouts that are gone, or this checkout's copies of an older dependency set, need not be kept.
shopt -s nullglob
for stale in "$cache"/checkouts/*/; do
  stale="${stale%/}"
  [[ "$stale" == "$venv" ]] && continue
  owner="$(cat "$stale/.checkout" 2>/dev/null || true)"
  if [[ -z "$owner" || ! -f "$owner/pyproject.toml" || "$(basename "$stale")" == "$checkout_id"-* ]]; then
    rm -rf "$stale"
  fi
done

if [[ ! -f "$venv/.complete" ]]; then
  log "copying $shared for $root (hard links)"
  rm -rf "$venv"
  cp -al "$shared" "$venv" 2>/dev/null || { rm -rf "$venv"; cp -a "$shared" "$venv"; }  # no hard links there
  rm -f "$venv/.complete"
  # The scripts and activators name the environment they were made in; sed -i writes new files, so the
  # shared environment's stay as they are.
  mapfile -t naming < <(grep -lIF "$shared" "$venv"/bin/* "$venv/pyvenv.cfg" 2>/dev/null || true)
  if (( ${#naming[@]} )); then sed -i "s#$shared#$venv#g" "${naming[@]}"; fi
  # An environment made by an older hack/venv.sh may hold some checkout's editable install; never this one's.
  "$venv/bin/python" -m pip uninstall -q -y weightsync >&2 2>/dev/null || true
  printf '%s\n' "$root" >"$venv/.checkout"
  touch "$venv/.complete"
fi
# Editable, so the environment always runs this checkout's code.
"$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$root" >&2
echo "$venv"
