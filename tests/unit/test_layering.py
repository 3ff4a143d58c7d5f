"""The layering the README describes, enforced on every module's imports (read from the source, not run).

- The operator's planning modules are pure: no kopf, no Kubernetes client, no I/O layer of the operator.
- The runtime never imports the operator, kopf or the Kubernetes client (it runs in user pods).
- The shared contract and the API models import neither torch, the runtime nor the operator.
- The sandbox is a test cluster: the product never imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: package directory -> its import name (setup's package-dir)
PACKAGES = {"operator": "weightsync.operator", "runtime": "weightsync.runtime", "sandbox": "weightsync.sandbox",
            "weightsync": "weightsync"}  # fmt: skip
CLIENTS = ("kopf", "kubernetes")
#: The operator's I/O layer; every other module of it is pure, new ones included.
IO_MODULES = ("kube", "handlers", "reconcile", "metrics", "informer", "__main__")
OPERATOR_IO = tuple(f"weightsync.operator.{m}" for m in IO_MODULES)
PURE_OPERATOR = sorted(p.stem for p in (ROOT / "operator").glob("*.py") if p.stem not in IO_MODULES)


def imports_of(path: Path, package: str) -> set[str]:
    """Every module `path` imports, relative imports resolved against `package`."""
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
                out.update({module, *(f"{module}.{alias.name}" for alias in node.names)})
            elif node.module:
                out.add(node.module)
    return out


def modules(directory: str) -> list[tuple[str, Path]]:
    package = PACKAGES[directory]
    return [(f"{package}.{p.relative_to(ROOT / directory).with_suffix('').as_posix().replace('/', '.')}", p)
            for p in sorted((ROOT / directory).rglob("*.py"))]  # fmt: skip


def offending(imported: set[str], banned: tuple[str, ...]) -> list[str]:
    return sorted(m for m in imported if any(m == b or m.startswith(b + ".") for b in banned))


@pytest.mark.parametrize("name", PURE_OPERATOR)
def test_the_operators_planning_modules_are_pure(name: str) -> None:
    imported = imports_of(ROOT / "operator" / f"{name}.py", "weightsync.operator")
    assert offending(imported, (*CLIENTS, *OPERATOR_IO)) == []


@pytest.mark.parametrize(("module", "path"), modules("runtime"), ids=lambda x: str(x).rsplit(".", 1)[-1])
def test_the_runtime_never_imports_the_operator_or_a_cluster_client(module: str, path: Path) -> None:
    imported = imports_of(path, module.rsplit(".", 1)[0])
    assert offending(imported, ("weightsync.operator", "weightsync.sandbox", *CLIENTS)) == []


STANDALONE = [ROOT / "weightsync" / "contract.py", *sorted((ROOT / "weightsync" / "api").glob("*.py"))]


@pytest.mark.parametrize("path", STANDALONE, ids=lambda p: p.name)
def test_the_contract_and_the_api_models_stand_alone(path: Path) -> None:
    imported = imports_of(path, "weightsync")
    assert (
        offending(imported, ("torch", "weightsync.runtime", "weightsync.operator", "weightsync.sandbox", *CLIENTS))
        == []
    )


@pytest.mark.parametrize("directory", ["operator", "runtime"])
def test_the_product_never_imports_the_sandbox(directory: str) -> None:
    for module, path in modules(directory):
        assert offending(imports_of(path, module.rsplit(".", 1)[0]), ("weightsync.sandbox",)) == [], module


def test_the_check_sees_a_banned_import() -> None:
    """The scan itself: a relative import of the operator's client layer is resolved and caught."""
    probe = ROOT / "operator" / "plan.py"
    imported = imports_of(probe, "weightsync.operator")
    assert "weightsync.operator.desired" in imported  # `from . import desired` resolves
    assert offending({"weightsync.operator.kube.Kube", "kopf"}, OPERATOR_IO + CLIENTS) == [
        "kopf",
        "weightsync.operator.kube.Kube",
    ]
