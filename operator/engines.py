"""What a stock vLLM server needs to be a member (protocol `vllm`): checked on the template, added where safe.

Pure. The engine is the first container of the inference template (as for rdmaResource). vLLM 0.33 serves
its weight-transfer routes only when both hold:

- `VLLM_SERVER_DEV_MODE=1` in its environment (vLLM parses it as `bool(int(value))`, so `true` crashes it
  and `0` hides the routes). The operator adds `VLLM_SERVER_DEV_MODE=1` when the container does not set it,
  and refuses a value that is not a non-zero integer.
- `--weight-transfer-config '{"backend": "nccl"}'` on its command line (without it every weight-transfer call
  answers 500). A command line is the user's program, so the operator never edits it: a missing or
  non-nccl config is refused, naming the flag.

And the trainer drives it at `spec.engine.port`: the command's `--port` (vLLM's default 8000) must be that
port. The readiness probe, when the template has none, is `GET /health` on it, so a member is Ready when its
server answers. A command run through a shell (`sh -c "vllm serve ..."`) is read word by word.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from weightsync.api.models import WeightSyncSpec

Obj = dict[str, Any]
DEV_MODE_ENV = "VLLM_SERVER_DEV_MODE"
CONFIG_FLAG = "--weight-transfer-config"
PORT_FLAG = "--port"
DEFAULT_VLLM_PORT = 8000
HEALTH_PATH = "/health"
_SHELLS = ("sh", "bash", "dash", "zsh", "/bin/sh", "/bin/bash", "/usr/bin/env")


def engine_container(spec: WeightSyncSpec) -> Obj:
    containers: list[Obj] = spec.inference.template["spec"]["containers"]
    return containers[0]


def command_words(container: Obj) -> list[str]:
    """The container's command and args as words; a shell's `-c` script is split as the shell would."""
    argv = [str(x) for x in [*(container.get("command") or []), *(container.get("args") or [])]]
    words: list[str] = []
    for i, arg in enumerate(argv):
        if i > 0 and argv[i - 1] == "-c" and any(argv[0].endswith(s) for s in _SHELLS):
            try:
                words += shlex.split(arg)
            except ValueError:
                words += arg.split()
        else:
            words.append(arg)
    return words


def flag_value(words: list[str], flag: str) -> str | None:
    """The value of `--flag VALUE` or `--flag=VALUE` (the last one wins, as argparse does); None if absent."""
    found = None
    for i, word in enumerate(words):
        if word == flag and i + 1 < len(words):
            found = words[i + 1]
        elif word.startswith(flag + "="):
            found = word[len(flag) + 1 :]
    return found


def vllm_problems(spec: WeightSyncSpec) -> list[str]:
    """What keeps the inference template from being a stock vLLM member; [] for any other protocol."""
    if spec.transport.protocol != "vllm":
        return []
    container = engine_container(spec)
    where = f"spec.inference.template.spec.containers[{container.get('name', '?')}]"
    problems = []
    dev_mode = next((e for e in container.get("env") or [] if e.get("name") == DEV_MODE_ENV), None)
    if dev_mode is not None and "valueFrom" not in dev_mode:
        value = str(dev_mode.get("value", ""))
        try:
            enabled = int(value) != 0
        except ValueError:
            enabled = False
        if not enabled:
            problems.append(
                f"{where}.env sets {DEV_MODE_ENV}={value!r}; vLLM serves its weight-transfer routes only with "
                f"{DEV_MODE_ENV}=1 (leave it out and the operator sets it)"
            )
    words = command_words(container)
    config = flag_value(words, CONFIG_FLAG)
    if config is None:
        problems.append(
            f"{where}: the engine's command line needs {CONFIG_FLAG} '{{\"backend\": \"nccl\"}}' "
            "(vLLM builds its weight-transfer engine only with it)"
        )
    else:
        try:
            backend = json.loads(config).get("backend", "nccl")
        except (ValueError, AttributeError):
            backend = None
        if backend != "nccl":
            problems.append(f"{where}: {CONFIG_FLAG} {config!r} must be JSON with backend nccl")
    port_text = flag_value(words, PORT_FLAG)
    try:
        port = int(port_text) if port_text is not None else DEFAULT_VLLM_PORT
    except ValueError:
        port = -1
    if port != spec.engine.port:
        said = f"{PORT_FLAG} {port_text}" if port_text is not None else f"no {PORT_FLAG} (vLLM's default 8000)"
        problems.append(
            f"{where}: the engine's command line has {said}, but spec.engine.port is {spec.engine.port}: "
            "make them equal"
        )
    return problems


def add_engine_wiring(container: Obj, spec: WeightSyncSpec) -> None:
    """The engine container as the protocol needs it: dev mode on, readiness from the server's /health."""
    env = container.get("env") or []
    if not any(e.get("name") == DEV_MODE_ENV for e in env):
        container["env"] = [*env, {"name": DEV_MODE_ENV, "value": "1"}]
    container.setdefault(
        "readinessProbe",
        {"httpGet": {"path": HEALTH_PATH, "port": spec.engine.port}, "periodSeconds": 2, "failureThreshold": 3},
    )
