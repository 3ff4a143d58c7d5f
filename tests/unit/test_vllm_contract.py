"""The env contract of protocol `vllm`: the engines' base URLs, the pause mode and the rendezvous form."""

from __future__ import annotations

from pathlib import Path

import pytest

from weightsync.contract import ENDPOINTS_ANNOTATION, EPOCH_ANNOTATION, ContractError, MemberEnv, check_base_url

TRAINER = {
    "WEIGHTSYNC_NAME": "rl", "WEIGHTSYNC_NAMESPACE": "ml", "WEIGHTSYNC_ROLE": "trainer",
    "WEIGHTSYNC_MASTER_ADDR": "rl-trainer-0.rl.ml.svc.cluster.local", "WEIGHTSYNC_WORLD_SIZE": "5",
    "WEIGHTSYNC_RANK_OFFSET": "0", "WEIGHTSYNC_LOCAL_WORLD_SIZE": "1", "WEIGHTSYNC_TOKEN": "x" * 32,
    "WEIGHTSYNC_PROTOCOL": "vllm", "WEIGHTSYNC_ANNOTATIONS_FILE": "/nonexistent/annotations",
    "WEIGHTSYNC_ENDPOINTS": "rl-inference-0.rl.ml.svc.cluster.local,rl-inference-1.rl.ml.svc.cluster.local",
}


def test_the_defaults_and_the_variable_names() -> None:
    env = MemberEnv.from_env(TRAINER)
    assert (env.engine_port, env.engine_urls, env.vllm_pause_mode, env.vllm_rendezvous) == (
        8000, (), "keep", "unique-id")
    written = env.to_env()
    assert written["WEIGHTSYNC_ENGINE_PORT"] == "8000" and written["WEIGHTSYNC_ENGINE_URLS"] == ""
    assert written["WEIGHTSYNC_VLLM_PAUSE_MODE"] == "keep" and written["WEIGHTSYNC_VLLM_RENDEZVOUS"] == "unique-id"
    assert MemberEnv.from_env(written) == env


def test_the_engines_are_the_endpoints_on_the_engine_port() -> None:
    env = MemberEnv.from_env({**TRAINER, "WEIGHTSYNC_ENGINE_PORT": "8100"})
    assert env.engine_membership() == (0, 5, ("http://rl-inference-0.rl.ml.svc.cluster.local:8100",
                                              "http://rl-inference-1.rl.ml.svc.cluster.local:8100"))


def test_explicit_engine_urls_win_and_a_trailing_slash_is_dropped() -> None:
    env = MemberEnv.from_env({**TRAINER, "WEIGHTSYNC_ENGINE_URLS": "http://10.0.0.7:9000/,https://engine.example"})
    assert env.engine_urls == ("http://10.0.0.7:9000", "https://engine.example")
    assert env.engine_membership()[2] == env.engine_urls
    assert MemberEnv.from_env(env.to_env()) == env


def test_a_scale_changes_the_engines_through_the_endpoints_annotation(tmp_path: Path) -> None:
    annotations = tmp_path / "annotations"
    env = MemberEnv.from_env({**TRAINER, "WEIGHTSYNC_ANNOTATIONS_FILE": str(annotations)})
    annotations.write_text(f'{EPOCH_ANNOTATION}="3"\n{ENDPOINTS_ANNOTATION}="a.ns.svc,b.ns.svc,c.ns.svc"\n')
    assert env.engine_membership() == (3, 5, ("http://a.ns.svc:8000", "http://b.ns.svc:8000",
                                              "http://c.ns.svc:8000"))
    annotations.write_text(f'{ENDPOINTS_ANNOTATION}="fd00::7"\n')
    assert env.engine_membership()[2] == ("http://[fd00::7]:8000",)
    annotations.write_text(f'{ENDPOINTS_ANNOTATION}="a/b"\n')
    with pytest.raises(ContractError, match=r"annotation weightsync.dev/endpoints: endpoint 'a/b'"):
        env.engine_membership()
    annotations.write_text(f'{ENDPOINTS_ANNOTATION}="a.ns.svc,b ns.svc"\n')
    with pytest.raises(ContractError, match=r"endpoint 'b ns.svc' is not a host name: .*not a DNS name"):
        env.engine_membership()


@pytest.mark.parametrize(("url", "problem"), [
    ("ftp://h:1", "scheme"),
    ("http://user:pw@h:8000", "credentials"),
    ("http://h:8000/v1", "path"),
    ("http://h:8000?x=1", "query"),
    ("http://h:8000#top", "fragment"),
    ("http://h:99999", "out of range"),
    ("http://:8000", "no host"),
    ("h:8000", "scheme"),
])
def test_a_bad_engine_url_is_refused_naming_it(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        check_base_url(url)
    with pytest.raises(ContractError) as err:
        MemberEnv.from_env({**TRAINER, "WEIGHTSYNC_ENGINE_URLS": url})
    assert "WEIGHTSYNC_ENGINE_URLS" in str(err.value) and problem in str(err.value)


@pytest.mark.parametrize(("variable", "value"), [
    ("WEIGHTSYNC_VLLM_PAUSE_MODE", "drain"), ("WEIGHTSYNC_VLLM_RENDEZVOUS", "env"),
    ("WEIGHTSYNC_ENGINE_PORT", "0"), ("WEIGHTSYNC_ENGINE_PORT", "65536"),
])
def test_a_bad_vllm_setting_is_refused_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ContractError, match=variable):
        MemberEnv.from_env({**TRAINER, variable: value})
