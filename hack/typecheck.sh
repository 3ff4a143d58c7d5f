#!/usr/bin/env bash
# mypy (strict, configured in pyproject.toml) over the installed package layout. operator/, runtime/ and
# sandbox/ are weightsync.operator, weightsync.runtime and weightsync.sandbox only once installed, so a
# throwaway tree of symlinks gives mypy the real module names.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tree="$root/.typecheck"
rm -rf "$tree"; mkdir -p "$tree/weightsync"
for f in "$root"/weightsync/*; do ln -s "$f" "$tree/weightsync/$(basename "$f")"; done
for pkg in operator runtime sandbox; do ln -s "$root/$pkg" "$tree/weightsync/$pkg"; done
cd "$tree"
exec "${PYTHON:-python}" -m mypy --config-file "$root/pyproject.toml" --namespace-packages --explicit-package-bases \
  -p weightsync "$@"
