"""The sandbox against its real control plane: pods are processes with their own network, files and names."""

from __future__ import annotations

import json
import socket
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from weightsync.sandbox import Sandbox
from weightsync.sandbox.network import netns_pids
from weightsync.sandbox.procs import alive
from weightsync.sandbox.waiting import wait_for

pytestmark = pytest.mark.cluster

TIMEOUT_S = 60.0


def apply(sandbox: Sandbox, namespace: str, *objects: dict[str, Any]) -> None:
    sandbox.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(objects))


def get(sandbox: Sandbox, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    proc = sandbox.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def pods(sandbox: Sandbox, namespace: str, selector: str) -> list[dict[str, Any]]:
    out = sandbox.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json").stdout
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def python_pod(name: str, script: str, **spec: Any) -> dict[str, Any]:
    """A pod whose one container runs `script` with the project's python (images are ignored)."""
    container = {
        "name": "main",
        "image": "ignored",
        "command": ["python", "-u", "-c", textwrap.dedent(script)],
    }
    container.update(spec.pop("container", {}))
    metadata = {"name": name, **spec.pop("metadata", {})}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {"terminationGracePeriodSeconds": 5, "containers": [container], **spec},
    }


def wait_phase(sandbox: Sandbox, namespace: str, name: str, phase: str) -> dict[str, Any]:
    """The pod once it is in `phase`; fails at once, with its status and log, when it ends in another one."""

    def describe() -> str:
        status = json.dumps((get(sandbox, namespace, "pod", name) or {}).get("status"))
        return f"{status}\nlog:\n{sandbox.pod_log(namespace, name, 'main')[-3000:]}"

    def check() -> dict[str, Any] | None:
        pod = get(sandbox, namespace, "pod", name)
        current = (pod or {}).get("status", {}).get("phase")
        return pod if current == phase or current in ("Succeeded", "Failed") else None  # ended: no more waiting

    pod = wait_for(check, TIMEOUT_S, f"pod {namespace}/{name} to be {phase}", describe=describe)
    assert pod["status"]["phase"] == phase, f"pod {namespace}/{name} ended {pod['status']['phase']}: {describe()}"
    return pod


def wait_log(sandbox: Sandbox, namespace: str, pod: str, text: str) -> str:
    return wait_for(
        lambda: (log := sandbox.pod_log(namespace, pod, "main")) and text in log and log,
        TIMEOUT_S,
        f"{text!r} in the log of pod {namespace}/{pod}",
        describe=lambda: sandbox.pod_log(namespace, pod, "main")[-2000:],
    )


def container_pid(pod: dict[str, Any]) -> int:
    return int(pod["status"]["containerStatuses"][0]["containerID"].removeprefix("sandbox://"))


HTTP_SERVER = """
    import http.server, os
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = os.environ["MY_POD_NAME"].encode()
            self.send_response(200); self.end_headers(); self.wfile.write(body)
    http.server.HTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""


def test_deployment_runs_a_process_and_deleting_the_pod_ends_it(sandbox: Sandbox, namespace: str) -> None:
    template = python_pod(
        "unused",
        HTTP_SERVER,
        container={
            "env": [{"name": "MY_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
            "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1},
            "livenessProbe": {"exec": {"command": ["python", "-c", "pass"]}, "periodSeconds": 2},
        },
    )
    apply(
        sandbox,
        namespace,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}}, "spec": template["spec"]},
            },
        },
    )
    sandbox.kubectl("rollout", "status", "deployment/web", "-n", namespace, "--timeout=60s")
    (pod,) = pods(sandbox, namespace, "app=web")
    name, ip, pid = pod["metadata"]["name"], pod["status"]["podIP"], container_pid(pod)
    assert alive(pid)
    with urllib.request.urlopen(f"http://{ip}:8080/", timeout=5) as resp:
        assert resp.read().decode() == name  # the real process answers, with its own pod name in its env

    sandbox.kubectl("delete", "pod", name, "-n", namespace, "--timeout=30s")
    assert not alive(pid)
    replacement = wait_for(
        lambda: [
            p
            for p in pods(sandbox, namespace, "app=web")
            if p["metadata"]["name"] != name and p["status"].get("phase") == "Running"
        ],
        TIMEOUT_S,
        "the ReplicaSet's replacement pod",
    )
    assert alive(container_pid(replacement[0]))


def test_graceful_deletion_sends_sigterm_then_sigkill_after_the_grace_period(
    sandbox: Sandbox, namespace: str
) -> None:
    stubborn = """
        import signal, subprocess, time
        subprocess.Popen(["python", "-c", "import time; time.sleep(600)"])  # a child in its process group
        signal.signal(signal.SIGTERM, lambda *_: print("got SIGTERM, ignoring it", flush=True))
        print("ready", flush=True)
        while True:
            time.sleep(0.1)
    """
    apply(sandbox, namespace, python_pod("stubborn", stubborn))
    pod = wait_phase(sandbox, namespace, "stubborn", "Running")
    wait_log(sandbox, namespace, "stubborn", "\nready")
    pids = netns_pids(sandbox.net.netns_name(pod["metadata"]["uid"]))
    assert len(pids) >= 2

    started = time.monotonic()
    sandbox.kubectl("delete", "pod", "stubborn", "-n", namespace, "--grace-period=2", "--timeout=30s")
    assert time.monotonic() - started >= 2.0  # the grace period was honoured
    assert "got SIGTERM" in sandbox.pod_log(namespace, "stubborn", "main")
    assert not [p for p in pids if alive(p)]


def test_owner_reference_garbage_collection(sandbox: Sandbox, namespace: str) -> None:
    parent = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "parent"}}
    apply(sandbox, namespace, parent)
    uid = get(sandbox, namespace, "configmap", "parent")["metadata"]["uid"]  # type: ignore[index]
    owner = {"apiVersion": "v1", "kind": "ConfigMap", "name": "parent", "uid": uid}
    child_pod = python_pod("child", "import time; time.sleep(600)", metadata={"ownerReferences": [owner]})
    apply(
        sandbox,
        namespace,
        child_pod,
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "child", "ownerReferences": [owner]}},
    )
    pid = container_pid(wait_phase(sandbox, namespace, "child", "Running"))

    sandbox.kubectl("delete", "configmap", "parent", "-n", namespace)
    wait_for(lambda: get(sandbox, namespace, "secret", "child") is None, TIMEOUT_S, "the child Secret to go")
    wait_for(lambda: get(sandbox, namespace, "pod", "child") is None, TIMEOUT_S, "the child pod to go")
    assert not alive(pid)


ENV_AND_FILES = """
    import json, os, time
    keys = ["MY_NAME", "MY_NAMESPACE", "MY_IP", "MY_EPOCH", "MY_ROLE", "MY_TOKEN", "MY_MODE", "COMPOSED"]
    print("ENV " + json.dumps({k: os.environ.get(k) for k in keys}))
    last = None
    while True:
        with open("/etc/weightsync/podinfo/annotations") as f:
            text = f.read()
        if text != last:
            print("FILE " + json.dumps(text)); last = text
        time.sleep(0.1)
"""


def test_env_value_from_and_downward_api_files(sandbox: Sandbox, namespace: str) -> None:
    apply(
        sandbox,
        namespace,
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"token": "s3cret"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"mode": "fast"}},
    )

    def member(name: str, epoch: str) -> dict[str, Any]:
        ref = {"fieldRef": {"fieldPath": "metadata.annotations['weightsync.dev/epoch']"}}
        return python_pod(
            name,
            ENV_AND_FILES,
            metadata={"labels": {"role": "trainer"}, "annotations": {"weightsync.dev/epoch": epoch}},
            container={
                "env": [
                    {"name": "MY_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "MY_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "MY_EPOCH", "valueFrom": ref},
                    {"name": "MY_ROLE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['role']"}}},
                    {"name": "MY_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "token"}}},
                    {"name": "MY_MODE", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "mode"}}},
                    {"name": "COMPOSED", "value": "$(MY_NAME)@$(MY_MODE)"},
                ],
                "volumeMounts": [{"name": "podinfo", "mountPath": "/etc/weightsync/podinfo"}],
            },
            volumes=[
                {
                    "name": "podinfo",
                    "downwardAPI": {
                        "items": [{"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]
                    },
                }
            ],
        )

    gpu_member = member("b", "7")
    gpu_member["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": 2}}  # schedules here too
    apply(sandbox, namespace, member("a", "1"), gpu_member)
    ip = wait_phase(sandbox, namespace, "a", "Running")["status"]["podIP"]
    log = wait_log(sandbox, namespace, "a", "\nENV ")
    env = json.loads(next(line for line in log.splitlines() if line.startswith("ENV "))[4:])
    assert env == {
        "MY_NAME": "a",
        "MY_NAMESPACE": namespace,
        "MY_IP": ip,
        "MY_EPOCH": "1",
        "MY_ROLE": "trainer",
        "MY_TOKEN": "s3cret",
        "MY_MODE": "fast",
        "COMPOSED": "a@fast",
    }
    # two pods on one node, one mountPath, each its own files
    wait_log(sandbox, namespace, "a", json.dumps('weightsync.dev/epoch="1"')[1:-1])
    wait_log(sandbox, namespace, "b", json.dumps('weightsync.dev/epoch="7"')[1:-1])

    sandbox.kubectl("annotate", "pod", "a", "-n", namespace, "--overwrite", "weightsync.dev/epoch=2")
    wait_log(sandbox, namespace, "a", json.dumps('weightsync.dev/epoch="2"')[1:-1])
    assert not Path("/etc/weightsync/podinfo/annotations").exists()  # the host's own /etc is untouched
    script = "hostname; cat /etc/weightsync/podinfo/annotations"
    inside = sandbox.exec_in_pod(namespace, "b", "sh", "-c", script)
    assert inside.returncode == 0 and inside.stdout.startswith("b\n") and 'epoch="7"' in inside.stdout


def test_pods_resolve_and_connect_by_dns_name(sandbox: Sandbox, namespace: str) -> None:
    server = python_pod(
        "trainer-0",
        """
        import socket
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", 29500)); s.listen()
        while True:
            c, _ = s.accept(); c.sendall(socket.gethostname().encode()); c.close()
    """,
        metadata={"labels": {"group": "g"}},
        hostname="trainer-0",
        subdomain="g",
        # never Ready: only publishNotReadyAddresses makes the Service name resolve
        container={"readinessProbe": {"exec": {"command": ["false"]}, "periodSeconds": 1}},
    )
    client = python_pod(
        "inference-0",
        f"""
        import socket, time
        s = socket.socket(); s.bind(("0.0.0.0", 29500)); s.listen()  # the same port as the server: no clash
        fq = "trainer-0.g.{namespace}.svc.cluster.local"
        for name in (fq, "trainer-0.g", "g"):
            print(name, "->", socket.gethostbyname(name))
        deadline = time.time() + 30
        while True:
            try:
                c = socket.create_connection((fq, 29500), timeout=2); break
            except OSError:
                if time.time() > deadline: raise
                time.sleep(0.1)
        print("peer says", c.recv(100).decode())
    """,
        metadata={"labels": {"group": "g"}},
        hostname="inference-0",
        subdomain="g",
        restartPolicy="Never",
    )
    headless = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "g"},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"group": "g"},
            "ports": [{"name": "rdzv", "port": 29500}],
        },
    }
    apply(sandbox, namespace, headless, server)
    server_ip = wait_phase(sandbox, namespace, "trainer-0", "Running")["status"]["podIP"]
    apply(sandbox, namespace, client)
    wait_phase(sandbox, namespace, "inference-0", "Succeeded")
    log = sandbox.pod_log(namespace, "inference-0", "main")
    assert f"trainer-0.g.{namespace}.svc.cluster.local -> {server_ip}" in log
    assert f"trainer-0.g -> {server_ip}" in log
    assert "peer says trainer-0" in log
    assert not any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in get(sandbox, namespace, "pod", "trainer-0")["status"]["conditions"]
    )  # type: ignore[index]


def test_a_gloo_group_forms_between_pods_by_dns_name(sandbox: Sandbox, namespace: str) -> None:
    """What the weightsync runtime needs: a TCPStore at the trainer's DNS name, gloo between pod IPs."""
    script = f"""
        import datetime, os, torch, torch.distributed as dist
        rank = int(os.environ["RANK"])
        url = "tcp://r0.grp.{namespace}.svc.cluster.local:29500"
        timeout = datetime.timedelta(seconds=60)
        dist.init_process_group("gloo", init_method=url, rank=rank, world_size=2, timeout=timeout)
        t = torch.full((4,), float(rank + 1))
        dist.all_reduce(t)
        print("SUM", t.tolist())
        # without it, torch 2.15 aborts at exit about one run in seven on a loaded machine ("terminate called
        # without an active exception": gloo's worker thread frees the all_reduce's tensors while the
        # interpreter finalises), and the pod ends Failed with exit code 134
        dist.destroy_process_group()
    """
    headless = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "grp"},
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {"app": "gl"}},
    }
    members = [
        python_pod(
            f"r{rank}",
            script,
            metadata={"labels": {"app": "gl"}},
            hostname=f"r{rank}",
            subdomain="grp",
            restartPolicy="Never",
            container={"env": [{"name": "RANK", "value": str(rank)}]},
        )
        for rank in range(2)
    ]
    apply(sandbox, namespace, headless, *members)
    for rank in range(2):
        wait_phase(sandbox, namespace, f"r{rank}", "Succeeded")
        assert "SUM [3.0, 3.0, 3.0, 3.0]" in sandbox.pod_log(namespace, f"r{rank}", "main")


def test_failing_containers_follow_their_restart_policy(sandbox: Sandbox, namespace: str) -> None:
    flaky = """
        import pathlib, sys
        runs = pathlib.Path("/scratch/runs"); n = len(runs.read_text()) if runs.exists() else 0
        runs.write_text("x" * (n + 1)); sys.exit(0 if n >= 2 else 3)
    """
    scratch = {"volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}
    on_failure = python_pod(
        "on-failure",
        flaky,
        restartPolicy="OnFailure",
        container=scratch,
        volumes=[{"name": "scratch", "emptyDir": {}}],
    )
    never = python_pod("never", "import sys; sys.exit(3)", restartPolicy="Never")
    always = python_pod("always", "import sys; sys.exit(1)", restartPolicy="Always")
    init = python_pod(
        "init",
        "print(open('/scratch/by-init').read())",
        restartPolicy="Never",
        container=scratch,
        volumes=[{"name": "scratch", "emptyDir": {}}],
        initContainers=[
            {
                "name": f"init-{i}",
                "image": "ignored",
                "command": ["python", "-c", f"open('/scratch/by-init', 'a').write('{i}')"],
                **scratch,
            }
            for i in range(3)
        ],
    )
    apply(sandbox, namespace, on_failure, never, always, init)

    status = wait_phase(sandbox, namespace, "on-failure", "Succeeded")["status"]["containerStatuses"][0]
    assert status["restartCount"] == 2
    assert status["lastState"]["terminated"]["exitCode"] == 3
    assert status["state"]["terminated"]["exitCode"] == 0

    status = wait_phase(sandbox, namespace, "never", "Failed")["status"]["containerStatuses"][0]
    assert (status["restartCount"], status["state"]["terminated"]["exitCode"]) == (0, 3)

    def restarted_twice() -> dict[str, Any] | None:
        s = (
            (get(sandbox, namespace, "pod", "always") or {})
            .get("status", {})
            .get("containerStatuses", [{}])[0]
        )
        return s if s.get("restartCount", 0) >= 2 else None

    status = wait_for(restarted_twice, TIMEOUT_S, "pod `always` to be restarted twice")
    assert status["lastState"]["terminated"]["exitCode"] == 1
    assert get(sandbox, namespace, "pod", "always")["status"]["phase"] == "Running"  # type: ignore[index]

    wait_phase(sandbox, namespace, "init", "Succeeded")
    assert "012" in sandbox.pod_log(namespace, "init", "main")


def test_failing_liveness_probe_restarts_the_container(sandbox: Sandbox, namespace: str) -> None:
    probe = {"httpGet": {"path": "/healthz", "port": 8081}, "periodSeconds": 1, "failureThreshold": 2}
    apply(
        sandbox,
        namespace,
        python_pod("unhealthy", "import time; time.sleep(600)", container={"livenessProbe": probe}),
    )
    first = container_pid(wait_phase(sandbox, namespace, "unhealthy", "Running"))

    def restarted() -> dict[str, Any] | None:
        pod = get(sandbox, namespace, "pod", "unhealthy") or {}
        s = pod.get("status", {}).get("containerStatuses", [{}])[0]
        return s if s.get("restartCount", 0) >= 1 and "running" in s.get("state", {}) else None

    status = wait_for(restarted, TIMEOUT_S, "the container to be restarted after its liveness probe failed")
    assert status["lastState"]["terminated"]["exitCode"] == 128 + 15  # SIGTERM, as a kubelet sends it
    assert not alive(first)


def test_pods_use_in_cluster_config_with_their_service_account(sandbox: Sandbox, namespace: str) -> None:
    rbac = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader"}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
    ]
    script = f"""
        from kubernetes import client, config
        config.load_incluster_config()
        v1 = client.CoreV1Api()
        print("own pod", v1.read_namespaced_pod("sa-user", "{namespace}").metadata.name)
        try:
            v1.list_namespaced_secret("{namespace}")
        except client.ApiException as e:
            print("secrets", e.status)
    """
    apply(
        sandbox,
        namespace,
        *rbac,
        python_pod("sa-user", script, serviceAccountName="reader", restartPolicy="Never"),
    )
    wait_phase(sandbox, namespace, "sa-user", "Succeeded")
    log = sandbox.pod_log(namespace, "sa-user", "main")
    assert "own pod sa-user" in log
    assert "secrets 403" in log  # the ServiceAccount's token, not an admin credential
    assert sandbox.kubectl("logs", "sa-user", "-n", namespace).stdout == log.split("\n", 1)[1]  # via the API

    user = f"system:serviceaccount:{namespace}:reader"
    events = [json.loads(line) for line in sandbox.audit_log.read_text().splitlines() if user in line]
    assert {(e["verb"], e["objectRef"]["resource"]) for e in events if e["user"]["username"] == user} >= {
        ("get", "pods"),
        ("list", "secrets"),
    }


def test_host_network_pods_keep_the_node_name_and_address(sandbox: Sandbox, namespace: str) -> None:
    script = "import socket; print('host', socket.gethostname(), socket.gethostbyname(socket.gethostname()))"
    apply(sandbox, namespace, python_pod("hostnet", script, hostNetwork=True, restartPolicy="Never"))
    pod = wait_phase(sandbox, namespace, "hostnet", "Succeeded")
    assert pod["status"]["podIP"] == sandbox.net.gateway
    assert f"host {socket.gethostname()} " in sandbox.pod_log(namespace, "hostnet", "main")


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def test_killed_control_plane_components_come_back_with_their_ports_and_state(
    sandbox: Sandbox, namespace: str
) -> None:
    """kill -9 of each component: the supervisor starts it again, same command line (ports, etcd data), and
    the cluster carries on: objects are still there, the scheduler outlives an API server restart."""
    apply(sandbox, namespace, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kept"}})
    url = sandbox.api_server_url
    scheduler = sandbox.status().processes["kube-scheduler"]
    for component in ("etcd", "kube-apiserver"):
        old = sandbox.status().processes[component]
        assert old is not None
        argv = _cmdline(old)
        new = sandbox.restart(component)  # SIGKILL, then waits until it serves again
        assert new != old and not alive(old)
        assert _cmdline(new) == argv  # same flags: same ports, same data directory, same certificates
        assert sandbox.api_server_url == url
        wait_for(lambda: get(sandbox, namespace, "configmap", "kept"), TIMEOUT_S, "the ConfigMap after the restart")
    assert sandbox.status().processes["kube-scheduler"] == scheduler  # it outlived the API server's restart
    sleeper = python_pod("after-apiserver", "import time; time.sleep(600)")
    apply(sandbox, namespace, sleeper)
    wait_phase(sandbox, namespace, "after-apiserver", "Running")  # scheduled by the scheduler that saw it

    for component in ("kube-controller-manager", "kube-scheduler"):
        old = sandbox.status().processes[component]
        new = sandbox.restart(component)
        assert new != old and not alive(old)  # type: ignore[arg-type]
    apply(sandbox, namespace, python_pod("after-scheduler", "import time; time.sleep(600)"))
    wait_phase(sandbox, namespace, "after-scheduler", "Running")
    ns = f"{namespace[:50]}-cm"  # the restarted controller-manager's ServiceAccount controller at work
    sandbox.kubectl("create", "namespace", ns)
    try:
        wait_for(
            lambda: get(sandbox, ns, "serviceaccount", "default"), TIMEOUT_S, "the default ServiceAccount"
        )
    finally:
        sandbox.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    supervisor_log = (sandbox.state_dir / "logs" / "supervisor.log").read_text()
    for component in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"):
        assert f"started {component} again" in supervisor_log


TICKER = """
    import itertools, os, sys, time
    for i in itertools.count():
        os.write(1, f"tick {i}\\n".encode())  # one write per line
        time.sleep(0.1)
"""


def test_a_restarted_node_agent_adopts_running_pods(sandbox: Sandbox, namespace: str) -> None:
    """kill -9 of the node agent while a pod runs and writes: the pod keeps its process and its address, its
    output keeps reaching its log (no line lost), no second process is started, and the new agent runs it on
    (status, deletion) and hands new pods other addresses."""
    apply(sandbox, namespace, python_pod("ticker", TICKER))
    pod = wait_phase(sandbox, namespace, "ticker", "Running")
    pid, ip = container_pid(pod), pod["status"]["podIP"]
    wait_log(sandbox, namespace, "ticker", "tick 5\n")
    netns = sandbox.net.netns_name(pod["metadata"]["uid"])

    old_agent = sandbox.status().processes["node-agent"]
    new_agent = sandbox.restart("node-agent")  # SIGKILL, then waits until the new agent adopted its pods
    assert new_agent != old_agent and not alive(old_agent)  # type: ignore[arg-type]
    before = sandbox.pod_log(namespace, "ticker", "main").count("\ntick ")
    wait_log(sandbox, namespace, "ticker", f"tick {before + 20}\n")  # still written, still pumped into the log
    assert alive(pid)
    assert netns_pids(netns) == [pid]  # the very process, and no second one
    log = sandbox.pod_log(namespace, "ticker", "main")
    assert log.count("==== ") == 1  # one run
    ticks = [int(line.split()[1]) for line in log.splitlines() if line.startswith("tick ")]
    assert ticks == list(range(len(ticks)))  # nothing lost or doubled across the restart

    apply(sandbox, namespace, python_pod("newcomer", "import time; time.sleep(600)"))
    newcomer = wait_phase(sandbox, namespace, "newcomer", "Running")
    assert newcomer["status"]["podIP"] != ip  # the adopted pod's address stays taken
    status = get(sandbox, namespace, "pod", "ticker")["status"]  # type: ignore[index]
    assert status["phase"] == "Running" and container_pid({"status": status}) == pid
    assert status["containerStatuses"][0]["restartCount"] == 0
    sandbox.kubectl("delete", "pod", "ticker", "-n", namespace, "--timeout=30s")  # the new agent ends it
    assert not alive(pid)


def test_down_leaves_nothing_running(sandbox: Sandbox, namespace: str) -> None:
    """Runs last in this module: stops the sandbox, checks, then starts it again for later tests."""
    apply(
        sandbox,
        namespace,
        python_pod(
            "sleeper",
            """
        import subprocess, time
        subprocess.Popen(["python", "-c", "import time; time.sleep(600)"], start_new_session=True)
        time.sleep(600)
    """,
        ),
    )
    pod = wait_phase(sandbox, namespace, "sleeper", "Running")
    pid = container_pid(pod)
    component_pids = [p for p in sandbox.status().processes.values() if p]
    assert len(component_pids) == 6  # etcd, API server, controller-manager, scheduler, node agent, supervisor
    # the container and the grandchild that left its session both live in the pod's network namespace
    pod_pids = wait_for(
        lambda: len(p := netns_pids(sandbox.net.netns_name(pod["metadata"]["uid"]))) >= 2 and p,
        TIMEOUT_S,
        "the sleeper's grandchild",
    )

    sandbox.down()
    sandbox.down()  # twice is fine
    assert not [p for p in [pid, *component_pids, *pod_pids] if alive(p)]
    assert sandbox.net.list_netns() == []
    after = sandbox.status()
    assert not any(after.processes.values()) and not after.running

    sandbox.up()
    assert sandbox.status().running
