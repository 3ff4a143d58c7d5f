#!/usr/bin/env bash
# Everything the GPU machines should run, in one device command (device time is scarce: one call, not many).
# From the repository root, with the wheels of pydantic and cryptography (and their needs) carried in .whl/
# (bench/README.md):
#   bash bench/gpu_suite.sh "$OUT"
# (`git rev-parse --short HEAD > .commit` beforehand, with .commit carried, names the commit in the output.)
# Writes into the given folder: GPU test logs, the sync benchmark's JSON and log for every GPU count this
# machine allows (all GPUs, then 2), and the one-GPU probe. Nothing here needs the network.
set -uo pipefail
out="${1:?usage: gpu_suite.sh OUTPUT_DIR}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
# tests/support: the test scenarios the GPU tests import (tests/conftest.py adds it; --noconftest below does not).
export PYTHONPATH="/tmp/site:$PWD:$PWD/tests/support" PYTHONUNBUFFERED=1
# NVLink multicast stays off on the shared machines, in every process.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TORCH_CPP_LOG_LEVEL=ERROR
gpus="$(python3 -c 'import torch; print(torch.cuda.device_count())')"
commit="$(cat .commit 2>/dev/null || echo unknown)"
echo "$gpus GPUs, commit $commit" | tee "$out/suite.txt"
nvidia-smi topo -m > "$out/topo.txt" 2>&1
tests=(python3 -m pytest tests/gpu --noconftest -p no:cacheprovider -v -W ignore --timeout 300)
configs="1024:2:1024,1024:2:1024:copy=full,1024:2:1024:copy=64,1024:2:1024:prio=high,2048:2:2048"
if (( gpus >= 2 )); then
  "${tests[@]}" 2>&1 | tee "$out/gpu-tests-${gpus}gpu.txt"
  python3 bench/sync_bench.py --sets dense moe --iters 5 --timeline --configs "$configs" \
    --out "$out/bench-${gpus}xH200.json" 2>&1 | grep -v -e Warn -e conversion_method | tee "$out/bench-${gpus}xH200.log"
fi
if (( gpus > 2 )); then
  CUDA_VISIBLE_DEVICES=0,1 "${tests[@]}" 2>&1 | tee "$out/gpu-tests-2gpu.txt"
  CUDA_VISIBLE_DEVICES=0,1 python3 bench/sync_bench.py --sets dense moe --iters 5 --timeline --configs "$configs" \
    --out "$out/bench-2xH200.json" 2>&1 | grep -v -e Warn -e conversion_method | tee "$out/bench-2xH200.log"
fi
# Host-side overhead (gloo on this machine's CPUs): first byte and sync time, dense and MoE.
for set in dense moe; do
  python3 bench/host_overhead.py --set "$set" --syncs 20 --out "$out/host-overhead-$set.json" 2>&1 \
    | grep -v -e Warn -e conversion_method | tee "$out/host-overhead-$set.log"
done
if (( gpus == 1 )); then  # the NCCL tests need two GPUs; --noconftest also drops their skip, so select by mark
  "${tests[@]}" -m single_gpu 2>&1 | tee "$out/gpu-tests-1gpu.txt"
  python3 bench/gpu_probe.py --out "$out/gpu-probe-1xH200.json" 2>&1 | grep -v -e Warn -e conversion_method \
    | tee "$out/gpu-probe-1xH200.log"
fi
