"""cilia-agent: loads the datapath, restores endpoints, keeps the node in step with the
datastore, serves the CNI plugin and the CLI."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path

from pyroute2 import IPRoute

from cilia.agent.config import AgentConfig
from cilia.agent.endpoint import EndpointManager, EndpointsView
from cilia.agent.flows import FlowHistory
from cilia.agent.masquerade import CHAIN, Masquerade
from cilia.agent.metrics import (
    POLICY_PROPAGATION,
    SYNC_ERRORS,
    AgentCollector,
    FlowMetrics,
    serve_metrics,
)
from cilia.agent.monitor import Monitor
from cilia.agent.netdev import (
    HostDevices,
    default_route_device,
    detach_cilia_programs,
    first_address,
)
from cilia.agent.policy import PolicyEngine
from cilia.agent.policy_writer import PolicyWriter
from cilia.agent.prefilter import KIND as PREFILTER_KIND
from cilia.agent.prefilter import Prefilter
from cilia.agent.routing import RTPROT_CILIA, VXLAN_DEVICE, NodeRoutes, node_object
from cilia.agent.server import serve
from cilia.agent.services import ServiceController
from cilia.agent.socket_lb import SocketLB, detach_pinned
from cilia.crashpoints import crash_point
from cilia.datapath import kernel_drops, layouts
from cilia.datapath.conntrack import ConntrackLimit, ct_map_size, default_endpoint_limit
from cilia.datapath.loader import Datapath, remove_pins
from cilia.datastore.local import LocalDatastore
from cilia.ipam import Ipam

log = logging.getLogger("cilia.agent")

# The longest the reconcile loop waits for a change before looking at `stop` again.
WAKE_SECONDS = 0.5
ROUTES_RESYNC_SECONDS = 30.0  # routes synced at a reconcile this long after the last
STATE_FILES = ("ipam.json", "endpoints.json")  # what an agent keeps in --state-dir


def _sysctl(name: str, value: str) -> None:
    """Sets a sysctl unless it already has the value: in its chart the agent runs with
    capabilities, not privileged, where /proc/sys is read-only (an init container sets
    them); a value that is wrong and cannot be set is an error naming it."""
    path = Path("/proc/sys", *name.split("."))
    if path.read_text().strip() == value:
        return
    try:
        path.write_text(value)
    except OSError as err:
        raise RuntimeError(f"sysctl {name} is {path.read_text().strip()}, must be {value}, "
                           f"and cannot be set here ({err.strerror}): set it on the node "
                           "(the chart's apply-sysctls init container does)") from err


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        self.started = time.monotonic()
        self.error = ""
        node_dir = config.state_dir
        node_dir.mkdir(parents=True, exist_ok=True)
        if config.datastore == "kubernetes":
            from cilia.datastore.kubernetes import KubernetesDatastore

            self.datastore = KubernetesDatastore.connect(config.node_name, config.kubeconfig)
            config.pod_cidr = config.pod_cidr or self.datastore.wait_pod_cidr()
        else:
            self.datastore = LocalDatastore(config.local_datastore_dir)
        # The node routes for its pods: traffic the datapath hands to the stack.
        _sysctl("net.ipv4.ip_forward", "1")
        ct_size = config.ct_map_max or ct_map_size()
        sizes = {layouts.CONNTRACK.name: ct_size}
        if config.policy_map_max:
            sizes[layouts.POLICY.name] = config.policy_map_max
        self.datapath = Datapath(config.bpffs_root, config.bpf_dir, sizes)
        dp = self.datapath
        self.ct_limit = ConntrackLimit(
            dp.map(layouts.CONNTRACK), dp.map(layouts.CT_CREATED), dp.map(layouts.CT_CREDITED),
            dp.map(layouts.CT_LIMIT), default_endpoint_limit(ct_size)
            if config.ct_endpoint_max is None else config.ct_endpoint_max)
        self.ct_limit.start()

        devices = config.devices or default_route_device()
        if not devices:
            log.warning("no uplink device (--devices, or a default route): no XDP "
                        "prefilter, no from-netdev delivery, no routes to other nodes")
        self.node_ip = config.node_ip or (first_address(devices[0]) if devices else "")
        self.host_devices = HostDevices(devices, self.datapath, config.prefilter)
        self.host_devices.attach()
        self.routes = NodeRoutes(config.routing, config.node_name, config.pod_cidr,
                                 self.node_ip, devices[0] if devices else "", config.mtu,
                                 self.datapath.map(layouts.TUNNEL))
        if (vxlan := self.routes.setup()) is not None:
            self.host_devices.add_overlay(VXLAN_DEVICE, vxlan)
        self.masquerade = Masquerade(config.pod_cidr, config.cluster_cidr,
                                     config.iptables_mode)
        if config.masquerade:
            self.masquerade.setup()
        else:
            self.masquerade.cleanup()
        self.prefilter = Prefilter(self.datapath)
        self._prefilter_revision: tuple | None = None
        self._routes_revision: tuple | None = None
        self._routes_at = 0.0
        if self.node_ip:
            self.datastore.put(node_object(config.node_name, config.pod_cidr, self.node_ip))

        self.ipam = Ipam(config.pod_cidr, node_dir / STATE_FILES[0])
        self.endpoints = EndpointManager(
            config.node_name, self.datapath, self.ipam, node_dir / STATE_FILES[1],
            config.mtu, self.pod_labels,
        )
        self.endpoints.restore()
        # Where a crash test looks at the maps as restore() left them, before any sync
        # (which would rewrite the flags and hide a restore that weakened them).
        crash_point("agent:restored")
        # The engine computes plans and holds no map; the writer owns the policy and
        # ipcache maps; the endpoints map stays the endpoint manager's.
        self.policy = PolicyEngine(self.datastore, config, self.endpoints,
                                   self.routes.remote_addresses,
                                   PolicyWriter(self.datapath, self.endpoints))
        self.policy_view = self.policy.view
        self.endpoints_view = EndpointsView(self.endpoints)
        self.services = ServiceController(
            self.datapath, self.datastore, source=config.datastore,
            node_name=config.node_name, service_cidr=config.service_cidr, enabled=config.services,
            external=config.kube_proxy_replacement, maglev=config.maglev_table_size)
        self.socket_lb = SocketLB(self.datapath, config.socket_lb_cgroup, config.socket_lb)
        self.socket_lb.setup()
        self.endpoints.admit = lambda ep: self.policy.sync(adding=ep.id)
        self.endpoints.changed = self._endpoint_changed
        self.endpoints.host_network = self.pod_host_network
        try:
            self.reconcile()
        except ReconcileError as err:  # the others did their part: serve, and retry
            self.error = f"reconcile failed, retrying: {err}"
        self.monitor = Monitor(
            self.policy_view, config.bpffs_root, config.node_name, self.services.describe,
            FlowHistory(config.flow_history),
            FlowMetrics(config.metrics_workload_labels, config.metrics_workload_series))
        # The stack's own drops of this node's pods' packets, into the same flows; held
        # by this process (an agent that is gone reports nothing and leaves nothing).
        self.kernel_drops = kernel_drops.start(self.datapath, self.endpoints.list(),
                                               enabled=config.kernel_drop_reasons)

    def reconcile(self) -> None:
        """Brings routes, prefilter, policy and Services in step with the datastore as it
        is now. Each controller on its own: one failing (a bad object, a full map) never
        stops the others; all failures are raised together, naming each controller."""
        failures = []
        for name, step in (("routes", self._sync_routes), ("prefilter", self._sync_prefilter),
                           ("policy", self._sync_policy), ("services", self.services.sync)):
            try:
                step()
            except Exception as err:  # noqa: BLE001 - reported below, with its controller
                log.exception("%s controller failed", name)
                SYNC_ERRORS.labels(name).inc()
                failures.append(f"{name}: {err}")
        rejected = [f"CiliaNode {n}: {why}" for n, why in sorted(self.routes.rejected.items())]
        if failures or rejected:
            raise ReconcileError("; ".join(failures + rejected))

    def _sync_routes(self) -> None:
        # When a CiliaNode changed, and now and then whatever changed (what the kernel
        # holds may have drifted): reading the kernel's routes and tunnels at every
        # reconcile cost a policy change more CPU than its policy.
        revision = self.datastore.revision(["CiliaNode"])
        if revision == self._routes_revision and \
                time.monotonic() - self._routes_at < ROUTES_RESYNC_SECONDS:
            return
        self.routes.sync(self.datastore.list("CiliaNode"))
        self._routes_revision, self._routes_at = revision, time.monotonic()

    def _sync_prefilter(self) -> None:
        # Only when a CiliaPrefilter changed: tens of thousands of CIDRs take a while to
        # parse, and every other reconcile (a pod, a policy) would wait for them.
        revision = self.datastore.revision([PREFILTER_KIND])
        if revision == self._prefilter_revision:
            return
        self.prefilter.sync(self.datastore.list(PREFILTER_KIND))
        self.host_devices.set_prefilter(bool(self.prefilter.slots))
        self._prefilter_revision = revision

    def notices(self) -> list[str]:
        """Objects the agent refuses, or cannot serve, though the reconcile went on
        (`cilia status` names them): CiliaPrefilters that do not fit (retrying would
        not change them), pods without a security identity (only they are affected;
        tried again every few seconds). None is a reconcile error."""
        return ([f"CiliaPrefilter {name}: {why}"
                 for name, why in sorted(self.prefilter.refused.items())]
                + [f"pod {u}" for u in self.policy_view.unidentified()])

    def _sync_policy(self) -> None:
        # An ADD may just have compiled this very state; pods without an identity are
        # tried again now and then (the API may be back, an identity freed).
        if not self.policy.in_sync() or self.policy.retry_due():
            self.policy.sync()

    def run(self, stop: threading.Event) -> None:
        """Reconciles as soon as the datastore changes: the kubernetes datastore wakes
        this loop from its informers, the local one from inotify. Each controller then
        does only what its own kinds need."""
        last = self.datastore.revision()
        while not stop.is_set():
            revision = self.datastore.wait_changed(last, WAKE_SECONDS)
            if revision == last and not self.error and not self.policy.retry_due():
                continue
            seen, syncs = time.monotonic(), self.policy.sync_count
            try:
                self.reconcile()
                last = revision
                self.error = ""
                if self.policy.sync_count != syncs:
                    POLICY_PROPAGATION.observe(time.monotonic() - seen)
            except Exception as err:
                # Shown by `cilia status`; the maps keep what was written, and the
                # write order means a partial update never allows more than before.
                self.error = f"reconcile failed, retrying: {err}"
                if not isinstance(err, ReconcileError):  # those were logged per controller
                    log.exception("reconcile failed; retrying")
                stop.wait(1.0)

    def _endpoint_changed(self, ep, added: bool) -> None:
        """Publishes the pod's address in its status (as the kubelet would), so other
        nodes' ipcaches learn it, and recompiles without the endpoint on delete."""
        def status(pod: dict) -> dict:
            if added:
                pod["status"] = {"phase": "Running", "podIP": ep.ip,
                                 "nodeName": self.config.node_name}
            else:
                pod.pop("status", None)
            return pod

        if ep.pod_name:
            self.datastore.update("Pod", ep.pod_namespace or "default", ep.pod_name, status)
        if not added:
            self.policy.sync()
        if getattr(self, "kernel_drops", None) is not None:  # its pod's namespace
            self.kernel_drops.endpoint_changed(ep, added)

    def pod_host_network(self, namespace: str, name: str) -> bool:
        pod = self.datastore.get("Pod", namespace or "default", name)
        return bool(pod and (pod.get("spec") or {}).get("hostNetwork"))

    def pod_labels(self, namespace: str, name: str) -> dict[str, str] | None:
        pod = self.datastore.get("Pod", namespace or "default", name)
        if pod is None:
            return None
        return dict(pod.get("metadata", {}).get("labels") or {})


class ReconcileError(RuntimeError):
    """Some controllers could not do their part; the message names each."""


def cleanup_node(config: AgentConfig) -> None:
    """Undoes everything agents set up on this node, each controller its own part: pods'
    host veths (their peers go with them), cilia's programs on every device, routes,
    the VXLAN device, the masquerade chain, pinned maps, state and socket. Idempotent;
    what is not cilia's is left alone."""
    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if name.startswith("lxc") and link.get_nested("IFLA_LINKINFO",
                                                          "IFLA_INFO_KIND") == "veth":
                ipr.link("del", index=link["index"])
                log.info("removed pod veth %s", name)
                continue
            for what in detach_cilia_programs(link["index"]):
                log.info("detached %s program from %s", what, name)
    NodeRoutes(config.routing, config.node_name, config.pod_cidr, "", "", config.mtu).cleanup()
    Masquerade(config.pod_cidr, config.cluster_cidr, config.iptables_mode).cleanup()
    for program in detach_pinned(config.bpffs_root):
        log.info("detached socket LB program %s from its cgroup", program)
    remove_pins(config.bpffs_root)
    # Only the agent's own files: a state directory may hold others' (the local
    # datastore, the lab's other nodes), and nothing but what this agent wrote goes.
    for name in STATE_FILES:
        (config.state_dir / name).unlink(missing_ok=True)
    try:
        config.state_dir.rmdir()
    except OSError:
        pass  # not empty or not there: someone else's files stay
    Path(config.socket).unlink(missing_ok=True)
    log.info("node clean: no routes (proto %d), %s, iptables chain %s, maps in %s or "
             "state in %s left", RTPROT_CILIA, VXLAN_DEVICE, CHAIN, config.bpffs_root,
             config.state_dir)


def main(argv: list[str] | None = None) -> None:
    config = AgentConfig.from_args(argv)
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if config.cleanup:
        cleanup_node(config)
        return
    try:
        agent = Agent(config)
    except Exception as err:
        log.error("cannot start: %s", err)
        sys.exit(1)
    stop = threading.Event()
    threading.Thread(target=agent.run, args=(stop,), name="reconcile", daemon=True).start()
    threading.Thread(target=agent.monitor.run, args=(stop,), name="monitor", daemon=True).start()
    threading.Thread(target=agent.ct_limit.run, args=(stop,), name="ct-gc", daemon=True).start()
    server = serve(agent, config.socket)
    if config.metrics_port:
        addresses = config.metrics_addresses or [a for a in (agent.node_ip, "127.0.0.1")
                                                 if a]
        serve_metrics(AgentCollector(
            agent.datapath, agent.endpoints_view, agent.policy_view, agent.prefilter,
            failing=lambda: bool(agent.error), flows_kept=lambda: len(agent.monitor.history),
        ), config.metrics_port, addresses)
    log.info(
        "node %s ready: pod CIDR %s, node IP %s, %s routing, maps in %s, API on %s",
        config.node_name, config.pod_cidr, agent.node_ip, config.routing, config.bpffs_root,
        config.socket,
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    # Leave programs attached and maps pinned: pods keep working while the agent is away.
    log.info("stopping; the datapath keeps running")
    server.stop(grace=2).wait()


if __name__ == "__main__":
    main()
