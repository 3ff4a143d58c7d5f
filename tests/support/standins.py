"""Stand-in vLLM servers (tests/support/vllm_standin.py) as processes of a test, what they recorded, and a small
model to send them."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch
from vllm_standin import sha256_of

STANDIN = Path(__file__).with_name("vllm_standin.py")


class StandIn:
    """One stand-in server process on a free local port, with `workers` worker ranks."""

    def __init__(self, workers: int = 1, *args: str, timeout: float = 10.0, port: int = 0,
                 start_within: float = 120.0) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCH_CPP_LOG_LEVEL": "ERROR", "VLLM_SERVER_DEV_MODE": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(STANDIN), "--port", str(port), "--workers", str(workers), "--timeout", str(timeout),
             "--weight-transfer-config", '{"backend": "nccl"}', *args],
            stdout=subprocess.PIPE, stderr=None, env=env, text=True)
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            line = ""
            deadline = time.monotonic() + start_within
            while not line.startswith("LISTENING"):
                if not sel.select(timeout=max(deadline - time.monotonic(), 0)) or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"the stand-in did not start within {start_within}s")
                line = self.proc.stdout.readline()
        self.port = int(line.split()[1])
        host = args[args.index("--host") + 1] if "--host" in args else "127.0.0.1"
        self.url = f"http://{host}:{self.port}"
        self.workers = workers

    def call(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                text = answer.read().decode()
                return answer.status, json.loads(text) if text else None
        except urllib.error.HTTPError as err:
            text = err.read().decode()
            return err.code, json.loads(text) if text else None

    def _get(self, path: str) -> Any:
        status, doc = self.call("GET", path)
        assert status == 200, (status, doc)
        return doc

    def requests(self) -> list[dict[str, Any]]:
        return list(self._get("/debug/requests"))

    def steps(self) -> list[str]:
        """The requests so far as `METHOD /path[?query]`."""
        out = []
        for r in self.requests():
            query = "&".join(f"{k}={v}" for k, v in r["query"].items())
            out.append(f"{r['method']} {r['path']}" + (f"?{query}" if query else ""))
        return out

    def tensors(self, version: str) -> dict[str, dict[str, dict[str, Any]]]:
        """Per worker rank (a string), per tensor name: dtype, shape and sha256 of what the version delivered."""
        return dict(self._get(f"/debug/tensors?version={version}"))

    def broadcasts(self) -> dict[str, list[list[list[Any]]]]:
        """Per worker rank: per update call, the (dtype name, element count) of every broadcast received."""
        return dict(self._get("/debug/broadcasts"))

    def state(self) -> dict[str, Any]:
        return dict(self._get("/debug/state"))

    def faults(self, **faults: Any) -> None:
        status, _ = self.call("POST", "/debug/faults", faults)
        assert status == 200

    def clear(self) -> None:
        status, _ = self.call("POST", "/debug/clear", {})
        assert status == 200

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> StandIn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def model(version: int, *, extra: bool = False) -> list[tuple[str, torch.Tensor]]:
    """A small model of every dtype vLLM receives: 0-d, empty, non-contiguous and fp8 tensors among them."""
    g = torch.Generator().manual_seed(version)
    out: list[tuple[str, torch.Tensor]] = []
    for layer in range(3):
        p = f"model.layers.{layer}."
        out += [
            (p + "q_proj.weight", torch.randn(24, 16, generator=g).to(torch.bfloat16)),
            (p + "o_proj.weight", torch.randn(16, 24, generator=g).t()),  # a transposed (non-contiguous) view
            (p + "mlp.weight", torch.randn(5, 7, generator=g).to(torch.float8_e4m3fn)),  # 35 bytes: odd
            (p + "mlp.weight_scale", torch.randn((), generator=g)),
            (p + "norm.weight", torch.randn(16, generator=g).to(torch.float16)),
            (p + "counts", torch.randint(-9, 9, (3,), generator=g)),
            (p + "ids", torch.randint(0, 200, (7,), generator=g, dtype=torch.int32)),
            (p + "bytes", torch.randint(0, 255, (9,), generator=g, dtype=torch.uint8)),
            (p + "signed", torch.randint(-100, 100, (4,), generator=g, dtype=torch.int8)),
            (p + "double", torch.randn(2, generator=g, dtype=torch.float64)),
            (p + "empty", torch.empty(0, 3)),
        ]
    if extra:
        out.append(("lm_head.weight", torch.randn(40, 16, generator=g).to(torch.bfloat16)))
    return out


def expected(named: list[tuple[str, torch.Tensor]]) -> dict[str, dict[str, Any]]:
    return {n: {"dtype": str(t.dtype).split('.')[-1], "shape": list(t.shape), "sha256": sha256_of(t)} for n, t in named}
