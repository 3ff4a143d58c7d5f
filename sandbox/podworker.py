"""One thread per pod: network namespace, volumes, containers, probes, status and graceful deletion."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from weightsync.sandbox import containers, firewall, hostsfile, netpolicy, network, podstatus, procs, volumes
from weightsync.sandbox.agentlog import log
from weightsync.sandbox.gpus import GpuAllocator
from weightsync.sandbox.kubeclient import ApiError, KubeClient
from weightsync.sandbox.podspec import (
    ConfigError,
    Obj,
    command_line,
    pod_hostname,
    resolv_conf,
    resolve_env,
)
from weightsync.sandbox.probes import ProbeState, run_probe

LOOP_S = 0.25
FULL_VOLUME_SYNC_S = 30.0
SHUTDOWN_GRACE_S = 5.0


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _environ(pid: int) -> dict[str, str]:
    """A running process's environment (an adopted container's, for its exec probes)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(e.decode(errors="replace").split("=", 1) for e in raw.split(b"\0") if b"=" in e)


@dataclass
class AgentContext:
    """What every pod worker shares: the API client, the node, the network, the Python environment."""

    client: KubeClient
    node_name: str
    node_ip: str
    state_dir: Path
    net: network.PodNetwork
    api_host: str
    api_port: int
    python: str
    venv_bin: str
    backoff_base_s: float
    backoff_cap_s: float
    hosts_for: Callable[[Obj], str]
    hosts_generation: Callable[[], int]
    release_ip: Callable[[str], None]
    gpus: GpuAllocator
    #: the pod's iptables and ip6tables filter tables (NetworkPolicy ingress) at the current generation
    firewall_for: Callable[[Obj], tuple[str, str] | None] | None = None
    iptables: firewall.Iptables | str = "not configured"  # the tools, or why NetworkPolicy is not enforced


@dataclass
class Container:
    """The runtime record of one (init) container."""

    spec: Obj
    init: bool
    proc: containers.Process | None = None
    runs: int = 0
    state: Obj = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: Obj = field(default_factory=dict)
    ready: bool = False
    done: bool = False
    succeeded: bool = False
    next_start: float = 0.0
    backoff_s: float = 0.0
    kill_deadline: float | None = None
    env: dict[str, str] = field(default_factory=dict)
    readiness: ProbeState | None = None
    liveness: ProbeState | None = None

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    def status(self) -> Obj:
        return {
            "name": self.name,
            "state": self.state,
            "lastState": self.last_state,
            "ready": self.ready,
            "restartCount": max(self.runs - 1, 0),
            "image": self.spec.get("image", ""),
            "imageID": "",
            "containerID": f"sandbox://{self.proc.pid}" if self.proc else "",
            "started": self.proc is not None,
        }


class PodWorker(threading.Thread):
    def __init__(self, ctx: AgentContext, pod: Obj, pod_ip: str) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.ctx = ctx
        self.pod = pod
        self.uid: str = meta["uid"]
        self.pod_ip = pod_ip
        self.host_network = bool(pod["spec"].get("hostNetwork"))
        self.netns: str | None = None if self.host_network else ctx.net.netns_name(self.uid)
        self.dir = ctx.state_dir / "pods" / f"{meta['namespace']}_{meta['name']}_{self.uid[:8]}"
        self.vols = volumes.VolumeSet(self.dir / "volumes")
        self.containers = [Container(c, True) for c in pod["spec"].get("initContainers", [])] + [
            Container(c, False) for c in pod["spec"]["containers"]
        ]
        self.wake = threading.Event()
        self.gone = False  # the pod left the API: kill at once
        self.stopping = False  # the agent stops: kill without API calls
        self.finished = threading.Event()
        self.setup_done = False
        self.setup_error = ""
        self.last_error = ""
        self.started_at = now_rfc3339()
        self.published: Obj = {}
        self.next_full_sync = 0.0
        self.hosts_text = ""
        self.hosts_generation = -1
        #: the filter tables as applied to the pod's network namespace; None: unknown (an adopted namespace)
        self.firewall_text: tuple[str, str] | None = None
        self.firewall_generation = -1
        self.lock = threading.Lock()
        # its directory is there: an earlier agent ran this pod, and its containers may still run (adopted)
        self.adopting = (self.dir / "run").is_dir()

    # -- called by the agent ------------------------------------------------------------------------
    def update(self, pod: Obj) -> None:
        with self.lock:
            self.pod = pod
        self.wake.set()

    def mark_gone(self) -> None:
        self.gone = True
        self.wake.set()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            if self.adopting:
                self._adopt()
            while not (self.gone or self.stopping):
                with self.lock:
                    pod = self.pod
                if pod["metadata"].get("deletionTimestamp"):
                    self._terminate(pod)
                    return
                try:
                    self._step(pod)
                except Exception as e:  # one bad pod must not end its worker; retried next loop
                    if str(e) != self.last_error:  # logged once per distinct error, not every loop
                        self._log(f"error: {traceback.format_exc()}")
                    self.last_error = str(e)
                self.wake.wait(LOOP_S)
                self.wake.clear()
            self._kill_all(SHUTDOWN_GRACE_S if self.stopping else 0.0)
        finally:
            self._teardown()
            self.finished.set()

    def _step(self, pod: Obj) -> None:
        if not self.setup_done:
            self._setup(pod)
            if not self.setup_done:
                self._publish(pod)
                return
        self._refresh_volumes(pod)
        self._write_hosts(pod)
        self._write_firewall(pod)
        phase = self._phase(pod)
        if phase not in ("Succeeded", "Failed"):
            pending_init = next((c for c in self.containers if c.init and not c.done), None)
            for c in [pending_init] if pending_init else [c for c in self.containers if not c.init]:
                self._step_container(pod, c)
        self._publish(pod)

    def _refresh_volumes(self, pod: Obj) -> None:
        """Downward-API files when labels/annotations change; all (tokens, keys) every 30 s or when due."""
        try:
            if volumes.metadata_key(pod) != self.vols.metadata_key:
                volumes.sync_volumes(self.ctx.client, pod, self.vols, full=False)
            if time.monotonic() >= min(self.next_full_sync, self.vols.token_renew_at):
                self.next_full_sync = time.monotonic() + FULL_VOLUME_SYNC_S
                volumes.sync_volumes(self.ctx.client, pod, self.vols, full=True)
        except (ApiError, ConfigError, OSError) as e:  # the containers keep running; retried later
            self.next_full_sync = time.monotonic() + 5.0
            self.vols.token_renew_at = max(self.vols.token_renew_at, self.next_full_sync)
            if str(e) != self.last_error:
                self._log(f"volume refresh failed: {e}")
            self.last_error = str(e)

    # -- an earlier agent's pod ---------------------------------------------------------------------
    def _adopt(self) -> None:
        """Takes over what an agent before this one started: each container's run from the state the agent
        recorded at its start (run/<name>.state.json) and its shim's files. A run whose shim still runs is
        adopted as it is (same process, its output still reaching its log); one that ended while no agent
        watched is handled as an exit now (restart policy, back-off); one that never started is started."""
        statuses = {
            s["name"]: s
            for s in [*self.pod.get("status", {}).get("initContainerStatuses", []),
                      *self.pod.get("status", {}).get("containerStatuses", [])]
        }
        adopted = []
        for c in self.containers:
            files = containers.Files(self.dir / "run", c.name)
            try:
                record = json.loads(files.state.read_text())
            except (OSError, ValueError):
                continue  # never started
            c.runs = int(record["runs"])
            c.last_state = record.get("lastState") or {}
            c.backoff_s = float(record.get("backoffS", 0.0))
            proc = containers.adopt(files, float(record["startedWall"]))
            if proc is None:  # the agent died while starting it: it runs again
                c.runs -= 1
                continue
            self.ctx.gpus.reserve(self.uid, c.name, record.get("gpus", []))
            c.proc, c.env = proc, _environ(proc.pid)
            c.state = {"running": {"startedAt": _rfc3339(proc.started_wall)}}
            ready = bool(statuses.get(c.name, {}).get("ready"))  # as published: no flap to not Ready
            readiness, liveness = c.spec.get("readinessProbe"), c.spec.get("livenessProbe")
            c.readiness = ProbeState.start(readiness, ready) if readiness and not c.init else None
            c.liveness = ProbeState.start(liveness, True) if liveness and not c.init else None
            c.ready = (ready if c.readiness else True) and not c.init
            adopted.append(f"{c.name} (pid {proc.pid}{', ended' if proc.poll() is not None else ''})")
        if adopted:
            self._log(f"adopted {', '.join(adopted)}")

    # -- setup and teardown -------------------------------------------------------------------------
    def _setup(self, pod: Obj) -> None:
        try:
            if self.netns and not Path(f"/run/netns/{self.netns}").exists():
                network.create_pod_netns(self.ctx.net, self.netns, self.pod_ip)
                self.firewall_text = netpolicy.OPEN  # a new namespace's tables are empty
            self._write_firewall(pod)  # before any container listens
            etc = self.dir / "etc"
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text(resolv_conf(pod["metadata"]["namespace"]))
            self._write_hosts(pod)
            volumes.sync_volumes(self.ctx.client, pod, self.vols, full=True)
            self.next_full_sync = time.monotonic() + FULL_VOLUME_SYNC_S
            self.setup_done = True
            self.setup_error = ""
        except (ConfigError, ApiError, RuntimeError, OSError) as e:
            self.setup_error = str(e)
            for c in self.containers:
                c.state = {"waiting": {"reason": "ContainerCreating", "message": str(e)}}

    def _write_hosts(self, pod: Obj) -> None:
        generation = self.ctx.hosts_generation()
        if generation == self.hosts_generation:
            return  # nothing it depends on changed
        self.hosts_generation = generation
        text = self.ctx.hosts_for({**pod, "status": {**pod.get("status", {}), "podIP": self.pod_ip}})
        if self.host_network:  # the node's own names too, as a hostNetwork pod sees them on a real node
            text += "# the node's /etc/hosts\n" + Path("/etc/hosts").read_text(errors="replace")
        if text != self.hosts_text:
            hostsfile.rewrite(self.dir / "etc" / "hosts", text)  # in place, never empty: see hostsfile.py
            self.hosts_text = text

    def _write_firewall(self, pod: Obj) -> None:
        """The NetworkPolicy ingress rules in the pod's network namespace, changed when what they depend on
        (policies, pods' addresses and labels, namespaces' labels) changed; a pod no policy selects gets none."""
        if self.netns is None or self.ctx.firewall_for is None or not isinstance(self.ctx.iptables, firewall.Iptables):
            return  # hostNetwork pods are never isolated (as on a real cluster); or not enforced
        generation = self.ctx.hosts_generation()
        if generation == self.firewall_generation:
            return
        text = self.ctx.firewall_for(pod)
        if text is None:
            return  # the policies are not known yet: unchanged
        if text != self.firewall_text:
            self.ctx.iptables.restore(self.netns, *text)
            if (text == netpolicy.OPEN) != (self.firewall_text == netpolicy.OPEN):
                self._log("NetworkPolicy: " + ("open (no policy selects it)" if text == netpolicy.OPEN else "isolated"))
            self.firewall_text = text
        self.firewall_generation = generation

    def _teardown(self) -> None:
        if self.netns:
            pids = network.netns_pids(self.netns)
            for pid in pids:
                procs.kill_group(pid, signal.SIGKILL)
            procs.wait_gone(pids, 10.0)
            network.delete_netns(self.netns)
        volumes.remove(self.vols)
        self.ctx.gpus.release(self.uid)
        if not self.host_network:
            self.ctx.release_ip(self.pod_ip)

    def _kill_all(self, grace_s: float) -> None:
        running = [c for c in self.containers if c.proc and c.proc.poll() is None]
        for c in running:
            assert c.proc is not None
            c.proc.signal_tree(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(c.proc and c.proc.poll() is None for c in running):
            if self.gone:
                break
            self.wake.wait(0.1)
            self.wake.clear()
        for c in self.containers:
            if c.proc:
                c.proc.kill()

    def _terminate(self, pod: Obj) -> None:
        """Graceful deletion: SIGTERM, the grace period, SIGKILL, then the final delete."""
        grace = pod["metadata"].get("deletionGracePeriodSeconds")
        if grace is None:
            grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
        self._log(f"deleting: SIGTERM, then SIGKILL after {grace}s")
        self._kill_all(float(grace))
        if self.gone or self.stopping:
            return
        meta = pod["metadata"]
        try:
            self.ctx.client.delete(
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}},
            )
        except ApiError as e:
            if e.status not in (404, 409):
                self._log(f"final delete failed: {e}")

    # -- containers ---------------------------------------------------------------------------------
    def _base_env(self, pod: Obj) -> dict[str, str]:
        ctx = self.ctx
        port = str(ctx.api_port)
        return {
            "PATH": f"{ctx.venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "HOSTNAME": socket.gethostname() if self.host_network else pod_hostname(pod),
            "KUBERNETES_SERVICE_HOST": ctx.api_host,
            "KUBERNETES_SERVICE_PORT": port,
            "KUBERNETES_SERVICE_PORT_HTTPS": port,
            "KUBERNETES_PORT": f"tcp://{ctx.api_host}:{port}",
        }

    def _start(self, pod: Obj, c: Container) -> None:
        def lookup(kind: str, namespace: str, name: str) -> Obj | None:
            return volumes.lookup(self.ctx.client, kind, namespace, name)

        ips = {
            "podIP": self.pod_ip,
            "podIPs": [{"ip": self.pod_ip}],
            "hostIP": self.ctx.node_ip,
            "hostIPs": [{"ip": self.ctx.node_ip}],
        }
        base = {**self._base_env(pod), **self.ctx.gpus.env(self.uid, c.spec)}
        env = resolve_env({**pod, "status": {**pod.get("status", {}), **ips}}, c.spec, base, lookup)
        argv = command_line(c.spec, env)
        etc = self.dir / "etc"
        gpus = self.ctx.gpus.env(self.uid, c.spec).get("CUDA_VISIBLE_DEVICES", "")
        files = containers.Files(self.dir / "run", c.name)
        files.run_dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(  # before the shim starts: a later agent adopts the run from it (see _adopt)
            files.state,
            json.dumps({
                "runs": c.runs + 1,
                "startedWall": time.time(),
                "lastState": c.last_state,
                "backoffS": c.backoff_s,
                "gpus": [int(i) for i in gpus.split(",") if i],
            }),
        )
        mounts: list[dict[str, Any]] = [
            {"source": str(etc / "hosts"), "target": "/etc/hosts", "readOnly": False},
            {"source": str(etc / "resolv.conf"), "target": "/etc/resolv.conf", "readOnly": False},
            *volumes.mounts_for(c.spec, self.vols),
        ]
        c.proc = containers.start(
            python=self.ctx.python,
            netns=self.netns,
            spec_file=self.dir / "run" / f"{c.name}.json",
            argv=argv,
            env=env,
            mounts=mounts,
            hostname=None if self.host_network else pod_hostname(pod),
            working_dir=c.spec.get("workingDir"),
            log_file=self.dir / "logs" / f"{c.name}.log",
        )
        c.env = env
        c.runs += 1
        c.kill_deadline = None
        c.state = {"running": {"startedAt": _rfc3339(c.proc.started_wall)}}
        readiness, liveness = c.spec.get("readinessProbe"), c.spec.get("livenessProbe")
        c.readiness = ProbeState.start(readiness, False) if readiness and not c.init else None
        c.liveness = ProbeState.start(liveness, True) if liveness and not c.init else None
        c.ready = c.readiness is None and not c.init

    def _step_container(self, pod: Obj, c: Container) -> None:
        policy = pod["spec"].get("restartPolicy", "Always")
        if c.proc is not None:
            code = c.proc.poll()
            if code is None:
                self._probe(c)
                return
            self._exited(c, code, policy)
        if c.done or time.monotonic() < c.next_start:
            return
        try:
            self._start(pod, c)
        except (ConfigError, RuntimeError) as e:
            c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(e)}}
            c.next_start = time.monotonic() + 1.0

    def _exited(self, c: Container, code: int, policy: str) -> None:
        assert c.proc is not None
        exit_code = 128 - code if code < 0 else code
        ran_s = time.time() - c.proc.started_wall
        terminated = {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
            "startedAt": _rfc3339(c.proc.started_wall),
            "finishedAt": _rfc3339(c.proc.finished_wall() or time.time()),
            "containerID": f"sandbox://{c.proc.pid}",
        }
        c.proc.kill()  # whatever it left behind in its process group
        c.proc, c.ready, c.readiness, c.liveness = None, False, None, None
        if c.init:
            restart = exit_code != 0 and policy != "Never"
        else:
            restart = policy == "Always" or (policy == "OnFailure" and exit_code != 0)
        if not restart:
            c.state, c.done, c.succeeded = {"terminated": terminated}, True, exit_code == 0
            return
        if ran_s > 2 * self.ctx.backoff_cap_s:
            c.backoff_s = 0.0
        c.backoff_s = min(c.backoff_s * 2 or self.ctx.backoff_base_s, self.ctx.backoff_cap_s)
        c.next_start = time.monotonic() + c.backoff_s
        c.last_state = {"terminated": terminated}
        c.state = {
            "waiting": {
                "reason": "CrashLoopBackOff",
                "message": f"back-off {c.backoff_s:g}s restarting failed container={c.name}",
            }
        }
        self._log(f"container {c.name} exited with {exit_code}; restarting in {c.backoff_s:g}s")

    def _probe(self, c: Container) -> None:
        assert c.proc is not None
        if c.kill_deadline is not None:
            if time.monotonic() >= c.kill_deadline:
                c.proc.signal_tree(signal.SIGKILL)
            return
        if c.readiness and c.readiness.due():
            c.readiness.record(run_probe(c.readiness.probe, c.spec, self.pod_ip, c.proc.pid, c.env))
            c.ready = c.readiness.passing
        if c.liveness and c.liveness.due():
            changed = c.liveness.record(run_probe(c.liveness.probe, c.spec, self.pod_ip, c.proc.pid, c.env))
            if changed and not c.liveness.passing:
                grace = float(self.pod["spec"].get("terminationGracePeriodSeconds", 30))
                self._log(f"container {c.name} failed its liveness probe: killing it")
                c.proc.signal_tree(signal.SIGTERM)
                c.kill_deadline = time.monotonic() + grace

    # -- status -------------------------------------------------------------------------------------
    def _progress(self) -> list[podstatus.Progress]:
        return [podstatus.Progress(c.init, c.runs, c.done, c.succeeded, c.ready) for c in self.containers]

    def _phase(self, pod: Obj) -> str:
        result: str = podstatus.phase(pod["spec"].get("restartPolicy", "Always"), self._progress())
        return result

    def _conditions(self, pod: Obj, phase: str) -> list[Obj]:
        old = pod.get("status", {}).get("conditions", [])
        result: list[Obj] = podstatus.conditions(old, self._progress(), phase, self.setup_done, now_rfc3339())
        return result

    def _publish(self, pod: Obj) -> None:
        phase = self._phase(pod)
        status: Obj = {
            "phase": phase,
            "hostIP": self.ctx.node_ip,
            "hostIPs": [{"ip": self.ctx.node_ip}],
            "podIP": self.pod_ip,
            "podIPs": [{"ip": self.pod_ip}],
            "startTime": self.started_at,
            "initContainerStatuses": [c.status() for c in self.containers if c.init],
            "containerStatuses": [c.status() for c in self.containers if not c.init],
        }
        if self.setup_error:
            status["message"] = self.setup_error
        comparable = {
            **status,
            "conditions": [(c["type"], c["status"]) for c in self._conditions(pod, phase)],
        }
        if comparable == self.published:
            return
        status["conditions"] = self._conditions(pod, phase)
        meta = pod["metadata"]
        try:
            self.ctx.client.merge_patch(
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status", {"status": status}
            )
            self.published = comparable
        except ApiError as e:
            if e.status == 404:
                self.mark_gone()
            else:
                self._log(f"status update failed: {e}")

    def _log(self, message: str) -> None:
        meta = self.pod["metadata"]
        log(f"pod {meta['namespace']}/{meta['name']}: {message}")
