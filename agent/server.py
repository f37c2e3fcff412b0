"""The agent's gRPC services on a root-only unix socket."""

from __future__ import annotations

import ipaddress
import logging
import os
import queue
import time
from concurrent import futures

import grpc

from cilia import __version__
from cilia.agent import policy_query
from cilia.agent.endpoint import GATEWAY, Endpoint, EndpointManager
from cilia.agent.flows import matches as flow_matches
from cilia.agent.metrics import ENDPOINT_REGENERATION
from cilia.api.v1 import cilia_pb2, cilia_pb2_grpc
from cilia.cnispec import INTERNAL, CNIError, check_container_id, check_ifname, check_pod
from cilia.datapath import layouts
from cilia.datapath.layouts import Direction, Reason
from cilia.datapath.loader import Datapath

log = logging.getLogger(__name__)


def _error(err: CNIError) -> cilia_pb2.CNIResponse:
    return cilia_pb2.CNIResponse(
        error=cilia_pb2.CNIError(code=err.code, msg=err.msg, details=err.details)
    )


def _cni_call(fn):
    """Every CNI RPC answers with a CNI error object, never a bare gRPC failure."""

    def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except CNIError as err:
            log.warning("%s failed: %s (%s)", fn.__name__, err.msg, err.details)
            return _error(err)
        except Exception as err:
            log.exception("%s failed", fn.__name__)
            return _error(CNIError(INTERNAL, f"{fn.__name__}: {err!r}"))

    wrapper.__name__ = fn.__name__
    return wrapper


def endpoint_message(ep: Endpoint, node: str) -> cilia_pb2.Endpoint:
    return cilia_pb2.Endpoint(
        id=ep.id, pod_namespace=ep.pod_namespace, pod_name=ep.pod_name,
        container_id=ep.container_id, netns=ep.netns, ip=ep.ip, ifname=ep.ifname,
        host_ifname=ep.host_ifname, host_ifindex=ep.host_ifindex, mac=ep.mac, node=node,
        identity=ep.identity, labels=ep.labels, network_name=ep.network_name,
        policy_audit=bool(ep.flags & layouts.ENDPOINT_F_AUDIT),
    )


def _check_names(request) -> None:
    """The agent checks what any client of its socket sends, not only the plugin: the
    container id and interface name name the host veth and the lease, the pod's names
    its objects."""
    check_container_id(request.container_id)
    check_ifname(request.ifname)
    check_pod(request.pod_namespace, request.pod_name)


class CNIService(cilia_pb2_grpc.CNIServicer):
    def __init__(self, endpoints: EndpointManager):
        self.endpoints = endpoints

    @_cni_call
    def Add(self, request, context):
        _check_names(request)
        started, outcome = time.monotonic(), "failure"
        try:
            ep = self.endpoints.add(
                request.container_id, request.netns, request.ifname, request.network_name,
                request.pod_namespace, request.pod_name,
            )
            outcome = "success"
        finally:
            ENDPOINT_REGENERATION.labels(outcome).observe(time.monotonic() - started)
        return cilia_pb2.CNIResponse(result=_cni_result(ep))

    @_cni_call
    def Del(self, request, context):
        _check_names(request)
        self.endpoints.delete(request.container_id, request.ifname)
        return cilia_pb2.CNIResponse()

    @_cni_call
    def Check(self, request, context):
        _check_names(request)
        self.endpoints.check(request.container_id, request.netns, request.ifname)
        return cilia_pb2.CNIResponse()

    @_cni_call
    def GC(self, request, context):
        valid = {(a.container_id, a.ifname) for a in request.valid_attachments}
        self.endpoints.gc(request.network_name, valid)
        return cilia_pb2.CNIResponse()

    @_cni_call
    def Status(self, request, context):
        return cilia_pb2.CNIResponse()  # answering at all means the datapath is loaded


class AgentService(cilia_pb2_grpc.AgentServicer):
    """`policy`, `endpoints`: the PolicyView and the EndpointsView (read only); the
    agent for the rest of what status and listings show."""

    def __init__(self, agent, policy, endpoints):
        self.agent = agent
        self.policy = policy
        self.endpoints = endpoints
        self.query = policy_query.Sources(policy, endpoints, agent.datapath, agent.services,
                                          agent.config.node_name)

    def Status(self, request, context):
        a = self.agent
        statuses = self.policy.statuses()
        endpoints = self.endpoints.list()
        return cilia_pb2.AgentStatus(
            node=a.config.node_name, ready=True,
            message="; ".join(([a.error] if a.error else []) + a.notices()) or "ok",
            pod_cidr=a.config.pod_cidr,
            endpoints=len(endpoints), bpffs_root=a.config.bpffs_root,
            datastore=f"{a.config.datastore} ({a.config.local_datastore_dir})",
            version=__version__, uptime_seconds=time.monotonic() - a.started,
            socket=a.config.socket, policy_synced=not a.error and self.policy.in_sync(),
            policy_syncs=self.policy.sync_count,
            policies=len(statuses), policies_rejected=sum(not s.valid for s in statuses),
            routing=a.config.routing, node_ip=a.node_ip, devices=_devices(a),
            masquerade=a.config.masquerade, socket_lb=_socket_lb(a),
            kube_proxy_replacement=a.config.kube_proxy_replacement,
            unidentified_pods=_unidentified(self.policy),
            policy_audit_mode=a.config.policy_audit_mode,
            audit_endpoints=sum(bool(e.flags & layouts.ENDPOINT_F_AUDIT)
                                for e in endpoints),
        )

    def ListEndpoints(self, request, context):
        node = self.agent.config.node_name
        return cilia_pb2.EndpointList(
            endpoints=[endpoint_message(e, node) for e in self.endpoints.list()]
        )

    def Metrics(self, request, context):
        return cilia_pb2.MetricList(metrics=read_metrics(self.agent.datapath))

    def ListPolicies(self, request, context):
        return cilia_pb2.PolicyList(policies=[
            cilia_pb2.PolicyStatus(kind=s.kind, namespace=s.namespace, name=s.name,
                                   valid=s.valid, error=s.error, warnings=s.warnings,
                                   selected=s.selected)
            for s in self.policy.statuses()
        ])

    # The queries that read the maps wait for a policy being written to be done.
    def GetEndpointPolicy(self, request, context):
        with self.policy.settled():
            try:
                return policy_query.endpoint_policy(
                    self.query, request.namespace or "default", request.name)
            except policy_query.QueryError as err:
                context.abort(grpc.StatusCode.NOT_FOUND, str(err))

    def Trace(self, request, context):
        with self.policy.settled():
            try:
                return policy_query.trace(self.query, request)
            except policy_query.QueryError as err:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))

    def ListPrefilter(self, request, context):
        entries = self.agent.prefilter.entries()
        return cilia_pb2.PrefilterList(
            entries=[cilia_pb2.PrefilterEntry(cidr=e.cidr, sources=e.sources,
                                              packets=e.packets, bytes=e.bytes)
                     for e in entries],
            devices=_devices(self.agent),
        )

    def ListIpcache(self, request, context):
        return cilia_pb2.IpcacheList(entries=read_ipcache(self.agent.datapath, self.policy))

    def ListServices(self, request, context):
        return cilia_pb2.ServiceList(services=read_services(self.agent))

    def Observe(self, request, context):
        """The history's flows that match (request.last / request.since), then, with
        request.follow, every new one that matches, each once: the live stream is
        subscribed before the history is read, and what it brings that the history
        already gave (by time) is skipped."""
        monitor = self.agent.monitor
        q = monitor.subscribe() if request.follow else None
        try:
            last_time = 0.0
            if request.last or request.since:
                for event in monitor.history.query(monitor.decode_raw, request.filter,
                                                   request.last, request.since):
                    last_time = event.time
                    yield event
            while q is not None and context.is_active():
                try:
                    event = q.get(timeout=0.5)
                except queue.Empty:
                    continue
                if event.time <= last_time or not flow_matches(event, request.filter):
                    continue
                yield event
        finally:
            if q is not None:
                monitor.unsubscribe(q)

    def Monitor(self, request, context):
        q = self.agent.monitor.subscribe()
        try:
            while context.is_active():
                try:
                    event = q.get(timeout=0.5)
                except queue.Empty:
                    continue
                if request.pod and request.pod not in (event.src, event.dst):
                    continue
                if request.verdict and request.verdict != event.verdict:
                    continue
                yield event
        finally:
            self.agent.monitor.unsubscribe(q)


def _cni_result(ep: Endpoint) -> cilia_pb2.CNIResult:
    """The ADD's result, straight from the endpoint (the plugin writes it as the spec's
    JSON): the host-side veth, the pod's interface in its netns, its /32 and the default
    route via the link-local gateway every pod has."""
    return cilia_pb2.CNIResult(
        interfaces=[cilia_pb2.CNIInterface(name=ep.host_ifname, mac=ep.host_mac),
                    cilia_pb2.CNIInterface(name=ep.ifname, mac=ep.mac, mtu=ep.mtu,
                                           sandbox=ep.netns)],
        ips=[cilia_pb2.CNIIP(address=f"{ep.ip}/32", gateway=GATEWAY, interface=1)],
        routes=[cilia_pb2.CNIRoute(dst="0.0.0.0/0", gw=GATEWAY)])


def _unidentified(policy) -> list[cilia_pb2.UnidentifiedPod]:
    return [cilia_pb2.UnidentifiedPod(namespace=u.namespace, name=u.name, reason=u.reason,
                                      local=u.local, identity=u.identity, effect=u.effect)
            for u in policy.unidentified()]


def _socket_lb(agent) -> cilia_pb2.SocketLB:
    st = agent.socket_lb.status()
    return cilia_pb2.SocketLB(
        enabled=st.enabled, cgroup=st.cgroup, netns_cookie=st.netns_cookie,
        hooks=[cilia_pb2.SocketLBHook(hook=h.hook, program=h.program, link_id=h.link_id,
                                      prog_id=h.prog_id) for h in st.hooks])


def _devices(agent) -> list[cilia_pb2.Device]:
    return [cilia_pb2.Device(name=d.name, ifindex=d.ifindex, xdp_mode=d.xdp_mode,
                             from_netdev=d.from_netdev)
            for d in agent.host_devices.status()]


def read_metrics(dp: Datapath) -> list[cilia_pb2.Metric]:
    out = []
    for key, per_cpu in dp.map(layouts.METRICS).items():
        reason = _enum_label(Reason, key.reason)
        out.append(
            cilia_pb2.Metric(
                reason=reason, direction=_enum_label(Direction, key.dir),
                packets=sum(v.packets for v in per_cpu), bytes=sum(v.bytes for v in per_cpu),
                drop=key.reason >= Reason.DROP_BASE,
            )
        )
    return sorted(out, key=lambda m: (m.drop, m.reason, m.direction))


def read_ipcache(dp: Datapath, policy) -> list[cilia_pb2.IpcacheEntry]:
    """The ipcache as the datapath sees it (the kernel's map, not the writer's record of
    it), each identity named: reserved names, a pod identity's labels, CIDRs."""
    out = []
    for key, value in dp.map(layouts.IPCACHE).items():
        labels = policy.labels_of(value.identity) or ()
        out.append(cilia_pb2.IpcacheEntry(
            prefix=key.prefix, identity=value.identity,
            name=policy.names.identity(value.identity), labels=sorted(labels),
            cidr_identity=value.cidr_identity,
            cidr_name=policy.names.identity(value.cidr_identity)))
    return sorted(out, key=lambda e: _prefix_order(e.prefix))


def read_services(agent) -> list[cilia_pb2.ServiceFrontend]:
    """Every frontend the datapath translates, with the backends new connections get
    (in slot order) and the terminating ones that keep their connections."""
    from cilia.agent.services import PROTOCOL_NAMES

    out = []
    for e in agent.services.entries():
        fe = e.frontend
        out.append(cilia_pb2.ServiceFrontend(
            ip=fe.ip, port=fe.port, protocol=PROTOCOL_NAMES.get(fe.proto, str(fe.proto)),
            service=e.service, port_name=e.port_name, id=agent.services.rev_nat_id(fe),
            type=("HostPort" if e.flags & layouts.LB_F_HOSTPORT else
                  "NodePort" if e.flags & layouts.LB_F_NODEPORT else
                  "ExternalIP" if e.flags & layouts.LB_F_EXTERNAL_IP else "ClusterIP"),
            affinity_timeout=e.affinity_timeout,
            external=fe.scope == layouts.LB_SCOPE_EXTERNAL,
            backends=[cilia_pb2.ServiceBackend(ip=b.ip, port=b.port) for b in e.backends]
            + [cilia_pb2.ServiceBackend(ip=b.ip, port=b.port, terminating=True)
               for b in e.terminating]))
    return out


def _prefix_order(prefix: str) -> tuple[int, int]:
    net = ipaddress.IPv4Network(prefix)
    return int(net.network_address), net.prefixlen


def _enum_label(enum_type, value: int) -> str:
    try:
        return enum_type(value).label
    except ValueError:
        return f"unknown_{value}"


def serve(agent, socket_path: str) -> grpc.Server:
    """Starts the server on a unix socket only root can open: the directory is created
    0700 and the socket is created 0600 (umask), so there is no window where others could
    connect."""
    directory = os.path.dirname(socket_path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if os.path.exists(socket_path):
        os.unlink(socket_path)  # left by a previous run
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    cilia_pb2_grpc.add_CNIServicer_to_server(CNIService(agent.endpoints), server)
    cilia_pb2_grpc.add_AgentServicer_to_server(
        AgentService(agent, agent.policy_view, agent.endpoints_view), server)
    old = os.umask(0o177)
    try:
        server.add_insecure_port(f"unix:{socket_path}")
        server.start()
    finally:
        os.umask(old)
    os.chmod(socket_path, 0o600)
    return server
