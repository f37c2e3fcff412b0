"""What a person asks of the policy: which rules an endpoint has, and which rule
decides a connection. Verdicts come from the kernel's own lookups in the maps the
datapath reads, following bpf/lib/policy.h step by step, so a trace shows what the
datapath will do, not what the compiler meant."""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

from cilia.agent.endpoint import Endpoint
from cilia.api.v1 import cilia_pb2
from cilia.datapath import layouts
from cilia.datapath.layouts import IpcacheKey, PolicyKey
from cilia.identity import WORLD
from cilia.policy import PolicyError, cnp_model
from cilia.policy.cilia_model import declared_types as cilia_types
from cilia.policy.cilia_model import parse_cilia_policy
from cilia.policy.cnp_model import parse_cluster_network_policy
from cilia.policy.compiler import ALLOW, DENY, PASS, policy_verdict
from cilia.policy.model import EGRESS, INGRESS, PROTOCOLS, declared_types, parse_network_policy

CLUSTER_KINDS = ("CiliaClusterwideNetworkPolicy", cnp_model.KIND)
ACTION_NAMES = {ALLOW: "allow", DENY: "deny", PASS: "pass"}


class QueryError(ValueError):
    pass


class Sources(NamedTuple):
    """What a query reads: the PolicyView, the EndpointsView, the datapath's policy and
    ipcache maps (looked up, never written), the Services' frontends, the node's name."""

    policy: object
    endpoints: object
    datapath: object
    services: object
    node: str


def _find_endpoint(q: Sources, namespace: str, name: str) -> Endpoint:
    ep = q.endpoints.find(namespace, name)
    if ep is None:
        raise QueryError(f"pod {namespace}/{name} has no endpoint on node {q.node}")
    return ep


def selecting_policies(q: Sources, ep: Endpoint, direction: str) -> list[str]:
    """The policies that select the endpoint in `direction` (valid or not)."""
    out = []
    statuses = {(s.kind, s.namespace, s.name): s for s in q.policy.statuses()}
    for obj in q.policy.policies():
        meta = obj.get("metadata") or {}
        kind = obj.get("kind", "NetworkPolicy")
        ns = "" if kind in CLUSTER_KINDS else meta.get("namespace") or "default"
        key = (kind, ns, meta.get("name", ""))
        status = statuses.get(key)
        if not status or f"{ep.pod_namespace}/{ep.pod_name}" not in status.selected:
            continue
        parse = {"NetworkPolicy": parse_network_policy,
                 cnp_model.KIND: parse_cluster_network_policy}.get(kind, parse_cilia_policy)
        try:
            types = parse(obj).types
        except PolicyError:
            types = (declared_types(obj) if kind == "NetworkPolicy" else cilia_types(obj)
                     if kind != cnp_model.KIND else frozenset((INGRESS, EGRESS)))
        if direction in types:
            where = f"{ns}/{key[2]}" if ns else key[2]
            out.append(f"{kind} {where}" + ("" if status.valid else " (rejected)"))
    return out


def endpoint_policy(q: Sources, namespace: str, name: str) -> cilia_pb2.EndpointPolicy:
    ep = _find_endpoint(q, namespace, name)
    pol = q.policy.endpoint_policy(ep.id)
    names = q.policy.names
    rules = []
    for key, entry in sorted(pol.entries.items()) if pol else ():
        rules.append(cilia_pb2.PolicyRule(
            direction=INGRESS if key.dir == layouts.POLICY_INGRESS else EGRESS,
            peer=names.identity(key.identity), identity=key.identity,
            port=key.port_text(), action=ACTION_NAMES.get(entry.action, "allow"),
            rule=str(entry.rule),
        ))
    return cilia_pb2.EndpointPolicy(
        pod=cilia_pb2.PodRef(namespace=namespace, name=name), endpoint_id=ep.id,
        identity=ep.identity,
        ingress_enforced=bool(ep.flags & layouts.ENDPOINT_F_INGRESS_ENFORCED),
        egress_enforced=bool(ep.flags & layouts.ENDPOINT_F_EGRESS_ENFORCED),
        audit=bool(ep.flags & layouts.ENDPOINT_F_AUDIT),
        rules=rules,
        ingress_policies=selecting_policies(q, ep, INGRESS),
        egress_policies=selecting_policies(q, ep, EGRESS),
    )


def _ipcache(q: Sources, ip: str) -> tuple[int, int]:
    v = q.datapath.map(layouts.IPCACHE).lookup(IpcacheKey.for_prefix(f"{ip}/32"))
    return (v.identity, v.cidr_identity) if v else (WORLD, WORLD)


def _probe(pmap, ep_id: int, direction: int, tier: int, ident: int, proto: int, port: int):
    return pmap.lookup(PolicyKey(layouts.POLICY_PREFIX_FULL, ep_id, direction, tier, ident,
                                 proto, 0, port))


def kernel_verdict(q: Sources, ep_id: int, flags: int, direction: int, identity: int,
                   cidr_identity: int, proto: int, port: int) -> tuple[int, int, list[int]]:
    """(action or 0, cookie, tiers looked up), exactly as policy_verdict() in
    bpf/lib/policy.h, over the kernel's policy map: 0 when the NetworkPolicy tier
    isolates and nothing allowed."""
    pmap = q.datapath.map(layouts.POLICY)
    ingress = direction == layouts.POLICY_INGRESS
    tiered = flags & (layouts.ENDPOINT_F_TIERED_INGRESS if ingress
                      else layouts.ENDPOINT_F_TIERED_EGRESS)
    enforced = flags & (layouts.ENDPOINT_F_INGRESS_ENFORCED if ingress
                        else layouts.ENDPOINT_F_EGRESS_ENFORCED)

    def lookup(tier: int, ident: int):
        v = _probe(pmap, ep_id, direction, tier, ident, proto, port)
        return None if v is None else (v.action, v.rank, v.cookie)

    action, cookie, seen = policy_verdict(lookup, bool(tiered), bool(enforced), identity,
                                          cidr_identity)
    return action, cookie or 0, seen


def trace(q: Sources, req: cilia_pb2.TraceRequest) -> cilia_pb2.TraceResult:
    proto = PROTOCOLS.get(req.protocol.upper() or "TCP")
    if proto is None:
        raise QueryError(f"protocol {req.protocol!r}: use TCP, UDP or SCTP")
    if not 0 < req.port < 65536:
        raise QueryError(f"port {req.port}: must be 1-65535")
    src = _find_endpoint(q, getattr(req, "from").namespace or "default",
                         getattr(req, "from").name)
    if req.to_ip:
        try:
            dst_ip = str(ipaddress.IPv4Address(req.to_ip))
        except ValueError as err:
            raise QueryError(f"--to-ip {req.to_ip!r}: {err}") from err
        service = _frontend(q, dst_ip, req.port, proto)
        if service is not None:
            return _trace_service(q, src, service, proto)
    return _trace(q, src, req, proto)


def _frontend(q: Sources, ip: str, port: int, proto: int):
    """The Service frontend a pod's packet to ip:port would be translated from, if any
    (as cil_from_pod looks it up: the internal scope)."""
    for entry in q.services.entries():
        fe = entry.frontend
        if (fe.ip, fe.port, fe.proto, fe.scope) == (ip, port, proto, layouts.LB_SCOPE_INTERNAL):
            return entry
    return None


def _trace_service(q: Sources, src: Endpoint, entry, proto: int) -> cilia_pb2.TraceResult:
    """Each ready backend traced as the pod-to-pod connection the datapath makes of it."""
    out = cilia_pb2.TraceResult(service=f"{entry.service} {entry.frontend}".strip(),
                                src_identity=src.identity)
    for be in entry.backends:
        req = cilia_pb2.TraceRequest(to_ip=be.ip, port=be.port)
        result = _trace(q, src, req, proto)
        out.backends.append(cilia_pb2.BackendTrace(backend=str(be), result=result))
    out.allowed = bool(entry.backends) and all(b.result.allowed for b in out.backends)
    out.audit = bool(entry.backends) and not out.allowed and all(
        b.result.allowed or b.result.audit for b in out.backends)
    if not entry.backends:
        out.steps.append(cilia_pb2.TraceStep(
            direction=EGRESS, endpoint=f"{src.pod_namespace}/{src.pod_name}", enforced=False,
            allowed=False, reason="the Service has no ready backend: rejected (ICMP port "
            "unreachable from the frontend)"))
    return out


def _trace(q: Sources, src: Endpoint, req: cilia_pb2.TraceRequest, proto: int
           ) -> cilia_pb2.TraceResult:
    dst: Endpoint | None = None
    if req.to_ip:
        dst_ip = str(ipaddress.IPv4Address(req.to_ip))
        dst = q.endpoints.by_ip(dst_ip)
    else:
        ns, name = req.to.namespace or "default", req.to.name
        dst = q.endpoints.find(ns, name)
        dst_ip = dst.ip if dst else next(
            (ip for ip, who in q.policy.names.pods.items() if who == f"{ns}/{name}"), "")
        if not dst_ip:
            raise QueryError(f"pod {ns}/{name} is unknown (no address in the datastore)")

    if dst is not None and dst.key == src.key:
        # Traffic to the pod's own address never leaves its netns: no policy sees it.
        step = cilia_pb2.TraceStep(direction=INGRESS, endpoint=f"{src.pod_namespace}/"
                                   f"{src.pod_name}", enforced=False, allowed=True,
                                   reason="a pod reaches itself without leaving its netns")
        return cilia_pb2.TraceResult(allowed=True, steps=[step], src_identity=src.identity,
                                     dst_identity=src.identity)
    dst_identity, dst_cidr = _ipcache(q, dst_ip)
    _, src_cidr = _ipcache(q, src.ip)
    steps = [_step(q, src, EGRESS, dst_identity, dst_cidr, proto, req.port)]
    if dst is not None:
        steps.append(_step(q, dst, INGRESS, src.identity, src_cidr, proto, req.port))
    allowed = all(s.allowed for s in steps)
    return cilia_pb2.TraceResult(
        allowed=allowed, steps=steps, src_identity=src.identity, dst_identity=dst_identity,
        audit=not allowed and all(s.allowed or s.audit for s in steps),
    )


def _step(q: Sources, ep: Endpoint, direction: str, peer: int, peer_cidr: int, proto: int,
          port: int) -> cilia_pb2.TraceStep:
    ingress = direction == INGRESS
    flag = (layouts.ENDPOINT_F_INGRESS_ENFORCED if ingress
            else layouts.ENDPOINT_F_EGRESS_ENFORCED)
    flag |= layouts.ENDPOINT_F_TIERED_INGRESS if ingress else layouts.ENDPOINT_F_TIERED_EGRESS
    who = f"{ep.pod_namespace}/{ep.pod_name}"
    step = cilia_pb2.TraceStep(direction=direction, endpoint=who)
    if not ep.flags & flag:
        step.enforced, step.allowed = False, True
        step.reason = f"no policy selects {who} for {direction}: open"
        return step
    step.enforced = True
    d = layouts.POLICY_INGRESS if ingress else layouts.POLICY_EGRESS
    action, cookie, tiers = kernel_verdict(q, ep.id, ep.flags, d, peer, peer_cidr, proto,
                                           port)
    rule = str(q.policy.rules.get(cookie, f"cookie {cookie}"))
    passed = ""
    if layouts.POLICY_TIER_ADMIN in tiers and len(tiers) > 1:
        passed = "the Admin tier passed it on (a Pass rule, or none matched); "
    if action == layouts.POLICY_ALLOW and not cookie:
        step.allowed = True
        step.reason = (f"{passed}no NetworkPolicy selects {who} for {direction} and no "
                       "Baseline tier rule decides: allowed (the Kubernetes default)")
    elif action == layouts.POLICY_ALLOW:
        step.allowed, step.reason = True, f"{passed}allowed by {rule}"
    elif action == layouts.POLICY_DENY:
        step.allowed, step.reason = False, f"{passed}denied by {rule}"
    else:
        selecting = ", ".join(selecting_policies(q, ep, direction)) or "a policy"
        step.allowed = False
        step.reason = (f"{passed}no rule allows it; {who} is isolated for {direction} by "
                       f"{selecting}")
    if not step.allowed and ep.flags & layouts.ENDPOINT_F_AUDIT:
        # As the datapath does (lib/enforce.h audit()): passed, reported as AUDIT.
        step.audit = True
        step.reason += f"; {who} is in policy audit mode: passes, reported as AUDIT"
    return step
