"""The node agent: registers `sandbox-node-0` and runs the pods bound to it as local processes.

    python -m weightsync.sandbox.agent --state-dir DIR --kubeconfig FILE --api-host IP --api-port PORT

Threads: one watches this node's pods (field selector spec.nodeName), one watches Services (for the pods'
hosts files), where NetworkPolicy is enforced one each watches NetworkPolicies and Namespaces (for the pods'
iptables rules, netpolicy.py), one posts node heartbeats and the Lease, and every pod has its own worker thread.

Containers run under shims of their own (shim.py), not as the agent's children, so an agent that is killed
and started again (the sandbox's supervisor does both) finds them running: its first pod listing adopts every
pod whose network namespace (or, hostNetwork, directory) an earlier agent made, with the same address and the
same container processes, and removes what is left of pods that are gone or ended. SIGTERM still stops every
pod (`down`).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

from weightsync.sandbox import firewall, gpus, network, node, procs
from weightsync.sandbox.agentlog import log
from weightsync.sandbox.gpus import GpuAllocator
from weightsync.sandbox.kubeclient import ApiError, KubeClient
from weightsync.sandbox.kubelet_server import KubeletServer
from weightsync.sandbox.netpolicy import PolicyIndex, render_v4, render_v6
from weightsync.sandbox.podspec import Obj, cluster_entries, hosts_text, hosts_view
from weightsync.sandbox.podworker import AgentContext, PodWorker

HEARTBEAT_S = 10.0
WATCH_S = 60
POLICIES_WAIT_S = 30.0


_log = log


class Agent:
    def __init__(self, args: argparse.Namespace) -> None:
        self.client = KubeClient.from_kubeconfig(Path(args.kubeconfig))
        self.node_name: str = args.node_name
        self.api_host: str = args.api_host
        self.kubelet_port: int = args.kubelet_port
        self.net = network.PodNetwork.for_state_dir(Path(args.state_dir))
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.pods: dict[str, Obj] = {}
        self.services: dict[tuple[str, str], Obj] = {}
        self.policies: dict[tuple[str, str], Obj] = {}
        self.namespaces: dict[tuple[str, str], Obj] = {}
        self.iptables = firewall.recorded(Path(args.state_dir))
        self._policy_index: tuple[int, PolicyIndex] | None = None
        # listed once: until then no pod's rules are computed (an adopted pod keeps what it had, rather than
        # being opened for want of the policies)
        self.policies_listed, self.namespaces_listed = threading.Event(), threading.Event()
        self.workers: dict[str, PodWorker] = {}
        self.addresses = network.AddressPool(self.net.pod_addresses())
        self.generation = 0  # bumped on every change a hosts file or a pod's iptables rules depend on
        #: namespace -> (generation, its cluster_entries at that generation)
        self._entries: dict[str, tuple[int, list[tuple[str, str]]]] = {}
        self.swept = False  # what an earlier agent left: adopted or removed after the first pod listing
        self.ctx = AgentContext(
            client=self.client,
            node_name=self.node_name,
            node_ip=args.api_host,
            state_dir=Path(args.state_dir),
            net=self.net,
            api_host=args.api_host,
            api_port=int(args.api_port),
            python=sys.executable,
            venv_bin=str(Path(sys.executable).parent),
            backoff_base_s=float(os.environ.get("WEIGHTSYNC_SANDBOX_BACKOFF_BASE_S", "2")),
            backoff_cap_s=float(os.environ.get("WEIGHTSYNC_SANDBOX_BACKOFF_CAP_S", "60")),
            hosts_for=self.hosts_for,
            hosts_generation=lambda: self.generation,
            firewall_for=self.firewall_for,
            iptables=self.iptables,
            gpus=GpuAllocator(gpus.detect()),
            release_ip=self.release_ip,
        )

    # -- shared state -------------------------------------------------------------------------------
    def hosts_for(self, pod: Obj) -> str:
        # Rendered once per change and namespace, not per pod: every pod's worker asks after each change,
        # and rendering is linear in the cluster's pods and Services (quadratic per change, cubic to form
        # a cluster, when each pod rendered its own: the agent saturated a core at a few hundred pods).
        namespace = pod["metadata"]["namespace"]
        with self.lock:
            generation = self.generation
            cached_entries = self._entries.get(namespace)
            if cached_entries is not None and cached_entries[0] == generation:
                entries = cached_entries[1]
            else:
                entries = cluster_entries(namespace, self._pods_with_addresses(), self.services.values())
                self._entries[namespace] = (generation, entries)
        return hosts_text(pod, entries, self.api_host)

    def firewall_for(self, pod: Obj) -> tuple[str, str] | None:
        """The pod's iptables and ip6tables filter tables (iptables-restore input) for the NetworkPolicies now;
        None before the policies and namespaces were listed."""
        if not (self.policies_listed.is_set() and self.namespaces_listed.is_set()):
            return None
        with self.lock:
            if self._policy_index is None or self._policy_index[0] != self.generation:
                index = PolicyIndex(self.policies.values(), self._pods_with_addresses(), self.namespaces.values())
                self._policy_index = (self.generation, index)
            index = self._policy_index[1]
        rules = index.rules_for(pod)
        return render_v4(rules, self.api_host), render_v6(rules is not None)

    def _pods_with_addresses(self) -> list[Obj]:
        """Every pod, its podIP the one its worker holds (published or not yet). Under the lock."""
        pods = []
        for uid, cached in self.pods.items():
            worker = self.workers.get(uid)
            if worker is not None and not worker.host_network:
                cached = {**cached, "status": {**cached.get("status", {}), "podIP": worker.pod_ip}}  # noqa: PLW2901
            pods.append(cached)
        return pods

    def container_running(self, namespace: str, name: str, container: str) -> bool:
        """Whether that container has a process now (a followed log ends when it has not)."""
        with self.lock:
            workers = list(self.workers.values())
        return any(
            w.pod["metadata"]["namespace"] == namespace
            and w.pod["metadata"]["name"] == name
            and not w.finished.is_set()
            and any(c.name == container and c.proc is not None for c in w.containers)
            for w in workers
        )

    def allocate_ip(self) -> str:
        with self.lock:
            return self.addresses.take()

    def _address(self, netns: str) -> str:
        """The pod's address: the one its network namespace has (an earlier agent made it), else a free one."""
        existing = network.netns_address(netns) if Path(f"/run/netns/{netns}").exists() else None
        if existing is None:
            return self.allocate_ip()
        with self.lock:
            self.addresses.hold(existing)
        return existing

    def _pod_dir(self, pod: Obj) -> Path:
        meta = pod["metadata"]
        return self.ctx.state_dir / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"

    def release_ip(self, address: str) -> None:
        with self.lock:
            self.addresses.release(address)

    # -- pods ---------------------------------------------------------------------------------------
    def on_pod(self, pod: Obj) -> None:
        uid = pod["metadata"]["uid"]
        with self.lock:
            before = self.pods.get(uid)
            self.pods[uid] = pod
            if before is None or hosts_view(before) != hosts_view(pod):
                self.generation += 1
            worker = self.workers.get(uid)
        if worker is not None and not worker.finished.is_set():
            worker.update(pod)
            return
        if worker is not None:
            return  # finished: its final delete is on the way
        meta = pod["metadata"]
        netns = self.net.netns_name(uid)
        host_network = bool(pod["spec"].get("hostNetwork"))
        ran_here = Path(f"/run/netns/{netns}").exists() or (host_network and self._pod_dir(pod).is_dir())
        if meta.get("deletionTimestamp") and not ran_here:
            self._final_delete(pod)
            return
        if pod.get("status", {}).get("phase") in ("Succeeded", "Failed") and not meta.get("deletionTimestamp"):
            return  # ended (an earlier agent's leftovers of it are swept at start)
        address = self.net.gateway if host_network else self._address(netns)
        worker = PodWorker(self.ctx, pod, address)  # adopts what an earlier agent left running
        with self.lock:
            self.workers[uid] = worker
            self.generation += 1
        _log(f"starting pod {meta['namespace']}/{meta['name']} at {address}")
        worker.start()

    def on_pod_gone(self, uid: str) -> None:
        with self.lock:
            self.pods.pop(uid, None)
            self.generation += 1
            worker = self.workers.get(uid)
        if worker is not None:
            worker.mark_gone()

    def _final_delete(self, pod: Obj) -> None:
        meta = pod["metadata"]
        try:
            self.client.delete(
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}},
            )
        except ApiError as e:
            if e.status not in (404, 409):
                _log(f"final delete of {meta['namespace']}/{meta['name']} failed: {e}")

    def reap(self) -> None:
        with self.lock:
            for uid, worker in list(self.workers.items()):
                if worker.finished.is_set() and uid not in self.pods:
                    del self.workers[uid]

    # -- loops --------------------------------------------------------------------------------------
    def _loop(self, name: str, body: Callable[[], None], pause: float) -> None:
        while not self.stop_event.is_set():
            try:
                body()
            except Exception:
                _log(f"{name}: {traceback.format_exc().strip().splitlines()[-1]}")
                self.stop_event.wait(1.0)
                continue
            self.stop_event.wait(pause)

    def watch_pods(self) -> None:
        params = {"fieldSelector": f"spec.nodeName={self.node_name}"}
        listing = self.client.get("/api/v1/pods", params)
        current = {p["metadata"]["uid"]: p for p in listing["items"]}
        with self.lock:
            vanished = [uid for uid in self.pods if uid not in current]
        for uid in vanished:
            self.on_pod_gone(uid)
        if not self.swept:
            self._reserve_addresses()
        for pod in current.values():
            self.on_pod(pod)
        if not self.swept:
            self._sweep(current)
            self.swept = True
            synced = self.ctx.state_dir / "run" / "node-agent.synced"  # Sandbox.restart waits for it
            synced.write_text(f"{os.getpid()}\n")
        self.reap()
        for kind, obj in self.client.watch(
            "/api/v1/pods", listing["metadata"]["resourceVersion"], params, timeout_s=WATCH_S
        ):
            if self.stop_event.is_set() or kind == "ERROR":
                return
            if kind == "DELETED":
                self.on_pod_gone(obj["metadata"]["uid"])
            elif kind in ("ADDED", "MODIFIED"):
                self.on_pod(obj)
            self.reap()

    def _reserve_addresses(self) -> None:
        """The addresses of the pod networks an earlier agent left (before any is handed out again)."""
        for netns in self.net.list_netns():
            address = network.netns_address(netns)
            if address:
                with self.lock:
                    self.addresses.hold(address)

    def _sweep(self, current: dict[str, Obj]) -> None:
        """Once, after the first listing: what an earlier agent left of pods no worker runs now (gone from the
        API or ended) is removed: their network namespaces, every process in them, their shims."""
        with self.lock:
            running = {self.net.netns_name(uid) for uid, w in self.workers.items() if not w.finished.is_set()}
        for netns in self.net.list_netns():
            if netns in running:
                continue
            _log(f"removing leftover network namespace {netns}")
            address = network.netns_address(netns)
            for pid in network.netns_pids(netns):
                procs.kill_group(pid, signal.SIGKILL)
            network.delete_netns(netns)
            if address:
                self.release_ip(address)
        kept = {w.dir for w in self.workers.values()}
        for pid_file in (self.ctx.state_dir / "pods").glob("*/run/*.pid"):
            if pid_file.parent.parent in kept:
                continue
            leftover = procs.running_pid(pid_file.name.removesuffix(".pid"), pid_file.parent)
            if leftover is not None:  # a shim or a container (of a hostNetwork pod: no namespace) left behind
                _log(f"killing leftover process {leftover} ({pid_file})")
                procs.kill_group(leftover, signal.SIGKILL)

    def watch_services(self) -> None:
        self._mirror("/api/v1/services", self.services)

    def watch_policies(self) -> None:
        self._mirror("/apis/networking.k8s.io/v1/networkpolicies", self.policies, self.policies_listed)

    def watch_namespaces(self) -> None:
        self._mirror("/api/v1/namespaces", self.namespaces, self.namespaces_listed)

    def _mirror(self, path: str, into: dict[tuple[str, str], Obj], listed: threading.Event | None = None) -> None:
        """Keeps `into` (keyed by namespace and name) equal to the collection at `path`, bumping the generation
        at every change (hosts files and pods' iptables rules are computed again)."""
        listing = self.client.get(path)
        with self.lock:
            into.clear()
            into.update({_key(o): o for o in listing["items"]})
            self.generation += 1
        if listed is not None:
            listed.set()
        for kind, obj in self.client.watch(path, listing["metadata"]["resourceVersion"], timeout_s=WATCH_S):
            if self.stop_event.is_set() or kind == "ERROR":
                return
            if kind not in ("ADDED", "MODIFIED", "DELETED"):
                continue  # BOOKMARK
            with self.lock:
                if kind == "DELETED":
                    into.pop(_key(obj), None)
                else:
                    into[_key(obj)] = obj
                self.generation += 1

    def heartbeat(self) -> None:
        try:
            node.heartbeat(self.client, self.node_name, self.api_host, self.kubelet_port)
        except ApiError as e:
            if e.status != 404:
                raise
            _log(f"node {self.node_name} was deleted: registering it again")
            node.register(self.client, self.node_name, self.api_host, self.kubelet_port)

    # -- main ---------------------------------------------------------------------------------------
    def run(self) -> None:
        server = KubeletServer(
            (self.api_host, self.kubelet_port),
            self.ctx.state_dir / "pki",
            self.ctx.state_dir / "pods",
            self.container_running,
        )
        server.serve_in_background()
        node.register(self.client, self.node_name, self.api_host, self.kubelet_port)
        _log(f"registered node {self.node_name}")
        loops: list[tuple[str, Callable[[], None], float]] = [
            ("services", self.watch_services, 0.0),
            ("heartbeat", self.heartbeat, HEARTBEAT_S),
        ]
        enforcing = isinstance(self.iptables, firewall.Iptables)
        if enforcing:
            _log(f"enforcing NetworkPolicy ingress with {self.iptables}")
            loops += [("policies", self.watch_policies, 0.0), ("namespaces", self.watch_namespaces, 0.0)]
        else:
            _log(f"NetworkPolicy is NOT enforced (pods accept all traffic): {self.iptables}")
        for name, body, pause in loops:
            threading.Thread(target=self._loop, args=(name, body, pause), daemon=True).start()
        if enforcing:  # pods start (or are adopted) with their rules, not open until the policies are known
            self.policies_listed.wait(POLICIES_WAIT_S)
            self.namespaces_listed.wait(POLICIES_WAIT_S)
        threading.Thread(target=self._loop, args=("pods", self.watch_pods, 0.0), daemon=True).start()
        self.stop_event.wait()
        _log("stopping: killing every pod's processes")
        with self.lock:
            workers = list(self.workers.values())
        for w in workers:
            w.stop()
        for w in workers:
            w.finished.wait(30)
        _log("stopped")


def _key(obj: Obj) -> tuple[str, str]:
    return obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="weightsync.sandbox.agent", description=__doc__)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node-name", default="sandbox-node-0")
    parser.add_argument("--api-host", required=True)
    parser.add_argument("--api-port", required=True)
    parser.add_argument("--kubelet-port", type=int, required=True)
    agent = Agent(parser.parse_args(argv))

    def on_signal(signum: int, _frame: object) -> None:
        agent.stop_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.run()


if __name__ == "__main__":
    main()
