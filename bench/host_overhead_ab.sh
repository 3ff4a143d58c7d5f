#!/usr/bin/env bash
# Host overhead of this tree against an older commit, on one machine, interleaved (figures of different
# days, even of one machine kind, do not compare). Two steps, so the second runs on the device:
#   bash bench/host_overhead_ab.sh prepare bc1b3fd      # here: the old tree into build/old (git archive)
#   bash bench/host_overhead_ab.sh run "$OUT"           # there, with .whl/ and build/old carried
# Writes ab.json (every run's summary and the medians), the two MoE profiles (not with PROFILES=0) and the
# runs' log.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
case "${1:-}" in
  prepare)
    commit="${2:?usage: host_overhead_ab.sh prepare COMMIT}"
    rm -rf build/old && mkdir -p build/old
    git archive "$commit" weightsync runtime operator bench tests/support pyproject.toml | tar -x -C build/old
    git rev-parse --short "$commit" > build/old/.commit
    git rev-parse --short HEAD > .commit
    echo "build/old holds $(cat build/old/.commit); carry .whl, .commit and build/old" ;;
  run)
    out="${2:?usage: host_overhead_ab.sh run OUTPUT_DIR}"; mkdir -p "$out"
    runs="$(mktemp -d)"
    if [[ -d .whl ]] && ! python3 -c "import pydantic, cryptography" 2>/dev/null; then  # the GPU image lacks them
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    fi
    export TORCH_CPP_LOG_LEVEL=ERROR PYTHONUNBUFFERED=1
    for round in 1 2 3; do
      for tree in head old; do
        dir="$root"; [[ $tree == old ]] && dir="$root/build/old"
        for set in moe dense; do
          (cd "$dir" && PYTHONPATH="/tmp/site:$dir" python3 bench/host_overhead.py --set "$set" --syncs "${SYNCS:-20}" \
            --out "$runs/$set-$tree-$round.json" 2>&1 | grep -v -e Warn -e conversion_method >> "$out/runs.log")
        done
      done
    done
    for tree in head old; do
      [[ ${PROFILES:-1} == 0 ]] && break  # PROFILES=0: no profiles (device time is scarce)
      dir="$root"; [[ $tree == old ]] && dir="$root/build/old"
      (cd "$dir" && PYTHONPATH="/tmp/site:$dir" python3 bench/host_overhead.py --set moe --syncs "${SYNCS:-20}" --profile \
        --out "$runs/profile-$tree.json" 2>&1 | grep -v -e Warn -e conversion_method > "$out/moe-$tree-profile.log")
    done
    python3 - "$runs" "$out/ab.json" "$(cat .commit 2>/dev/null || echo unknown)" "$(cat build/old/.commit)" <<'PY'
import glob, json, platform, statistics, sys
runs, dest, head, old = sys.argv[1:]
keys = ("trainer_total_ms", "trainer_first_byte_ms", "trainer_layout_ms", "trainer_manifest_out_ms",
        "trainer_go_ms", "trainer_enqueue_ms", "receiver_first_byte_ms")
nan = float("nan")
doc = {"command": "bash bench/host_overhead_ab.sh prepare OLD && bash bench/host_overhead_ab.sh run OUT",
       "commits": {"head": head, "old": old}, "python": platform.python_version(), "runs": {}, "median_of_runs": {}}
for s in ("moe", "dense"):
    for tree in ("head", "old"):
        rows = [json.load(open(f))["summary"] for f in sorted(glob.glob(f"{runs}/{s}-{tree}-*.json"))]
        # An older tree's script may not report every step (NaN there, left out here).
        doc["runs"][f"{s}-{tree}"] = [{k: round(r[k], 3) for k in keys if r.get(k, nan) == r.get(k, nan)}
                                      for r in rows]
        doc["median_of_runs"][f"{s}-{tree}"] = {k: round(statistics.median(r[k] for r in rows), 2) for k in keys
                                                if all(r.get(k, nan) == r.get(k, nan) for r in rows)}
        print(s, tree, doc["median_of_runs"][f"{s}-{tree}"])
open(dest, "w").write(json.dumps(doc, indent=1) + "\n")
PY
    ;;
  *) echo "usage: host_overhead_ab.sh prepare COMMIT | run OUTPUT_DIR" >&2; exit 2 ;;
esac
