"""The sandbox enforces NetworkPolicy ingress (sandbox/netpolicy.py) in each pod's network namespace.

(1) A policy written by hand: the client it admits connects, another pod of the namespace is refused, the
isolated pod's own outbound connections get their replies, the node (probes) still reaches it, and a label
change or the policy's deletion is followed. (2) The operator's own policy: a pod of the namespace outside
the WeightSync group cannot reach the trainer's rendezvous (store) port, the group's members can, also
across a node-agent restart. (That a real group forms and syncs under it: tests/e2e/test_demo.py.)
"""

from __future__ import annotations

import socket
import textwrap
from typing import Any

import pytest
import yaml
from weightsync.operator import constants as c
from weightsync.sandbox import Sandbox
from weightsync.sandbox.firewall import Iptables
from weightsync.sandbox.waiting import wait_for

from . import test_operator as op
from .conftest import OperatorProcess
from .test_sandbox import get, python_pod, wait_log, wait_phase

pytestmark = pytest.mark.cluster

TIMEOUT_S = 30.0

#: Greets every connection on each port given, with the pod's name.
GREETER = """
    import os, socket, sys, threading
    def serve(port):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port)); s.listen()
        while True:
            conn, _ = s.accept(); conn.sendall(os.environ["HOSTNAME"].encode()); conn.close()
    ports = [int(p) for p in sys.argv[1:]]
    for p in ports[1:]:
        threading.Thread(target=serve, args=(p,), daemon=True).start()
    print("listening", flush=True)
    serve(ports[0])
"""

#: Connects from inside a pod: prints what the peer sent, or `refused`.
CONNECT = textwrap.dedent("""
    import socket, sys
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
            print("connected", s.recv(100).decode())
    except ConnectionRefusedError:
        print("refused")
    except OSError as e:
        print("error", e)
""")


@pytest.fixture
def enforced(sandbox: Sandbox) -> None:
    found = sandbox.network_policy
    if not isinstance(found, Iptables):
        pytest.skip(f"the sandbox does not enforce NetworkPolicy: {found}")


def greeter(name: str, *ports: int, **labels: str) -> dict[str, Any]:
    pod = python_pod(name, GREETER, metadata={"labels": labels}, hostname=name)
    pod["spec"]["containers"][0]["command"] += [str(p) for p in ports]
    return pod


def connect(sandbox: Sandbox, namespace: str, pod: str, address: str, port: int) -> str:
    proc = sandbox.exec_in_pod(namespace, pod, "python", "-c", CONNECT, address, str(port))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def wait_connect(sandbox: Sandbox, namespace: str, pod: str, address: str, port: int, want: str) -> None:
    wait_for(lambda: connect(sandbox, namespace, pod, address, port) == want, TIMEOUT_S,
             f"{pod} -> {address}:{port} to give {want!r}",
             describe=lambda: connect(sandbox, namespace, pod, address, port))


def start(sandbox: Sandbox, namespace: str, *pods: dict[str, Any]) -> dict[str, str]:
    """Starts the pods; their addresses once each listens."""
    sandbox.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(pods))
    addresses = {}
    for pod in pods:
        name = pod["metadata"]["name"]
        addresses[name] = wait_phase(sandbox, namespace, name, "Running")["status"]["podIP"]
        wait_log(sandbox, namespace, name, "listening")
    return addresses


def from_host(address: str, port: int) -> str:
    with socket.create_connection((address, port), timeout=5) as s:
        return s.recv(100).decode()


def test_a_policy_admits_its_peers_and_ports_only(sandbox: Sandbox, namespace: str, enforced: None) -> None:
    ip = start(
        sandbox, namespace,
        greeter("server", 8080, 8081, app="server"), greeter("client", 8080, role="client"),
        greeter("other", 8080, role="other"),
    )  # fmt: skip
    assert connect(sandbox, namespace, "other", ip["server"], 8080) == "connected server", "open by default"

    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "server"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "server"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}], "ports": [{"port": 8080}]}],
        },
    }
    sandbox.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(policy))
    wait_connect(sandbox, namespace, "other", ip["server"], 8080, "refused")
    assert connect(sandbox, namespace, "client", ip["server"], 8080) == "connected server"
    assert connect(sandbox, namespace, "client", ip["server"], 8081) == "refused", "a port the policy omits"
    # the isolated pod's own connections get their replies; the node reaches it (probes, as on real CNIs)
    assert connect(sandbox, namespace, "server", ip["other"], 8080) == "connected other"
    assert from_host(ip["server"], 8081) == "server"
    # a pod the policy selects is isolated before its containers start, with the peers that exist then
    late = start(sandbox, namespace, greeter("late", 8080, app="server"))["late"]
    assert connect(sandbox, namespace, "other", late, 8080) == "refused"
    assert connect(sandbox, namespace, "client", late, 8080) == "connected late"

    sandbox.kubectl("label", "pod", "other", "-n", namespace, "role=client", "--overwrite")
    wait_connect(sandbox, namespace, "other", ip["server"], 8080, "connected server")
    sandbox.kubectl("delete", "networkpolicy", "server", "-n", namespace)
    wait_connect(sandbox, namespace, "client", ip["server"], 8081, "connected server")


def test_a_pod_outside_the_group_cannot_reach_the_trainers_store(
    sandbox: Sandbox, namespace: str, operator: OperatorProcess, enforced: None
) -> None:
    """The operator's NetworkPolicy: the trainer's rendezvous port admits the group's members only (the
    operator runs on the host here, which is always admitted)."""
    port = 29600
    store = textwrap.dedent(GREETER).replace("ports = [int(p) for p in sys.argv[1:]]", f"ports = [{port}]")
    trainer = op.template(container={"command": ["python", "-u", "-c", store]})
    op.apply(sandbox, namespace, op.manifest(replicas=1, rendezvous={"port": port}, trainer_template=trainer))
    op.wait_ready(sandbox, namespace, 0, 2)
    assert get(sandbox, namespace, "networkpolicy", "ws") is not None
    members = op.pods(sandbox, namespace)
    trainer_pod = next(p for p in members.values() if p["metadata"]["labels"].get(c.ROLE_LABEL) == "trainer")
    inference_pod = next(p for p in members.values() if p is not trainer_pod)
    store_ip, trainer_name = trainer_pod["status"]["podIP"], trainer_pod["metadata"]["name"]
    greeting = f"connected {trainer_pod['spec'].get('hostname') or trainer_name}"
    wait_log(sandbox, namespace, trainer_name, "listening")
    outsider = start(sandbox, namespace, greeter("outsider", 8080))["outsider"]

    wait_connect(sandbox, namespace, inference_pod["metadata"]["name"], store_ip, port, greeting)
    assert connect(sandbox, namespace, "outsider", store_ip, port) == "refused"
    assert connect(sandbox, namespace, trainer_name, outsider, 8080) == "connected outsider", "egress is open"
    # a restarted node agent keeps the rules: it recomputes them only once it has listed the policies
    sandbox.restart("node-agent")
    assert connect(sandbox, namespace, "outsider", store_ip, port) == "refused"
    assert connect(sandbox, namespace, inference_pod["metadata"]["name"], store_ip, port) == greeting
