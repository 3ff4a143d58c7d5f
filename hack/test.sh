#!/usr/bin/env bash
# The whole test suite, as CI runs it: lint, types, then every test tier. The cluster tiers start their own
# sandbox (a real kube-apiserver, etcd, controller-manager, scheduler and a node agent; root is needed for
# the pods' network namespaces) and stop it when they end, failed or not. GPU tests skip without GPUs; their
# device runs are recorded under bench/results/. Extra arguments go to pytest (e.g. tests/unit -k plan).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
log() { printf '[test %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

log "python environment (hack/venv.sh)"
venv="$(hack/venv.sh)"
log "control-plane binaries (hack/build-sandbox-bins.sh; cold: ~10 min, then cached under ~/.cache)"
WEIGHTSYNC_SANDBOX_BIN_DIR="$(hack/build-sandbox-bins.sh)"
export WEIGHTSYNC_SANDBOX_BIN_DIR PATH="$venv/bin:$PATH"

log "ruff"
ruff check .
log "mypy (strict)"
PYTHON="$venv/bin/python" hack/typecheck.sh
log "generated files are up to date (CRDs, reference docs)"
python -m weightsync.api.crd --check

log "pytest"
export TORCH_CPP_LOG_LEVEL="${TORCH_CPP_LOG_LEVEL:-ERROR}"  # c10d's socket chatter, not test output
status=0
python -m pytest -p no:cacheprovider "${@:-tests}" || status=$?
if [[ $status -eq 5 ]]; then
  log "pytest collected no tests: that is a failure here"
  exit 1
fi
exit "$status"
