"""Draws bench/results/bench-*.json as one PNG: GB/s per method for each parameter set and GPU count.

    python bench/plot.py bench/results/bench-4xH200.json bench/results/bench-2xH200.json -o bench/results/bench.png

Needs only matplotlib (no torch), so it runs wherever the JSON is.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display here
import matplotlib.pyplot as plt

LABELS = {"raw_flat_broadcast": "raw flat broadcast", "per_tensor_broadcast": "per-tensor broadcast",
          "vllm_style_packed": "vLLM-style packed"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", nargs="+")
    parser.add_argument("-o", "--out", default="bench.png")
    args = parser.parse_args()
    runs = [json.loads(Path(path).read_text()) for path in args.results]
    panels = [(run, name) for run in runs for name in run["sets"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    for ax, (run, name) in zip(axes[0], panels, strict=True):
        result = run["sets"][name]
        methods = result["methods"]
        best = result["best_weightsync"]
        keys = [*LABELS, best]
        values = [methods[k]["gbps"] for k in keys]
        colors = ["#888888", "#c0504d", "#f79646", "#4f81bd"]
        bars = ax.bar(range(len(keys)), values, color=colors)
        raw = methods["raw_flat_broadcast"]["gbps"]
        ax.axhline(0.95 * raw, color="black", linestyle="--", linewidth=1, label="95% of raw (target)")
        for bar, key in zip(bars, keys, strict=True):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 4,
                    f"{methods[key]['gbps']:.0f}\n({methods[key]['ratio_to_raw']:.2f}x)", ha="center", fontsize=8)
        cfg = methods[best]["config"]
        names = [*LABELS.values(), f"weightsync\n({cfg['buffer_bytes'] >> 20} MiB x{cfg['num_buffers']})"]
        ax.set_xticks(range(len(keys)), names, rotation=20, fontsize=8)
        ax.set_ylabel("GB/s")
        ax.set_ylim(0, max(values) * 1.25)
        gpus = run["meta"]["gpus"]
        ax.set_title(f"{name}: {result['tensors']} tensors, {result['bytes'] / 1e9:.1f} GB\n"
                     f"1 -> {gpus - 1} receivers, {gpus} x {run['meta']['gpu_name']}", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
