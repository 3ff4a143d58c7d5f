#!/usr/bin/env bash
# The demo in one command on a fresh machine: the project's virtualenv (hack/venv.sh), the sandbox's
# binaries (hack/build-sandbox-bins.sh), then examples/demo/run_demo.py, which starts the sandbox, installs
# the operator with Helm, runs a weight-sync group and tears it all down (pass --keep to keep it running).
# Needs root (the sandbox creates a bridge and network namespaces). Arguments go to run_demo.py (--help).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { printf '[demo %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

log "python environment (hack/venv.sh; the first run installs torch and the rest from PyPI)"
setup_log="$(mktemp -t weightsync-demo-venv.XXXXXX)"
trap 'rm -f "$setup_log"' EXIT
# Progress lines only (a fresh environment takes minutes); the whole output is shown if it fails.
if ! venv="$("$root/hack/venv.sh" 2> >(tee "$setup_log" | grep --line-buffered -E '^(\[venv|Collecting|Successfully)' >&2))"; then
  cat "$setup_log" >&2; log "hack/venv.sh failed (its output is above)"; exit 1
fi
log "using $venv"
log "sandbox binaries (hack/build-sandbox-bins.sh; the first run builds them from the Go module proxy, ~10 min)"
bins="$("$root/hack/build-sandbox-bins.sh")"
export WEIGHTSYNC_SANDBOX_BIN_DIR="$bins"
"$venv/bin/python" "$root/examples/demo/run_demo.py" "$@"
