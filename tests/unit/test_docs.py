"""docs/: the generated references match the code, and the guide's links and commands point at real things."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import yaml

from weightsync.contract import MemberEnv, env_name

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def _gen_docs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "hack" / "gen_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_env_reference_is_generated_from_the_contract() -> None:
    gen = _gen_docs()
    assert gen.ENV_DOC.read_text() == gen.render(), "docs/reference/env.md is out of date: run python hack/gen_docs.py"
    assert gen.main(["--check"]) == 0


def test_env_reference_names_every_variable_of_the_contract() -> None:
    text = (DOCS / "reference" / "env.md").read_text()
    for field in MemberEnv.model_fields:
        assert f"`{env_name(field)}`" in text


def test_relative_links_in_the_docs_resolve() -> None:
    broken = []
    for doc in [*DOCS.rglob("*.md"), ROOT / "examples" / "demo" / "README.md"]:
        if not doc.exists():
            continue
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_the_guide_shows_the_example_manifest_that_is_checked_in() -> None:
    """The WeightSync the guide walks through is examples/demo.yaml, verbatim (so it stays valid)."""
    guide = (DOCS / "guide.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", guide, flags=re.S)
    example = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    assert any(yaml.safe_load(b) == example for b in blocks), "docs/guide.md must show examples/demo.yaml"
