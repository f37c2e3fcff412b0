"""cilia: the command line (status, endpoints, metrics, apply/delete, the local lab)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

DEFAULT_SOCKET = "/run/cilia/cilia.sock"


def _fail(msg: str) -> None:
    print(f"cilia: {msg}", file=sys.stderr)
    sys.exit(1)


def _lab(args):
    from cilia.lab.lab import Lab

    return Lab(args.lab)


def _cluster_nodes(args) -> list:
    """The nodes of the `cilia cluster` --cluster names (all, or --node's), as the agent
    sees its own paths from inside each node's mount namespace: `socket`, `bpffs_root`."""
    from cilia.cluster.cluster import Cluster, ClusterError

    cluster = Cluster(args.cluster)
    if not cluster.exists():
        raise ClusterError(f"cluster {args.cluster!r} does not exist (cilia cluster up)")
    nodes = cluster.load().nodes
    if args.node is not None:
        nodes = [n for n in nodes if n.name == args.node]
        if not nodes:
            raise ClusterError(f"cluster {args.cluster!r} has no node {args.node!r}")
    logs = {p.name: p.log for p in cluster.load().procs}  # process mode: the agents'
    return [_ClusterNodeView(n.name, f"{n.run_dir}/run-cilia/cilia.sock",
                             f"{n.bpffs_root}/cilia", n.netns,
                             logs.get(f"cilia-agent-{n.name}", "")) for n in nodes]


class _ClusterNodeView:
    def __init__(self, name: str, socket: str, bpffs_root: str, netns: str, log: str = ""):
        self.name, self.socket, self.bpffs_root, self.netns = name, socket, bpffs_root, netns
        self.log = log


def resolve_socket(args) -> str:
    """--socket, $CILIA_SOCKET, a --cluster's node, an explicitly named lab, the node's
    default socket, or the default lab if it is up: the first that applies."""
    if args.socket:
        return args.socket
    if env := os.environ.get("CILIA_SOCKET"):
        return env
    if getattr(args, "cluster", None):
        return _cluster_nodes(args)[0].socket
    lab = _lab(args)
    if args.lab_given or not os.path.exists(DEFAULT_SOCKET):
        if lab.exists():
            state = lab.load()
            return lab.node(state, args.node).socket
    return DEFAULT_SOCKET


def _client(args):
    from cilia.client import AgentClient

    return AgentClient(resolve_socket(args))


def _print(obj, output: str, table) -> None:
    if output == "json":
        print(json.dumps(obj, indent=2))
    elif output == "yaml":
        print(yaml.safe_dump(obj, sort_keys=False), end="")
    else:
        table(obj)


def _columns(rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


# ---- agent queries ---------------------------------------------------------------


def cmd_status(args) -> None:
    from google.protobuf.json_format import MessageToDict

    st = _client(args).status()
    obj = MessageToDict(
        st, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )

    def table(o):
        for k in ("node", "ready", "message", "version", "pod_cidr", "endpoints",
                  "bpffs_root", "datastore", "socket"):
            print(f"{k.replace('_', ' ').capitalize() + ':':14} {o.get(k)}")
        print(f"{'Uptime:':14} {o.get('uptime_seconds', 0):.0f}s")
        print(f"{'Routing:':14} {o.get('routing')} (node IP {o.get('node_ip')}), "
              f"masquerade {'on' if o.get('masquerade') else 'off'}")
        for d in o.get("devices", []):
            xdp = (f"XDP prefilter {d['xdp_mode']}" if d.get("xdp_mode")
                   else "no XDP (the prefilter attaches once a CIDR is denied)")
            tc = "from-netdev" if d.get("from_netdev") else "no tc program"
            print(f"{'Device:':14} {d['name']}: {xdp}, {tc}")
        if o.get("kube_proxy_replacement"):
            print(f"{'KubeProxyReplacement:':14} True (every Service is cilia's: ClusterIP, "
                  "ExternalIPs and NodePorts for pods, socket LB for the node; from "
                  "outside, NodePorts of externalTrafficPolicy: Local)")
        else:
            print(f"{'KubeProxyReplacement:':14} False (pods' Services translated in BPF "
                  "before policy; the rest is kube-proxy's)")
        lb = o.get("socket_lb") or {}
        if lb.get("enabled"):
            hooks = ", ".join(f"{h['hook']} (prog {h['prog_id']})" for h in lb.get("hooks", []))
            print(f"{'Socket LB:':14} on, cgroup {lb.get('cgroup')}: {hooks or 'NOT ATTACHED'}")
        else:
            print(f"{'Socket LB:':14} off")
        rejected = o.get("policies_rejected", 0)
        print(f"{'Policy:':14} {'synced' if o.get('policy_synced') else 'syncing'}, "
              f"{o.get('policies', 0)} policies"
              + (f", {rejected} REJECTED (cilia policy list)" if rejected else ""))
        if o.get("policy_audit_mode"):
            print(f"{'Policy audit:':14} AUDIT MODE for every pod (--policy-audit-mode): "
                  "what policy would drop passes, reported as audit")
        elif o.get("audit_endpoints"):
            print(f"{'Policy audit:':14} {o['audit_endpoints']} endpoint(s) in audit mode "
                  "(cilia endpoint list)")
        for u in o.get("unidentified_pods", []):
            print(f"{'Identity:':14} pod {u['namespace']}/{u['name']} has NO security "
                  f"identity: {u['reason']}; {u['effect']}")

    _print(obj, args.output, table)


def endpoint_dict(ep) -> dict:
    return {
        "id": ep.id,
        "namespace": ep.pod_namespace,
        "pod": ep.pod_name,
        "containerID": ep.container_id,
        "netns": ep.netns,
        "ip": ep.ip,
        "interface": ep.ifname,
        "hostInterface": ep.host_ifname,
        "hostIfindex": ep.host_ifindex,
        "mac": ep.mac,
        "node": ep.node,
        "identity": ep.identity,
        "labels": dict(ep.labels),
        "policyAudit": ep.policy_audit,
    }


def cmd_endpoint_list(args) -> None:
    eps = [endpoint_dict(e) for e in _client(args).endpoints()]

    def table(rows):
        _columns(
            [["ID", "POD", "IP", "INTERFACE", "HOST-IF", "NODE", "CONTAINER", "NETNS",
              "POLICY"]]
            + [[r["id"], f"{r['namespace']}/{r['pod']}", r["ip"], r["interface"],
                r["hostInterface"], r["node"], r["containerID"][:12], r["netns"],
                "audit" if r["policyAudit"] else "enforce"] for r in rows]
        )

    _print(eps, args.output, table)


def cmd_metrics(args) -> None:
    ms = [
        {"reason": m.reason, "direction": m.direction, "packets": m.packets,
         "bytes": m.bytes, "drop": m.drop}
        for m in _client(args).metrics()
    ]

    def table(rows):
        if not rows:
            print("no packets seen yet")
            return
        _columns([["REASON", "DIRECTION", "PACKETS", "BYTES"]]
                 + [[r["reason"], r["direction"], r["packets"], r["bytes"]] for r in rows])

    _print(ms, args.output, table)


def _pod_ref(text: str) -> tuple[str, str]:
    ns, sep, name = text.partition("/")
    if not sep:
        ns, name = "default", text
    if not name:
        _fail(f"{text!r}: give a pod as NAMESPACE/POD")
    return ns, name


def cmd_policy_list(args) -> None:
    rows = [{"kind": p.kind, "namespace": p.namespace, "name": p.name, "valid": p.valid,
             "error": p.error, "warnings": list(p.warnings), "selected": list(p.selected)}
            for p in _client(args).policies()]

    def table(rs):
        if not rs:
            print("no policies")
            return
        _columns([["KIND", "POLICY", "STATUS", "SELECTS (this node)"]]
                 + [[r["kind"], f"{r['namespace']}/{r['name']}",
                     "enforced" if r["valid"] else f"REJECTED: {r['error']}",
                     ",".join(r["selected"]) or "-"] for r in rs])

    _print(rows, args.output, table)


def cmd_policy_get(args) -> None:
    from google.protobuf.json_format import MessageToDict

    pol = _client(args).endpoint_policy(*_pod_ref(args.pod))
    obj = MessageToDict(pol, preserving_proto_field_name=True,
                        always_print_fields_with_no_presence=True)

    def table(o):
        print(f"endpoint {o['endpoint_id']} {args.pod}, identity {o['identity']}")
        for d in ("ingress", "egress"):
            by = ", ".join(o[f"{d}_policies"]) or "no policy"
            state = ("open" if not o[f"{d}_enforced"] else
                     "AUDIT MODE (refusals pass, reported)" if o["audit"] else "enforced")
            print(f"  {d}: {state} ({by})")
        if o["rules"]:
            _columns([["  DIRECTION", "PEER", "PORT", "ACTION", "RULE"]]
                     + [[f"  {r['direction']}", r["peer"], r["port"], r["action"], r["rule"]]
                        for r in o["rules"]])

    _print(obj, args.output, table)


def cmd_policy_trace(args) -> None:
    from google.protobuf.json_format import MessageToDict

    from cilia.api.v1 import cilia_pb2

    port, _, proto = args.port.partition("/")
    if not port.isdigit():
        _fail(f"--port {args.port!r}: give PORT/PROTOCOL, e.g. 80/TCP")
    if bool(args.to) == bool(args.to_ip):
        _fail("give one of --to NAMESPACE/POD and --to-ip ADDRESS")
    req = cilia_pb2.TraceRequest(port=int(port), protocol=(proto or "TCP").upper(),
                                 to_ip=args.to_ip or "")
    ns, name = _pod_ref(args.from_pod)
    getattr(req, "from").CopyFrom(cilia_pb2.PodRef(namespace=ns, name=name))
    if args.to:
        ns, name = _pod_ref(args.to)
        req.to.CopyFrom(cilia_pb2.PodRef(namespace=ns, name=name))
    res = _client(args).trace(req)
    obj = MessageToDict(res, preserving_proto_field_name=True,
                        always_print_fields_with_no_presence=True)

    def steps(o, indent: str) -> None:
        for st in o["steps"]:
            mark = "allow" if st["allowed"] else "AUDIT" if st["audit"] else "DENY "
            print(f"{indent}{mark} {st['direction']:7} of {st['endpoint']}: {st['reason']}")

    def verdict(o) -> str:
        return ("ALLOWED" if o["allowed"] else
                "AUDIT (would be DENIED; passes in policy audit mode)" if o["audit"] else
                "DENIED")

    def table(o):
        dest = args.to or args.to_ip
        print(f"{args.from_pod} -> {dest} {port}/{(proto or 'TCP').upper()}: " + verdict(o))
        if o["service"]:
            print(f"  Service {o['service']}: judged at each backend, as the datapath does")
        for b in o["backends"]:
            print(f"  -> backend {b['backend']}: {verdict(b['result'])}")
            steps(b["result"], "    ")
        steps(o, "  ")

    _print(obj, args.output, table)


def cmd_monitor(args) -> None:
    import datetime

    from google.protobuf.json_format import MessageToDict

    try:
        for e in _client(args).monitor(pod=args.pod or "", verdict=args.verdict or ""):
            if args.output == "json":
                print(json.dumps(MessageToDict(e, preserving_proto_field_name=True)),
                      flush=True)
                continue
            t = datetime.datetime.fromtimestamp(e.time).strftime("%H:%M:%S.%f")[:-3]
            why = f" ({e.reason}, {e.direction})" if e.verdict in ("dropped", "audit") else ""
            rule = f"  [{e.rule}]" if e.rule else ""
            via = f" (service {e.service})" if e.service else ""
            print(f"{t} {e.src} {e.src_ip}:{e.src_port} -> {e.dst} {e.dst_ip}:{e.dst_port}{via} "
                  f"{e.protocol} {e.verdict}{why}{rule}", flush=True)
    except KeyboardInterrupt:
        pass


def _observed_clients(args) -> list:
    """Every lab node's agent (unless --node, --socket or $CILIA_SOCKET names one),
    else the node's own."""
    from cilia.client import AgentClient

    if args.cluster and not args.socket:
        return [AgentClient(n.socket) for n in _cluster_nodes(args)]
    lab = _lab(args)
    if (not args.socket and not os.environ.get("CILIA_SOCKET") and args.node is None
            and (args.lab_given or not os.path.exists(DEFAULT_SOCKET)) and lab.exists()):
        return [AgentClient(n.socket) for n in lab.load().nodes]
    return [AgentClient(resolve_socket(args))]


def cmd_observe(args) -> None:
    from cilia import observe
    from cilia.api.v1 import cilia_pb2

    try:
        since = observe.parse_since(args.since) if args.since else 0.0
    except ValueError as err:
        _fail(str(err))
    last = args.last if args.last is not None else (0 if since or args.follow else 20)
    request = cilia_pb2.ObserveRequest(last=last, since=since,
                                       filter=observe.build_filter(args))
    clients = _observed_clients(args)
    past = observe.history(clients, request) if last or since else []
    try:
        for line in observe.render(past, args.output):
            print(line, flush=True)
        if args.follow:
            after = past[-1].time if past else time.time() - observe.REORDER_SECONDS
            for line in observe.render(observe.follow(clients, request, after),
                                       args.output, header=not past):
                print(line, flush=True)
    except KeyboardInterrupt:
        pass


def cmd_bpf_ipcache_list(args) -> None:
    rows = [{"prefix": e.prefix, "identity": e.identity, "name": e.name,
             "labels": list(e.labels), "cidrIdentity": e.cidr_identity,
             "cidrName": e.cidr_name}
            for e in _client(args).ipcache()]

    def table(rs):
        if not rs:
            print("the ipcache is empty")
            return
        _columns([["PREFIX", "IDENTITY", "WHO", "CIDR IDENTITY"]]
                 + [[r["prefix"], r["identity"], r["name"],
                     f"{r['cidrIdentity']} ({r['cidrName']})"] for r in rs])

    _print(rows, args.output, table)


def resolve_bpffs_root(args) -> str:
    """--bpffs-root, else the lab node's (as resolve_socket picks it), else the agent's
    default."""
    from cilia.agent.config import DEFAULT_BPFFS_ROOT

    if getattr(args, "bpffs_root", None):
        return args.bpffs_root
    if getattr(args, "cluster", None):
        return _cluster_nodes(args)[0].bpffs_root
    lab = _lab(args)
    if (args.lab_given or not os.path.exists(DEFAULT_BPFFS_ROOT)) and lab.exists():
        state = lab.load()
        return lab.node(state, args.node).bpffs_root
    return DEFAULT_BPFFS_ROOT


def _address_names(args, ipcache: list | None = None) -> dict[str, str]:
    """Address -> who, from the agent when it answers: NAMESPACE/POD for this node's
    pods, else the identity the ipcache gives (NAMESPACE/{labels}, reserved:host, ...).
    The dumps name what they can and stay complete without it. `ipcache`: the agent's
    entries when the caller has them already."""
    if ipcache is None and (ipcache := _client_or_none(args, "ipcache")) is None:
        return {}
    names = {e.prefix.removesuffix("/32"): e.name for e in ipcache
             if e.prefix.endswith("/32")}
    names.update({e.ip: f"{e.pod_namespace or 'default'}/{e.pod_name}"
                  for e in _client_or_none(args, "endpoints") or [] if e.pod_name})
    return names


def cmd_bpf_ct_list(args) -> None:
    from cilia import dumps

    names = _address_names(args)
    rows = dumps.conntrack(resolve_bpffs_root(args), lambda ip: names.get(ip, ""))

    def table(rs):
        if not rs:
            print("the conntrack table is empty")
            return
        _columns([["PROTO", "SOURCE", "DESTINATION", "SCOPE", "FLAGS", "EXPIRES", "RULE"]]
                 + [[r["protocol"],
                     r["source"] + (f" ({r['sourceName']})" if r["sourceName"] else ""),
                     r["destination"] + (f" ({r['destinationName']})"
                                         if r["destinationName"] else ""),
                     r["scope"] + (f" svc {r['serviceId']}" if r["serviceId"] else ""),
                     ",".join(r["flags"]) or "-", f"{r['expiresInSeconds']}s",
                     r["ruleCookie"] or "-"] for r in rs])

    _print(rows, args.output, table)


def cmd_bpf_ct_flush(args) -> None:
    from cilia import dumps

    removed = dumps.flush_conntrack(resolve_bpffs_root(args), args.address)
    what = f" with {args.address}" if args.address else ""
    print(f"removed {removed} conntrack entries{what}: their next packets are judged as "
          "new flows")


def cmd_bpf_endpoint_list(args) -> None:
    from cilia import dumps

    names = _address_names(args)
    rows = dumps.endpoints(resolve_bpffs_root(args), lambda ip: names.get(ip, ""))

    def table(rs):
        if not rs:
            print("no endpoints in the map")
            return
        _columns([["ENDPOINT", "IP", "POD", "IDENTITY", "IFINDEX", "FLAGS"]]
                 + [[r["endpointId"], r["ip"], r["pod"] or "-", r["identity"], r["ifindex"],
                     ",".join(r["flags"]) or "-"] for r in rs])

    _print(rows, args.output, table)


def cmd_bpf_policy_get(args) -> None:
    from cilia import dumps
    from cilia.identity import describe

    root = resolve_bpffs_root(args)
    ipcache = _client_or_none(args, "ipcache") or []  # names pods and identities both
    target = args.endpoint
    if target.isdigit():
        ep_id = int(target)
    else:
        names = _address_names(args, ipcache)
        ns, _, pod = target.rpartition("/")
        wanted = f"{ns or 'default'}/{pod}"
        ips = {ip for ip, who in names.items() if who == wanted}
        found = [e for e in dumps.endpoints(root) if e["ip"] in ips]
        if not found:
            _fail(f"no endpoint of {wanted} on this node (the agent names pods: is it "
                  "running? else pass the endpoint id from `cilia bpf endpoint list`)")
        ep_id = found[0]["endpointId"]
    labels = {e.identity: list(e.labels) for e in ipcache}
    rows = dumps.policy(root, ep_id, lambda n: describe(n, labels.get(n)))

    def table(rs):
        if not rs:
            print(f"endpoint {ep_id} has no policy entries (not enforced in either "
                  "direction, or not on this node)")
            return
        _columns([["DIRECTION", "PEER", "IDENTITY", "PORT", "ACTION", "RULE"]]
                 + [[r["direction"], ("cidr " if r["cidrView"] else "") + r["peer"],
                     r["identity"], r["port"], r["action"], r["ruleCookie"]] for r in rs])

    _print(rows, args.output, table)


def _client_or_none(args, method: str):
    """The agent's answer to `method`, or None when no agent answers (3 s at most)."""
    from cilia.client import AgentClient, AgentUnreachable

    try:
        return getattr(AgentClient(resolve_socket(args), timeout=3.0), method)()
    except AgentUnreachable:
        return None


def _stored_identities(args) -> dict[int, frozenset]:
    if args.kubeconfig:
        from cilia.datastore.k8s_identities import KubernetesIdentityStore
        from cilia.datastore.kubernetes import KubeClient

        return KubernetesIdentityStore(KubeClient(args.kubeconfig)).identities()
    from cilia.datastore.identities import LocalIdentityStore

    return LocalIdentityStore(_datastore(args)).identities()


def cmd_identity_list(args) -> None:
    from cilia import dumps

    rows = dumps.identities(_stored_identities(args))
    _print(rows, args.output, lambda rs: _columns(
        [["IDENTITY", "LABELS"]] + [[r["identity"], r["name"]] for r in rs]))


def cmd_identity_get(args) -> None:
    from cilia import dumps

    rows = [r for r in dumps.identities(_stored_identities(args))
            if r["identity"] == args.identity]
    if not rows:
        _fail(f"identity {args.identity} is not allocated (`cilia identity list`)")
    _print(rows[0], args.output, lambda r: _columns(
        [["IDENTITY", "LABELS"], [r["identity"], r["name"]]]))


def cmd_sysdump(args) -> None:
    from cilia.sysdump import NodeSource, collect

    out = Path(args.output or time.strftime("cilia-sysdump-%Y%m%d-%H%M%S.tar.gz"))
    lab = _lab(args)
    if args.cluster and not args.local:
        from cilia.nsutil import in_netns

        nodes = [NodeSource(n.name, n.socket, n.bpffs_root, n.log,
                            lambda argv, ns=n.netns: in_netns(ns, argv))
                 for n in _cluster_nodes(args)]
        context = {"source": f"cluster {args.cluster}"}
    elif args.local or not lab.exists():
        nodes = [NodeSource(os.uname().nodename, resolve_socket(args),
                            resolve_bpffs_root(args))]
        context = {"source": "this node"}
    else:
        from cilia.lab.lab import in_netns

        state = lab.load()
        nodes = [NodeSource(n.name, n.socket, n.bpffs_root, n.log,
                            lambda argv, ns=n.netns: in_netns(ns, argv))
                 for n in state.nodes]
        context = {"source": f"lab {lab.name}"}
    archive = collect(out, nodes, context)
    print(f"{out}: {len(nodes)} node(s)"
          + (f", {len(archive.errors)} item(s) could not be collected (errors.txt)"
             if archive.errors else ""))


PREFILTER_KIND = "CiliaPrefilter"


def service_dict(s) -> dict:
    return {
        "frontend": f"{s.ip}:{s.port}/{s.protocol}" + ("/external" if s.external else ""),
        "service": s.service,
        "portName": s.port_name,
        "id": s.id,
        "type": s.type,
        "sessionAffinityTimeout": s.affinity_timeout,
        "backends": [{"ip": b.ip, "port": b.port, "terminating": b.terminating}
                     for b in s.backends],
    }


def cmd_service_list(args) -> None:
    rows = [service_dict(s) for s in _client(args).services()]

    def table(o):
        if not o:
            print("no Service frontend is translated")
            return
        lines = [["ID", "FRONTEND", "SERVICE", "BACKENDS"]]
        for r in o:
            backends = ", ".join(f"{b['ip']}:{b['port']}" + (" (terminating)"
                                                             if b["terminating"] else "")
                                 for b in r["backends"]) or "(none: rejected)"
            name = r["service"] + (f" ({r['portName']})" if r["portName"] else "")
            if r["sessionAffinityTimeout"]:
                name += f" [ClientIP affinity {r['sessionAffinityTimeout']}s]"
            lines.append([r["id"], r["frontend"], name, backends])
        _columns(lines)

    _print(rows, args.output, table)


def _prefilter_name(cidr: str) -> str:
    return "cidr-" + cidr.replace(".", "-").replace(":", "-").replace("/", "-").strip("-")


def _check_cidr(cidr: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_network(cidr, strict=False))
    except ValueError as err:
        _fail(f"{cidr!r} is not a CIDR: {err}")


def cmd_prefilter_list(args) -> None:
    res = _client(args).prefilter()
    rows = [{"cidr": e.cidr, "sources": list(e.sources), "packets": e.packets,
             "bytes": e.bytes} for e in res.entries]
    devices = [{"name": d.name, "xdp_mode": d.xdp_mode} for d in res.devices]

    def table(o):
        for d in o["devices"]:
            print(f"device {d['name']}: XDP {d['xdp_mode'] or 'not attached'}")
        if not o["entries"]:
            print("no CIDR is denied")
            return
        _columns([["CIDR", "DROPPED PACKETS", "BYTES", "FROM"]]
                 + [[r["cidr"], r["packets"], r["bytes"], ",".join(r["sources"])]
                    for r in o["entries"]])

    _print({"entries": rows, "devices": devices}, args.output, table)


def cmd_prefilter_add(args) -> None:
    cidr = _check_cidr(args.cidr)
    store = _datastore(args)
    name = args.name or _prefilter_name(cidr)
    obj = store.get(PREFILTER_KIND, "", name) or {
        "apiVersion": "cilia.io/v1alpha1", "kind": PREFILTER_KIND,
        "metadata": {"name": name}, "spec": {"deny": []}}
    deny = obj.setdefault("spec", {}).setdefault("deny", [])
    if cidr not in deny:
        deny.append(cidr)
    store.put(obj)
    print(f"{cidr} denied at XDP ({PREFILTER_KIND.lower()}/{name})")


def cmd_prefilter_delete(args) -> None:
    cidr = _check_cidr(args.cidr)
    store = _datastore(args)
    found = False
    for obj in store.list(PREFILTER_KIND):
        deny = (obj.get("spec") or {}).get("deny") or []
        if cidr not in deny:
            continue
        found = True
        name = obj["metadata"]["name"]
        rest = [c for c in deny if c != cidr]
        if rest:
            obj["spec"]["deny"] = rest
            store.put(obj)
        else:
            store.delete(PREFILTER_KIND, "", name)
    if not found:
        _fail(f"{cidr} is not in the prefilter's deny list (cilia prefilter list)")
    print(f"{cidr} no longer denied")


# ---- datastore -------------------------------------------------------------------


def _manifests(path: str) -> list[dict]:
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        _fail(f"{path}: not valid YAML: {err}")
    out = []
    for d in docs:
        if isinstance(d, dict) and d.get("kind") == "List":
            out.extend(d.get("items", []))
        else:
            out.append(d)
    return out


def _datastore(args):
    from cilia.datastore.local import LocalDatastore

    if args.datastore_dir:
        return LocalDatastore(Path(args.datastore_dir))
    lab = _lab(args)
    if not lab.exists():
        _fail(f"lab {args.lab!r} is not up and no --datastore-dir given: `cilia lab up` first")
    return lab.datastore


def cmd_apply(args) -> None:
    from cilia.datastore import ObjectError, check_object

    store = _datastore(args)
    docs = _manifests(args.filename)
    try:
        checked = [check_object(d) for d in docs]  # validate all before storing any
    except ObjectError as err:
        _fail(f"{args.filename}: {err}")
    for doc, ((kind, _, name), warnings) in zip(docs, checked, strict=True):
        for warning in warnings:
            print(f"Warning: {warning}", file=sys.stderr)
        print(f"{kind.lower()}/{name} {store.put(doc)}")


def cmd_delete(args) -> None:
    from cilia.datastore import ObjectError, object_ref

    store = _datastore(args)
    for doc in _manifests(args.filename):
        try:
            kind, ns, name = object_ref(doc)
        except ObjectError as err:
            _fail(f"{args.filename}: {err}")
        found = store.delete(kind, ns, name)
        print(f"{kind.lower()}/{name} {'deleted' if found else 'not found'}")


# ---- lab -------------------------------------------------------------------------


def cmd_lab_up(args) -> None:
    state = _lab(args).up(nodes=args.nodes, routing=args.routing)
    for n in state.nodes:
        print(f"node {n.name}: netns {n.netns}, pod CIDR {n.pod_cidr}, agent pid {n.pid}, "
              f"socket {n.socket}")
    print(f"outside: netns {state.outside_netns}")


def cmd_lab_down(args) -> None:
    _lab(args).down()
    print(f"lab {args.lab} is down")


def cmd_lab_run(args) -> None:
    from cilia.datastore import ObjectError, check_object

    lab = _lab(args)
    for doc in _manifests(args.filename):
        try:
            (kind, _, name), warnings = check_object(doc)
        except ObjectError as err:
            _fail(f"{args.filename}: {err}")
        for warning in warnings:
            print(f"Warning: {warning}", file=sys.stderr)
        if kind != "Pod":  # e.g. the pods' Namespace in the same file
            print(f"{kind.lower()}/{name} {lab.datastore.put(doc)}")
            continue
        pod = lab.run_pod(doc, args.node_name)
        print(f"pod {pod.namespace}/{pod.name} running on {pod.node}: ip {pod.ip}, "
              f"netns {pod.netns}")


def cmd_lab_rm(args) -> None:
    ns, _, name = args.pod.rpartition("/")
    _lab(args).remove_pod(ns or "default", name)
    print(f"pod {args.pod} removed")


def cmd_lab_exec(args) -> None:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        _fail("lab exec: give a command after --")
    full = _lab(args).exec_argv(args.target, argv)
    os.execvp(full[0], full)


def cmd_lab_restart_agent(args) -> None:
    node = _lab(args).restart_agent(args.node_name)
    print(f"agent of {node.name} restarted: pid {node.pid}")


def cmd_connectivity_test(args) -> None:
    from dataclasses import asdict

    from cilia import connectivity

    if args.cluster:
        from cilia.cluster.cluster import Cluster, ClusterError

        cluster = Cluster(args.cluster)
        if not cluster.exists():
            raise ClusterError(f"cluster {args.cluster!r} does not exist (cilia cluster up)")
        test = connectivity.ClusterConnectivity(cluster)
    else:
        lab = _lab(args)
        if not lab.exists():
            _fail(f"lab {args.lab!r} is not up: `cilia lab up` first (--nodes 2 checks "
                  "traffic across nodes too), or give --cluster NAME")
        test = connectivity.LabConnectivity(lab)
    say = (lambda _m: None) if args.output == "json" else print
    checks = connectivity.run(test, keep=args.keep, say=say)
    if args.output == "json":
        print(json.dumps([{**asdict(c), "result": c.result} for c in checks], indent=2))
    else:
        for line in connectivity.report(checks):
            print(line)
    if any(c.ok is False for c in checks):
        sys.exit(1)


def cmd_demo(args) -> None:
    from cilia.lab.demo import run_demo

    sys.exit(run_demo(args.lab, keep=args.keep))


# ---- parser ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cilia", description=__doc__)
    p.add_argument("--socket", help="agent socket (default: $CILIA_SOCKET, the lab's, or "
                   f"{DEFAULT_SOCKET})")
    p.add_argument("--lab", help="lab name (default: $CILIA_LAB or 'cilia')")
    p.add_argument("--node", help="lab node whose agent to ask (default: the first)")
    p.add_argument("--cluster", help="ask the agents of this `cilia cluster` (its nodes "
                   "are namespaces of this machine) instead of a lab's")
    sub = p.add_subparsers(dest="command", required=True)

    def out(sp):
        sp.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")

    s = sub.add_parser("status", help="the agent's status")
    out(s)
    s.set_defaults(fn=cmd_status)

    ep = sub.add_parser("endpoint", help="endpoints (pods) on a node").add_subparsers(
        dest="sub", required=True)
    s = ep.add_parser("list", help="list endpoints")
    out(s)
    s.set_defaults(fn=cmd_endpoint_list)

    s = sub.add_parser("metrics", help="datapath counters by reason and direction")
    out(s)
    s.set_defaults(fn=cmd_metrics)

    pol = sub.add_parser("policy", help="policies and their effect").add_subparsers(
        dest="sub", required=True)
    s = pol.add_parser("list", help="policies, whether they are enforced, what they select")
    out(s)
    s.set_defaults(fn=cmd_policy_list)
    s = pol.add_parser("get", help="an endpoint's effective rules")
    s.add_argument("pod", help="NAMESPACE/POD")
    out(s)
    s.set_defaults(fn=cmd_policy_get)
    s = pol.add_parser("trace", help="the verdict for a connection, and the rule deciding it")
    s.add_argument("--from", dest="from_pod", required=True, help="NAMESPACE/POD")
    s.add_argument("--to", help="NAMESPACE/POD")
    s.add_argument("--to-ip", help="any destination address instead of a pod")
    s.add_argument("--port", required=True, help="PORT/PROTOCOL, e.g. 80/TCP")
    out(s)
    s.set_defaults(fn=cmd_policy_trace)

    pf = sub.add_parser("prefilter", help="the XDP CIDR deny list on the node's uplinks")
    pfs = pf.add_subparsers(dest="sub", required=True)
    s = pfs.add_parser("list", help="denied CIDRs with their drop counters")
    out(s)
    s.set_defaults(fn=cmd_prefilter_list)
    s = pfs.add_parser("add", help="deny a CIDR (IPv4 or IPv6) at XDP on every node")
    s.add_argument("cidr")
    s.add_argument("--name", help="the CiliaPrefilter object to add it to")
    s.add_argument("--datastore-dir", help="local datastore directory (default: the lab's)")
    s.set_defaults(fn=cmd_prefilter_add)
    s = pfs.add_parser("delete", help="stop denying a CIDR")
    s.add_argument("cidr")
    s.add_argument("--datastore-dir", help="local datastore directory (default: the lab's)")
    s.set_defaults(fn=cmd_prefilter_delete)

    svc = sub.add_parser("service", help="Service frontends the datapath translates")
    s = svc.add_subparsers(dest="sub", required=True).add_parser(
        "list", help="frontends (ClusterIP:port/protocol) and their backends")
    out(s)
    s.set_defaults(fn=cmd_service_list)

    bpf = sub.add_parser("bpf", help="the datapath's maps, decoded").add_subparsers(
        dest="sub", required=True)
    ipc = bpf.add_parser("ipcache", help="addresses and prefixes to security identities")
    s = ipc.add_subparsers(dest="sub2", required=True).add_parser(
        "list", help="every ipcache entry: prefix, identity and who it is")
    out(s)
    s.set_defaults(fn=cmd_bpf_ipcache_list)

    def pinned(sp):
        out(sp)
        sp.add_argument("--bpffs-root", help="where the agent pins its maps (default: the "
                        "lab node's, else /sys/fs/bpf/cilia); read directly, so this "
                        "answers when the agent does not")

    ct = bpf.add_parser("ct", help="the conntrack table").add_subparsers(
        dest="sub2", required=True)
    s = ct.add_parser("list", help="every connection: tuple, state, expiry, deciding rule")
    pinned(s)
    s.set_defaults(fn=cmd_bpf_ct_list)
    s = ct.add_parser("flush", help="remove connections: their next packets are new flows")
    pinned(s)
    s.add_argument("--address", help="only connections with this IPv4 address at an end")
    s.set_defaults(fn=cmd_bpf_ct_flush)
    s = bpf.add_parser("endpoint", help="the endpoints map").add_subparsers(
        dest="sub2", required=True).add_parser(
        "list", help="every endpoint: address, id, identity, enforcement")
    pinned(s)
    s.set_defaults(fn=cmd_bpf_endpoint_list)
    s = bpf.add_parser("policy", help="the policy map").add_subparsers(
        dest="sub2", required=True).add_parser(
        "get", help="an endpoint's policy entries, decoded")
    s.add_argument("endpoint", help="NAMESPACE/POD, or an endpoint id")
    pinned(s)
    s.set_defaults(fn=cmd_bpf_policy_get)

    ident = sub.add_parser("identity", help="security identities and their labels"
                           ).add_subparsers(dest="sub", required=True)
    for name, fn, helptext in (("list", cmd_identity_list, "every identity"),
                               ("get", cmd_identity_get, "one identity's labels")):
        s = ident.add_parser(name, help=helptext)
        if name == "get":
            s.add_argument("identity", type=int)
        out(s)
        s.add_argument("--datastore-dir", help="local datastore directory (default: the lab's)")
        s.add_argument("--kubeconfig", help="read CiliaIdentity objects from this cluster")
        s.set_defaults(fn=fn)

    s = sub.add_parser("sysdump", help="one archive of everything a bug report needs, "
                       "from every node")
    s.add_argument("--output", help="the .tar.gz to write (default: cilia-sysdump-TIME.tar.gz)")
    s.add_argument("--local", action="store_true",
                   help="this node only (in an agent's pod or on a node), not the lab's")
    s.add_argument("--bpffs-root", help="with --local: where the agent pins its maps")
    s.set_defaults(fn=cmd_sysdump)

    s = sub.add_parser("monitor", help="stream flow events: verdicts of new flows, drops")
    s.add_argument("--pod", help="only flows from or to NAMESPACE/POD")
    s.add_argument("--verdict", choices=["forwarded", "dropped", "audit"])
    s.add_argument("-o", "--output", choices=["text", "json"], default="text")
    s.set_defaults(fn=cmd_monitor)

    s = sub.add_parser("observe", help="flows of every node: history (--last, --since) "
                       "and live (--follow), filtered, merged in time order")
    s.add_argument("--last", type=int, metavar="N",
                   help="the last N matching flows (default 20 without --since/--follow)")
    s.add_argument("--since", metavar="WHEN", help="from then on: 30s, 5m, 2h, an ISO time")
    s.add_argument("-f", "--follow", action="store_true", help="then keep streaming")
    s.add_argument("-o", "--output", choices=["table", "jsonl", "compact"], default="table")
    for flag, kind, helptext in (
            ("namespace", str, "either end in NAMESPACE"),
            ("pod", str, "either end is NAMESPACE/POD"),
            ("identity", int, "either end has this security identity"),
            ("port", int, "either end's port"),
            ("protocol", str, "TCP, UDP, ICMP, SCTP"),
            ("reason", str, "a drop reason as `cilia metrics` names it"),
            ("from-namespace", str, ""), ("from-pod", str, ""), ("from-identity", int, ""),
            ("to-namespace", str, ""), ("to-pod", str, ""), ("to-identity", int, ""),
            ("to-port", int, "")):
        s.add_argument(f"--{flag}", type=kind, action="append", help=helptext or None)
    s.add_argument("-l", "--label", metavar="SELECTOR",
                   help="either end's pod labels match (app=web,tier!=db,env in (a,b))")
    s.add_argument("--from-label", metavar="SELECTOR")
    s.add_argument("--to-label", metavar="SELECTOR")
    s.add_argument("--verdict", choices=["forwarded", "dropped", "audit"])
    s.set_defaults(fn=cmd_observe)

    for name, fn, verb in (("apply", cmd_apply, "store"), ("delete", cmd_delete, "remove")):
        s = sub.add_parser(name, help=f"{verb} manifests in the local datastore")
        s.add_argument("-f", "--filename", required=True, help="YAML file, or - for stdin")
        s.add_argument("--datastore-dir", help="local datastore directory (default: the lab's)")
        s.set_defaults(fn=fn)

    lab = sub.add_parser("lab", help="the local lab: nodes and pods in network namespaces")
    ls = lab.add_subparsers(dest="sub", required=True)
    s = ls.add_parser("up", help="start the lab")
    s.add_argument("--nodes", type=int, default=1, choices=range(1, 9), metavar="N",
                   help="number of nodes, 1-8")
    s.add_argument("--routing", choices=["native", "vxlan"], default="native",
                   help="cross-node pod traffic: native routing or a VXLAN overlay")
    s.set_defaults(fn=cmd_lab_up)
    s = ls.add_parser("down", help="remove everything the lab made")
    s.set_defaults(fn=cmd_lab_down)
    s = ls.add_parser("run", help="run pods from a manifest through the CNI plugin")
    s.add_argument("-f", "--filename", required=True)
    s.add_argument("--node", dest="node_name", help="node to place the pod on")
    s.set_defaults(fn=cmd_lab_run)
    s = ls.add_parser("rm", help="remove a pod's sandbox (CNI DEL)")
    s.add_argument("pod", help="NAMESPACE/POD")
    s.set_defaults(fn=cmd_lab_rm)
    s = ls.add_parser("exec", help="run a command in a pod, node:NAME or outside")
    s.add_argument("target", help="NAMESPACE/POD, node:NAME or outside")
    s.add_argument("argv", nargs=argparse.REMAINDER)
    s.set_defaults(fn=cmd_lab_exec)
    s = ls.add_parser("restart-agent", help="restart a node's agent")
    s.add_argument("--node", dest="node_name")
    s.set_defaults(fn=cmd_lab_restart_agent)

    from cilia.cluster.cli import add_parser as add_cluster_parser

    add_cluster_parser(sub)

    conn = sub.add_parser("connectivity", help="check the network end to end"
                          ).add_subparsers(dest="sub", required=True)
    s = conn.add_parser("test", help="pod to pod, Service, host, world, DNS, policies, "
                        "and through agent restarts, on the lab or a cluster (--cluster); a "
                        "report, with the flows that explain each failure")
    s.add_argument("--keep", action="store_true",
                   help="leave the test namespace's pods and servers for a look")
    s.add_argument("-o", "--output", choices=["text", "json"], default="text")
    s.set_defaults(fn=cmd_connectivity_test)

    s = sub.add_parser("demo", help="bring up the lab, run example pods, show traffic")
    s.add_argument("--keep", action="store_true", help="keep the lab running afterwards")
    s.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.lab_given = args.lab is not None or "CILIA_LAB" in os.environ
    args.lab = args.lab or os.environ.get("CILIA_LAB", "cilia")
    from cilia.client import AgentQueryError, AgentUnreachable
    from cilia.cluster.cli import ERRORS as CLUSTER_ERRORS
    from cilia.lab.lab import LabError

    try:
        args.fn(args)
    except (LabError, AgentUnreachable, AgentQueryError, *CLUSTER_ERRORS) as err:
        _fail(str(err))
    except PermissionError as err:
        _fail(f"{err}: cilia needs root for this")


if __name__ == "__main__":
    main()
