"""The env contract: parsing, errors that name the variable, and the round trip the operator relies on."""

from __future__ import annotations

import subprocess
import sys

import pytest

from weightsync.contract import ContractError, MemberEnv, markdown_table, read_epoch, reserved_env_names

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
])
def test_a_bad_variable_is_named(change: dict[str, str | None], message: str) -> None:
    environ = {**BASE, **change}
    environ = {k: v for k, v in environ.items() if v is not None}
    with pytest.raises(ContractError) as err:
        MemberEnv.from_env(environ)
    assert message in str(err.value)


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
