"""`Sandbox`: starts, reuses, reports on and stops the local control plane and its node agent."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from weightsync.sandbox import certs, containerlog, firewall, network, procs
from weightsync.sandbox.components import (
    AUDIT_POLICY,
    Layout,
    Ports,
    apiserver_argv,
    controller_manager_argv,
    etcd_argv,
    scheduler_argv,
)
from weightsync.sandbox.kubeclient import ApiError, KubeClient
from weightsync.sandbox.kubeconfig import write_kubeconfig
from weightsync.sandbox.paths import build_binaries, default_state_dir
from weightsync.sandbox.waiting import wait_for

from weightsync.ports import free_port

NODE_NAME = "sandbox-node-0"
CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
AGENT = "node-agent"
SUPERVISOR = "supervisor"  # supervisor.py (imported only where used: it runs as `python -m`)
COMPONENTS = (*CONTROL_PLANE, AGENT)  # what the supervisor restarts, and Sandbox.restart takes
STARTUP_TIMEOUT_S = 120.0
LOCK_TIMEOUT_S = 100 * 60.0  # another up may be building the binaries (about 10 min cold on 2 cores)


class CommandError(subprocess.CalledProcessError):
    """A kubectl/helm call failed; the message carries the command and its stderr."""

    def __str__(self) -> str:
        return (
            f"`{' '.join(map(str, self.cmd))}` exited with {self.returncode}: {(self.stderr or '').strip()}"
        )


@dataclass
class SandboxStatus:
    state_dir: str
    kubeconfig: str
    api_server_url: str | None
    api_ready: bool
    node_ready: bool
    processes: dict[str, int | None] = field(default_factory=dict)
    pod_netns: list[str] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return all(self.processes.get(n) for n in (*COMPONENTS, SUPERVISOR)) and self.api_ready

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "running": self.running}


def _log(message: str) -> None:
    print(f"[sandbox {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Sandbox:
    """A real control plane (etcd, kube-apiserver, controller-manager, scheduler) plus one node agent."""

    def __init__(self, state_dir: Path | None = None) -> None:
        self.state_dir = (state_dir or default_state_dir()).resolve()
        self.layout = Layout(self.state_dir)
        self.net = network.PodNetwork.for_state_dir(self.state_dir)
        self._bin_dir: Path | None = None

    # -- paths ------------------------------------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        path: Path = self.layout.kubeconfig
        return path

    @property
    def audit_log(self) -> Path:
        """JSON lines, one per request (level Metadata): who used which verb on which resource."""
        path: Path = self.layout.audit_log
        return path

    @property
    def bin_dir(self) -> Path:
        if self._bin_dir is None:
            recorded = self.layout.run / "bin_dir"
            if recorded.exists() and Path(recorded.read_text().strip()).is_dir():
                self._bin_dir = Path(recorded.read_text().strip())
            else:
                self._bin_dir = build_binaries()
        return self._bin_dir

    @property
    def api_server_url(self) -> str:
        ports = self._read_ports()
        if ports is None:
            raise RuntimeError(f"the sandbox in {self.state_dir} has never been started: call up() first")
        return f"https://{self.net.gateway}:{ports.apiserver}"

    def pod_log(self, namespace: str, pod: str, container: str) -> str:
        """A container's output (all its runs, each after its `==== <time> <command>` line), in whole lines
        (those of its stdout and stderr in the order the node agent read them), as the agent recorded it; ''
        before it ran.

        Of several pods by that name (a pod deleted and created again), the latest one's."""
        logs = self.layout.pods.glob(f"{namespace}_{pod}_*/logs/{container}.log")
        found = sorted(logs, key=lambda p: p.stat().st_ctime)
        if not found:
            return ""
        return "".join(containerlog.plain_text(containerlog.read_events(found[-1].read_bytes(), complete=False)))

    def exec_in_pod(
        self, namespace: str, pod: str, *argv: str, container: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Runs `argv` inside a running container (its network, mounts, hostname and environment), like
        `kubectl exec`, which the sandbox does not serve; does not raise on a non-zero exit."""
        obj = json.loads(self.kubectl("get", "pod", pod, "-n", namespace, "-o", "json").stdout)
        statuses = obj.get("status", {}).get("containerStatuses", [])
        status = next((s for s in statuses if container in (None, s["name"])), None)
        if status is None or "running" not in status.get("state", {}):
            raise RuntimeError(f"container {container or '(first)'} of pod {namespace}/{pod} is not running")
        pid = status["containerID"].removeprefix("sandbox://")
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        env = dict(e.decode().split("=", 1) for e in environ if b"=" in e)
        cmd = ["nsenter", "-t", pid, "--net", "--mount", "--uts", "-w", "--", *argv]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)

    # -- lifecycle --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One up/down at a time per state directory (two test sessions, a demo and a test run)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / "lock"
        with open(path, "w") as lock:

            def acquired() -> bool:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False
                return True

            wait_for(acquired, LOCK_TIMEOUT_S, f"the lock {path} (another up/down of this sandbox)", 0.5)
            yield

    def up(self) -> Sandbox:
        """Starts whatever is not running (idempotent) and waits until the node is Ready."""
        if os.geteuid() != 0:
            raise PermissionError(
                "the sandbox needs root: it creates a bridge, network namespaces and bind mounts for pods"
            )
        with self._exclusive():
            try:
                self._up()
            except BaseException:  # a failed or interrupted start leaves nothing running behind it
                _log("startup failed or was interrupted: stopping everything it started")
                self._down()
                raise
        return self

    def _up(self) -> None:
        lay = self.layout
        _log(f"state directory {self.state_dir}")
        self._bin_dir = build_binaries()
        lay.run.mkdir(parents=True, exist_ok=True)
        (lay.run / "bin_dir").write_text(str(self._bin_dir))
        _log(f"binaries in {self._bin_dir}")
        if not network.link_exists(self.net.bridge):  # a fresh start: pick a subnet that is free now
            if self._stop_processes():
                _log("the pod bridge was gone: restarted the control plane")
            (lay.run / "subnet").unlink(missing_ok=True)
            self.net = network.PodNetwork.for_state_dir(self.state_dir)
        network.ensure_bridge(self.net)
        self.net.record(self.state_dir)
        _log(f"bridge {self.net.bridge} at {self.net.gateway}/{self.net.prefixlen}")
        certs.ensure_pki(lay.pki, ["127.0.0.1", self.net.gateway, "10.0.0.1"])
        lay.audit_policy.write_text(AUDIT_POLICY)

        running = {name: procs.running_pid(name, lay.run) for name in COMPONENTS}
        ports = self._read_ports()
        if ports is None or not running["etcd"] or not running["kube-apiserver"]:
            if any(running.values()):
                _log("the control plane is partly running: restarting it")
                self._stop_processes()
            ports = self._start_core()
        else:
            _log(f"control plane already running at {self.api_server_url}")
        self._write_kubeconfigs(ports)
        admin = KubeClient.from_kubeconfig(self.kubeconfig)
        for name, argv in (
            ("kube-controller-manager", controller_manager_argv(self.bin_dir, lay)),
            ("kube-scheduler", scheduler_argv(self.bin_dir, lay)),
        ):
            if not procs.running_pid(name, lay.run):
                _log(f"starting {name}")
                procs.spawn(name, argv, lay.run, lay.logs)
        if not procs.running_pid(AGENT, lay.run):
            self._provide_iptables()
            _log(f"starting the node agent ({NODE_NAME})")
            procs.spawn(AGENT, self._agent_argv(ports), lay.run, lay.logs, env=self._agent_env())
        from weightsync.sandbox.supervisor import write_components

        write_components(lay.run, self._components(ports))
        self._wait(lambda: self._node_ready(admin), f"node {NODE_NAME} to be Ready", AGENT)
        self._wait(
            lambda: admin.get("/api/v1/namespaces/default/serviceaccounts/default"),
            "the default ServiceAccount (the controller-manager's token controller)",
            "kube-controller-manager",
        )
        if not procs.running_pid(SUPERVISOR, lay.run):  # last: it restarts whatever exits from now on
            _log("starting the supervisor")
            argv = [sys.executable, "-m", "weightsync.sandbox.supervisor", "--state-dir", str(self.state_dir)]
            procs.spawn(SUPERVISOR, argv, lay.run, lay.logs)
        _log(f"ready: KUBECONFIG={self.kubeconfig} (API server {self.api_server_url})")

    def _provide_iptables(self) -> None:
        """The tools that enforce NetworkPolicy (fetched into ~/.cache once), recorded for the node agent."""
        found = firewall.provide()
        firewall.record(self.state_dir, found)
        if isinstance(found, firewall.Iptables):
            _log(f"NetworkPolicy ingress enforced with {found.multi}")
        else:
            _log(f"WARNING: NetworkPolicy is NOT enforced (pods accept all traffic): {found}")

    @property
    def network_policy(self) -> firewall.Iptables | str:
        """The iptables tools the node agent enforces NetworkPolicy with, or why it does not."""
        return firewall.recorded(self.state_dir)

    def down(self) -> None:
        """Stops every process (pods, agent, control plane), pod namespaces and the bridge; idempotent."""
        with self._exclusive():
            self._down()

    def _down(self) -> None:
        stopped = self._stop_processes()
        for netns in self.net.list_netns():
            self._kill_netns(netns)
        self._kill_recorded_containers()
        network.delete_bridge(self.net)
        _log(f"stopped {', '.join(stopped) if stopped else 'nothing (not running)'}")

    def restart(self, component: str, sig: int = signal.SIGKILL, timeout: float = STARTUP_TIMEOUT_S) -> int:
        """Kills a component (`sig` to its process group; SIGKILL: as a crash) and waits until the
        supervisor has started it again and it serves: etcd answers /health, the API server /readyz, the
        node agent has adopted the running pods. Returns the new pid. For fault tests; pods keep running
        (an agent killed with SIGTERM stops them first, as `down` wants)."""
        if component not in COMPONENTS:
            raise ValueError(f"unknown component {component!r}: one of {', '.join(COMPONENTS)}")
        run = self.layout.run
        if not procs.running_pid(SUPERVISOR, run):
            raise RuntimeError(f"the sandbox in {self.state_dir} is not supervised: call up() first")
        old = procs.running_pid(component, run)
        if old is not None:
            _log(f"restarting {component}: signal {signal.Signals(sig).name} to pid {old}")
            procs.kill_group(old, sig)
        new = wait_for(
            lambda: (pid := procs.running_pid(component, run)) is not None and pid != old and pid,
            timeout,
            f"the supervisor to start {component} again",
            describe=lambda: self._log_tail(SUPERVISOR) + "\n" + self._log_tail(component),
        )
        self.wait_ready(component, timeout)
        return int(new)

    def wait_ready(self, component: str, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Waits until a running component serves (see restart)."""
        ports = self._read_ports()
        if ports is None:
            raise RuntimeError(f"the sandbox in {self.state_dir} has never been started: call up() first")
        run = self.layout.run
        ready: Any
        if component == "etcd":
            ready = lambda: _http_ok(f"http://127.0.0.1:{ports.etcd_client}/health")  # noqa: E731
        elif component == "kube-apiserver":
            ready = KubeClient.from_kubeconfig(self.kubeconfig).ready
        elif component == AGENT:
            synced = run / "node-agent.synced"
            ready = lambda: synced.exists() and synced.read_text().strip() == str(procs.running_pid(AGENT, run))  # noqa: E731
        else:
            ready = lambda: procs.running_pid(component, run) is not None  # noqa: E731
        wait_for(ready, timeout, f"{component} to serve", interval=0.1, describe=lambda: self._log_tail(component))

    def _log_tail(self, component: str) -> str:
        log = self.layout.logs / f"{component}.log"
        tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
        return f"{component} log ({log}) ends with:\n" + "\n".join(tail)

    def status(self) -> SandboxStatus:
        lay = self.layout
        processes = {name: procs.running_pid(name, lay.run) for name in (*COMPONENTS, SUPERVISOR)}
        ports = self._read_ports()
        url = f"https://{self.net.gateway}:{ports.apiserver}" if ports else None
        api_ready = node_ready = False
        if processes["kube-apiserver"] and self.kubeconfig.exists():
            try:
                admin = KubeClient.from_kubeconfig(self.kubeconfig)
                api_ready = admin.ready()
                node_ready = self._node_ready(admin)
            except (OSError, ApiError, ValueError):
                pass
        return SandboxStatus(
            str(self.state_dir),
            str(self.kubeconfig),
            url,
            api_ready,
            node_ready,
            processes,
            self.net.list_netns(),
        )

    # -- clients ----------------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """The environment for kubectl/helm against the sandbox: KUBECONFIG, and PATH with bin_dir first."""
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return self._run("kubectl", args, check, input, timeout)

    def helm(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return self._run("helm", args, check, input, timeout)

    def _run(
        self, tool: str, args: tuple[str, ...], check: bool, input: str | None, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / tool), *args]
        proc = subprocess.run(
            cmd, input=input, capture_output=True, text=True, env=self.env(), timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise CommandError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    # -- internals --------------------------------------------------------------------------------------
    def _start_core(self) -> Ports:
        lay = self.layout
        ports = Ports(free_port(), free_port(), free_port(), free_port())
        (lay.run / "ports.json").write_text(json.dumps(asdict(ports)))
        _log(f"starting etcd on 127.0.0.1:{ports.etcd_client}")
        procs.spawn("etcd", etcd_argv(self.bin_dir, lay, ports), lay.run, lay.logs)
        etcd_health = f"http://127.0.0.1:{ports.etcd_client}/health"
        self._wait(lambda: _http_ok(etcd_health), "etcd to answer /health", "etcd")
        _log(f"starting kube-apiserver on {self.net.gateway}:{ports.apiserver}")
        procs.spawn(
            "kube-apiserver", apiserver_argv(self.bin_dir, lay, ports, self.net.gateway), lay.run, lay.logs
        )
        self._write_kubeconfigs(ports)
        admin = KubeClient.from_kubeconfig(self.kubeconfig)
        self._wait(admin.ready, "kube-apiserver to answer /readyz", "kube-apiserver")
        return ports

    def _write_kubeconfigs(self, ports: Ports) -> None:
        server = f"https://{self.net.gateway}:{ports.apiserver}"
        write_kubeconfig(self.kubeconfig, server, self.layout.pki, certs.ADMIN)
        for ident in (certs.CONTROLLER_MANAGER, certs.SCHEDULER, certs.NODE_AGENT):
            write_kubeconfig(
                self.layout.component_kubeconfig(ident.file_stem), server, self.layout.pki, ident
            )

    def _agent_argv(self, ports: Ports) -> list[str]:
        return [
            sys.executable,
            "-m",
            "weightsync.sandbox.agent",
            "--state-dir",
            str(self.state_dir),
            "--node-name",
            NODE_NAME,
            "--kubeconfig",
            str(self.layout.component_kubeconfig("node-agent")),
            "--api-host",
            self.net.gateway,
            "--api-port",
            str(ports.apiserver),
            "--kubelet-port",
            str(ports.kubelet),
        ]

    def _components(self, ports: Ports) -> list[tuple[str, list[str], dict[str, str]]]:
        """Each component's command line as up() starts it, for the supervisor (same ports, data, certs)."""
        lay, bin_dir = self.layout, self.bin_dir
        return [
            ("etcd", etcd_argv(bin_dir, lay, ports), {}),
            ("kube-apiserver", apiserver_argv(bin_dir, lay, ports, self.net.gateway), {}),
            ("kube-controller-manager", controller_manager_argv(bin_dir, lay), {}),
            ("kube-scheduler", scheduler_argv(bin_dir, lay), {}),
            (AGENT, self._agent_argv(ports), {"PYTHONUNBUFFERED": "1"}),
        ]

    def _agent_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _read_ports(self) -> Ports | None:
        try:
            return Ports(**json.loads((self.layout.run / "ports.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _node_ready(self, admin: KubeClient) -> bool:
        try:
            node = admin.get(f"/api/v1/nodes/{NODE_NAME}")
        except ApiError:
            return False
        conditions = node.get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def _wait(self, condition: Any, what: str, component: str) -> None:
        def died() -> str:
            return self._log_tail(component)

        def check() -> Any:
            if not procs.running_pid(component, self.layout.run):
                raise RuntimeError(f"{component} exited during startup; {died()}")
            return condition()

        try:
            wait_for(check, STARTUP_TIMEOUT_S, what, interval=0.2, describe=died)
        except RuntimeError as e:
            raise RuntimeError(f"sandbox startup failed while waiting for {what}: {e}") from None

    def _stop_processes(self) -> list[str]:
        stopped = []
        for name in (SUPERVISOR, AGENT, "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            if procs.stop(name, self.layout.run, grace=20.0 if name == AGENT else 10.0):
                stopped.append(name)
        return stopped

    def _kill_recorded_containers(self) -> None:
        for pid_file in self.layout.pods.glob("*/run/*.pid"):
            pid = procs.running_pid(pid_file.stem, pid_file.parent)
            pid_file.unlink(missing_ok=True)
            if pid is not None:
                for p in [pid, *procs.descendants(pid)]:
                    procs.kill_group(p, signal.SIGKILL)

    def _kill_netns(self, netns: str) -> None:
        pids = network.netns_pids(netns)
        for pid in pids:
            procs.kill_group(pid, signal.SIGKILL)
        procs.wait_gone(pids, 10.0)
        network.delete_netns(netns)


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return bool(resp.status == 200)
