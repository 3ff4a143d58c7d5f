"""The env contract: parsing, errors that name the variable, and the round trip the operator relies on."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic.fields import FieldInfo
from weightsync.operator import desired

from weightsync import contract
from weightsync.api import models
from weightsync.contract import (
    OTHER_PREFIXES,
    OTHER_VARIABLES,
    ContractError,
    MemberEnv,
    markdown_table,
    read_annotations,
    read_epoch,
    reserved_env_names,
)

ROOT = Path(__file__).resolve().parents[2]

BASE = {
    "WEIGHTSYNC_NAME": "demo", "WEIGHTSYNC_NAMESPACE": "ml", "WEIGHTSYNC_ROLE": "inference",
    "WEIGHTSYNC_MASTER_ADDR": "demo-trainer-0.demo.ml.svc.cluster.local", "WEIGHTSYNC_MASTER_PORT": "29500",
    "WEIGHTSYNC_WORLD_SIZE": "5", "WEIGHTSYNC_RANK_OFFSET": "3", "WEIGHTSYNC_LOCAL_WORLD_SIZE": "2",
    "WEIGHTSYNC_BACKEND": "gloo", "WEIGHTSYNC_TOKEN": "x" * 32,
}


def test_a_complete_environment_parses_and_round_trips() -> None:
    env = MemberEnv.from_env(BASE)
    assert (env.rank_offset, env.local_world_size, env.world_size, env.backend) == (3, 2, 5, "gloo")
    assert env.buffer_bytes == 1 << 30 and env.num_buffers == 2 and env.packed
    assert MemberEnv.from_env(env.to_env()) == env
    assert set(env.to_env()) == reserved_env_names()


@pytest.mark.parametrize(("change", "message"), [
    ({"WEIGHTSYNC_WORLD_SIZE": None}, "WEIGHTSYNC_WORLD_SIZE: not set"),
    ({"WEIGHTSYNC_MASTER_PORT": "http"}, "WEIGHTSYNC_MASTER_PORT: Input should be a valid integer"),
    ({"WEIGHTSYNC_MASTER_PORT": "70000"}, "WEIGHTSYNC_MASTER_PORT"),
    ({"WEIGHTSYNC_BACKEND": "mpi"}, "WEIGHTSYNC_BACKEND: Input should be 'nccl' or 'gloo'"),
    ({"WEIGHTSYNC_TOKEN": "short"}, "WEIGHTSYNC_TOKEN"),
    ({"WEIGHTSYNC_RANK_OFFSET": "4"}, "WEIGHTSYNC_RANK_OFFSET (4) + WEIGHTSYNC_LOCAL_WORLD_SIZE (2) exceeds"),
    ({"WEIGHTSYNC_RANK_OFFSET": "0"}, "rank 0 belongs to the trainer"),
    ({"WEIGHTSYNC_MASTER_ADDR": "tcp://trainer:29500"},
     "WEIGHTSYNC_MASTER_ADDR: Value error, 'tcp://trainer:29500' is not a DNS name or an IP address: a host only, "
     "without a scheme"),
    ({"WEIGHTSYNC_MASTER_ADDR": "trainer:29500"}, "a host only (the port is its own variable)"),
    ({"WEIGHTSYNC_MASTER_ADDR": "[fd00::1]"}, "an IPv6 address goes without brackets"),
    ({"WEIGHTSYNC_MASTER_ADDR": "demo trainer"}, "WEIGHTSYNC_MASTER_ADDR: Value error, 'demo trainer' is not a DNS"),
    ({"WEIGHTSYNC_MASTER_ADDR": "a" * 64 + ".svc"}, "is not a DNS name"),
    ({"WEIGHTSYNC_ENDPOINTS": "demo-inference-0.demo,demo inference-1"}, "WEIGHTSYNC_ENDPOINTS: Value error, "
                                                                         "'demo inference-1' is not a DNS name"),
])
def test_a_bad_variable_is_named(change: dict[str, str | None], message: str) -> None:
    environ = {**BASE, **change}
    environ = {k: v for k, v in environ.items() if v is not None}
    with pytest.raises(ContractError) as err:
        MemberEnv.from_env(environ)
    assert message in str(err.value)


@pytest.mark.parametrize("host", ["10.0.0.7", "fd00::1", "localhost", "demo-trainer-0.demo.ml.svc.cluster.local.",
                                  "trainer_0.example"])
def test_a_master_address_is_any_dns_name_or_ip_address(host: str) -> None:
    assert MemberEnv.from_env({**BASE, "WEIGHTSYNC_MASTER_ADDR": host}).master_addr == host


def test_the_token_never_shows_in_the_repr() -> None:
    assert "x" * 32 not in repr(MemberEnv.from_env(BASE))


def test_the_epoch_comes_from_the_downward_api_file(tmp_path) -> None:
    annotations = tmp_path / "annotations"
    assert read_epoch(annotations, default=2) == 2
    annotations.write_text('kubectl.kubernetes.io/x="1"\nweightsync.dev/epoch="7"\n')
    assert read_epoch(annotations) == 7
    env = MemberEnv.from_env({**BASE, "WEIGHTSYNC_ANNOTATIONS_FILE": str(annotations)})
    assert env.current_epoch() == 7


def test_the_contract_imports_without_torch_or_kopf() -> None:
    code = ("import sys, weightsync.contract, weightsync.api; "
            "bad = [m for m in ('torch', 'kopf', 'kubernetes') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_reference_table_lists_every_variable() -> None:
    table = markdown_table()
    assert all(f"`{name}`" in table for name in reserved_env_names())


# --- bounds: the same as the CRD's, and finite -------------------------------------------------------------


@pytest.mark.parametrize(("variable", "value", "allowed"), [
    ("WEIGHTSYNC_TIMEOUT_SECONDS", "inf", "allowed: > 0, <= 86400, finite"),
    ("WEIGHTSYNC_TIMEOUT_SECONDS", "-inf", "allowed: > 0, <= 86400, finite"),
    ("WEIGHTSYNC_TIMEOUT_SECONDS", "nan", "allowed: > 0, <= 86400, finite"),
    ("WEIGHTSYNC_TIMEOUT_SECONDS", "NaN", "allowed: > 0, <= 86400, finite"),
    ("WEIGHTSYNC_TIMEOUT_SECONDS", "1e20", "allowed: > 0, <= 86400, finite"),
    ("WEIGHTSYNC_TIMEOUT_SECONDS", "86401", "allowed: > 0, <= 86400, finite"),
    ("WEIGHTSYNC_TIMEOUT_SECONDS", "0", "allowed: > 0, <= 86400, finite"),
    ("WEIGHTSYNC_BUFFER_BYTES", str(1 << 37), "allowed: >= 65536, <= 68719476736"),
    ("WEIGHTSYNC_BUFFER_BYTES", "1024", "allowed: >= 65536, <= 68719476736"),
    ("WEIGHTSYNC_NUM_BUFFERS", "9", "allowed: >= 1, <= 8"),
    ("WEIGHTSYNC_MASTER_PORT", "0", "allowed: >= 1, <= 65535"),
    ("WEIGHTSYNC_WORLD_SIZE", "40000", "allowed: >= 2, <= 32769"),
    ("WEIGHTSYNC_LOCAL_WORLD_SIZE", "65", "allowed: >= 1, <= 64"),
    ("WEIGHTSYNC_RANK_OFFSET", "99999", "allowed: >= 0, <= 32768"),
])
def test_a_value_out_of_the_crds_bounds_is_refused_naming_the_variable_and_the_range(
    variable: str, value: str, allowed: str
) -> None:
    with pytest.raises(ContractError) as err:
        MemberEnv.from_env({**BASE, variable: value})
    message = str(err.value)
    assert f"{variable}: " in message and repr(value) in message and allowed in message, message


def test_the_largest_and_smallest_values_the_crd_allows_are_accepted() -> None:
    env = MemberEnv.from_env({**BASE, "WEIGHTSYNC_TIMEOUT_SECONDS": "86400", "WEIGHTSYNC_BUFFER_BYTES": str(1 << 36)})
    assert (env.timeout_seconds, env.buffer_bytes) == (86400.0, 1 << 36)
    env = MemberEnv.from_env({**BASE, "WEIGHTSYNC_TIMEOUT_SECONDS": "0.001", "WEIGHTSYNC_BUFFER_BYTES": "65536"})
    assert (env.timeout_seconds, env.buffer_bytes) == (0.001, 1 << 16)


def _numeric(field: FieldInfo) -> dict[str, Any]:
    return {a: getattr(m, a) for m in field.metadata for a in ("gt", "ge", "lt", "le") if hasattr(m, a)}


def test_every_bound_matches_the_crd_field_the_operator_writes_the_variable_from() -> None:
    """operator/desired.py's member_env: which spec field feeds which variable."""
    env = MemberEnv.model_fields
    same = {
        "master_port": models.RendezvousSpec.model_fields["port"],
        "timeout_seconds": models.RendezvousSpec.model_fields["timeout_seconds"],
        "buffer_bytes": models.TransportSpec.model_fields["buffer_size_bytes"],
        "num_buffers": models.TransportSpec.model_fields["num_buffers"],
        "local_world_size": models.InferenceSpec.model_fields["workers_per_replica"],  # the trainer's 1 too
    }
    for name, crd_field in same.items():
        assert _numeric(env[name]) == _numeric(crd_field), name
    replicas = _numeric(models.InferenceSpec.model_fields["replicas"])
    workers = _numeric(models.InferenceSpec.model_fields["workers_per_replica"])
    smallest, largest = 1 + replicas["ge"] * workers["ge"], 1 + replicas["le"] * workers["le"]
    assert _numeric(env["world_size"]) == {"ge": smallest, "le": largest}
    assert _numeric(env["rank_offset"]) == {"ge": 0, "le": largest - 1}


@pytest.mark.parametrize("extreme", ["largest", "smallest"])
def test_what_the_operator_writes_at_the_crds_extremes_is_accepted(extreme: str) -> None:
    tmpl = {"spec": {"containers": [{"name": "main", "image": "img"}]}}
    if extreme == "largest":
        inference = {"replicas": models.MAX_REPLICAS, "workersPerReplica": models.MAX_WORKERS_PER_REPLICA}
        rendezvous = {"port": 65535, "timeoutSeconds": 86400}
        transport = {"bufferSizeBytes": 1 << 36, "numBuffers": 8}
    else:
        inference = {"replicas": 1, "workersPerReplica": 1}
        rendezvous = {"port": 1, "timeoutSeconds": 1e-05}
        transport = {"bufferSizeBytes": 1 << 16, "numBuffers": 1}
    spec = models.parse_spec({
        "trainer": {"template": tmpl}, "inference": {**inference, "template": tmpl},
        "rendezvous": rendezvous, "transport": transport,
    })
    group = desired.Group("ws", "ml", "uid", spec, epoch=12)
    for slot in desired.slots("ws", spec)[:: max(1, spec.inference.replicas // 7)]:
        written = {e["name"]: e["value"] for e in desired.env_vars(group, slot) if "value" in e}
        env = MemberEnv.from_env({**written, "WEIGHTSYNC_TOKEN": "t" * 32})
        assert env == desired.member_env(group, slot).model_copy(update={"token": "t" * 32})


# --- misspelled variables are warned about -------------------------------------------------------------


@pytest.fixture
def warnings_log(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> pytest.LogCaptureFixture:
    monkeypatch.setattr(contract, "_warned", set())  # a fresh process, as far as warned-once goes
    caplog.set_level(logging.WARNING, logger="weightsync")
    return caplog


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("weightsync") and r.levelno == logging.WARNING]


def test_a_misspelled_variable_is_warned_about_once_with_the_closest_name(
    warnings_log: pytest.LogCaptureFixture,
) -> None:
    environ = {**BASE, "WEIGHTSYNC_TIMEOUT_SECOND": "5", "WEIGHTSYNC_NUM_BUFFER": "4"}
    env = MemberEnv.from_env(environ)
    assert env.timeout_seconds == 300.0  # ignored, as the warning says
    MemberEnv.from_env(environ)
    assert _warnings(warnings_log) == [
        "WEIGHTSYNC_NUM_BUFFER is not a weightsync variable (did you mean WEIGHTSYNC_NUM_BUFFERS?); ignored",
        "WEIGHTSYNC_TIMEOUT_SECOND is not a weightsync variable (did you mean WEIGHTSYNC_TIMEOUT_SECONDS?); ignored",
    ]


@pytest.mark.parametrize(("variable", "hint"), [
    ("WEIGHTSYNC_PORT", " (did you mean WEIGHTSYNC_MASTER_PORT?)"),
    ("weightsync_checksums", " (did you mean WEIGHTSYNC_CHECKSUMS?)"),
    ("WEIGHTSYNC_NCCL_LIB", " (did you mean WEIGHTSYNC_NCCL_LIBRARY?)"),
    ("WEIGHTSYNC_FROBNICATE", ""),
])
def test_the_hint_names_the_likely_variable_or_none(
    warnings_log: pytest.LogCaptureFixture, variable: str, hint: str
) -> None:
    MemberEnv.from_env({**BASE, variable: "1"})
    assert _warnings(warnings_log) == [f"{variable} is not a weightsync variable{hint}; ignored"]


def test_variables_the_project_reads_elsewhere_are_not_warned_about(warnings_log: pytest.LogCaptureFixture) -> None:
    others = {"WEIGHTSYNC_NCCL_LIBRARY": "/usr/lib/libnccl.so.2", "WEIGHTSYNC_SANDBOX_STATE": "/tmp/sb",
              "WEIGHTSYNC_SANDBOX_NODE_GPUS": "2", "WEIGHTSYNC_CACHE": "/tmp/c", "NCCL_DEBUG": "INFO"}
    MemberEnv.from_env({**BASE, **others})
    assert _warnings(warnings_log) == []


def test_a_missing_variable_names_a_misspelling_that_is_set(warnings_log: pytest.LogCaptureFixture) -> None:
    environ = {k: v for k, v in BASE.items() if k != "WEIGHTSYNC_WORLD_SIZE"} | {"WEIGHTSYNC_WORLDSIZE": "5"}
    with pytest.raises(ContractError, match=r"WEIGHTSYNC_WORLD_SIZE: not set \(WEIGHTSYNC_WORLDSIZE is set"):
        MemberEnv.from_env(environ)


def test_the_allow_list_holds_every_weightsync_variable_the_project_reads() -> None:
    """A new WEIGHTSYNC_* setting elsewhere in the project must go into OTHER_VARIABLES (or the contract), or
    every member would warn about it."""
    found: dict[str, str] = {}
    for folder in ("weightsync", "runtime", "operator", "sandbox", "bench", "hack", "examples", "docker", "charts"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix not in (".py", ".sh", ".yaml", ".yml", ".Dockerfile", ".tpl") or not path.is_file():
                continue
            if path != ROOT / "weightsync" / "contract.py":  # the allow-list itself, and its examples
                for name in re.findall(r"\bWEIGHTSYNC_[A-Z0-9_]*[A-Z0-9]", path.read_text(errors="replace")):
                    found.setdefault(name, str(path.relative_to(ROOT)))
    unknown = {n: where for n, where in found.items()
               if n not in reserved_env_names() and n not in OTHER_VARIABLES and not n.startswith(OTHER_PREFIXES)}
    assert not unknown, f"add these to weightsync.contract.OTHER_VARIABLES: {unknown}"


# --- the annotations file ------------------------------------------------------------------------------


def test_an_absent_annotations_file_is_empty(tmp_path: Path) -> None:
    assert read_annotations(tmp_path / "absent") == {}
    env = MemberEnv.from_env({**BASE, "WEIGHTSYNC_ANNOTATIONS_FILE": str(tmp_path / "absent")})
    assert env.membership() == (0, 5)


@pytest.mark.parametrize(("line", "key", "shown"), [
    ('weightsync.dev/last-sync="{\\"version\\": 3', "weightsync.dev/last-sync", "is not a JSON string"),
    ('weightsync.dev/epoch="7', "weightsync.dev/epoch", "is not a JSON string"),
    ('weightsync.dev/epoch="seven"', "weightsync.dev/epoch", "'seven' is not a non-negative integer"),
    ('weightsync.dev/epoch="-1"', "weightsync.dev/epoch", "'-1' is not a non-negative integer"),
    ('weightsync.dev/epoch="1.5"', "weightsync.dev/epoch", "'1.5' is not a non-negative integer"),
    ('weightsync.dev/world-size=""', "weightsync.dev/world-size", "'' is not a non-negative integer"),
    ('weightsync.dev/world-size="3 "', "weightsync.dev/world-size", "'3 ' is not a non-negative integer"),
])
def test_a_malformed_annotation_names_the_file_and_the_key(tmp_path: Path, line: str, key: str, shown: str) -> None:
    path = tmp_path / "annotations"
    path.write_text(f'kubectl.kubernetes.io/x="1"\n{line}\nweightsync.dev/world-size="3"\n')
    env = MemberEnv.from_env({**BASE, "WEIGHTSYNC_ANNOTATIONS_FILE": str(path)})
    for read in (env.membership, env.current_epoch, lambda: read_epoch(path)):
        with pytest.raises(ContractError) as err:
            read()
        message = str(err.value)
        assert str(path) in message and f"annotation {key}:" in message and shown in message, message


def test_a_long_bad_value_is_truncated_in_the_error(tmp_path: Path) -> None:
    path = tmp_path / "annotations"
    path.write_text(f'weightsync.dev/epoch="{"9" * 5000}x"\n')
    with pytest.raises(ContractError) as err:
        read_annotations(path)
    assert str(path) in str(err.value) and "weightsync.dev/epoch" in str(err.value)
    assert len(str(err.value)) < 300


def test_a_huge_annotations_file_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    path = tmp_path / "annotations"
    with path.open("w") as f:
        f.write('weightsync.dev/epoch="1"\n')
        f.truncate(64 << 20)  # sparse: 64 MiB of NULs
    with pytest.raises(ContractError, match=r"larger than 1048576 bytes") as err:
        read_annotations(path)
    assert str(path) in str(err.value)


def test_an_unreadable_annotations_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match="cannot be read") as err:
        read_annotations(tmp_path)  # a directory
    assert str(tmp_path) in str(err.value)
