"""What the pod programs do with what they cannot judge: they drop it (issue 13).

- A frame other than IPv4 (IPv6, ARP) to or from a pod: pods here never ARP and have no
  IPv6, so such a frame could only be a way past policy (a pod under default-deny egress
  reaching a node daemon over IPv6 link-local). Both veth ends have no IPv6 address.
- A packet into a pod's veth whose endpoint entry is missing (an ADD not finished, a DEL
  under way, a restore that lost its state): nobody can say which policy applies.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from labkit import OPEN_FLOWS, endpoint_list, leases, metric, pod_manifest, probe, servers

from cilia.datapath import layouts
from cilia.datapath.layouts import EndpointKey
from cilia.datapath.maps import BpfMap
from cilia.lab.lab import in_netns

LISTEN6 = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("{addr}", 9999, 0, socket.if_nametoindex("{dev}")))
s.settimeout({timeout})
print("ready", flush=True)
try:
    print(s.recvfrom(100)[0].decode())
except socket.timeout:
    print("nothing")
"""
SEND6 = """
import socket
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
for _ in range(5):
    s.sendto(b"hello", ("{addr}", 9999, 0, socket.if_nametoindex("{dev}")))
"""


@pytest.fixture(scope="module")
def pod(lab):
    return lab.run_pod(pod_manifest("fc", labels={"app": "fc"}))


def _host_ifname(lab, pod) -> str:
    (ep,) = [e for e in endpoint_list(lab.load().nodes[0]) if e["ip"] == pod.ip]
    return ep["hostInterface"]


def _sh(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def _mac(argv_prefix: list[str], dev: str) -> str:
    return json.loads(_sh([*argv_prefix, "ip", "-j", "link", "show", dev]))[0]["address"]


def _ipv6_addrs(argv_prefix: list[str], dev: str) -> list[dict]:
    out = json.loads(_sh([*argv_prefix, "ip", "-j", "-6", "addr", "show", "dev", dev]))
    return [a for link in out for a in link.get("addr_info", [])]


def _udp6(listen: list[str], send: list[str], addr: str, ldev: str, sdev: str) -> str:
    proc = subprocess.Popen(listen + [sys.executable, "-c", LISTEN6.format(
        addr=addr, dev=ldev, timeout=2)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        _sh(send + [sys.executable, "-c", SEND6.format(addr=addr, dev=sdev)])
        return proc.communicate(timeout=10)[0].strip()
    finally:
        proc.kill()


def test_no_ipv6_between_pod_and_node(lab, pod):
    """Even with link-local addresses and neighbours added by hand (what a pod with
    CAP_NET_ADMIN could do), no IPv6 datagram crosses the veth, either way."""
    node = lab.load().nodes[0]
    host_dev = _host_ifname(lab, pod)
    in_pod, in_node = in_netns(pod.netns, []), in_netns(node.netns, [])
    assert not _ipv6_addrs(in_pod, "eth0"), "the pod's eth0 has an IPv6 address"
    assert not _ipv6_addrs(in_node, host_dev), "the host side has an IPv6 address"
    _sh([*in_pod, "ip", "-6", "addr", "add", "fe80::a/64", "dev", "eth0", "nodad"])
    _sh([*in_node, "ip", "-6", "addr", "add", "fe80::1/64", "dev", host_dev, "nodad"])
    _sh([*in_pod, "ip", "-6", "neigh", "replace", "fe80::1", "lladdr",
         _mac(in_node, host_dev), "dev", "eth0", "nud", "permanent"])
    _sh([*in_node, "ip", "-6", "neigh", "replace", "fe80::a", "lladdr",
         _mac(in_pod, "eth0"), "dev", host_dev, "nud", "permanent"])
    out_before = metric(node, "drop_not_ipv4", "egress")
    in_before = metric(node, "drop_not_ipv4", "ingress")
    assert _udp6(in_node, in_pod, "fe80::1", host_dev, "eth0") == "nothing", (
        "a pod reached the node over IPv6")
    assert _udp6(in_pod, in_node, "fe80::a", "eth0", host_dev) == "nothing", (
        "the node reached a pod over IPv6")
    assert metric(node, "drop_not_ipv4", "egress") >= out_before + 5
    assert metric(node, "drop_not_ipv4", "ingress") >= in_before + 5


def test_arp_from_a_pod_is_dropped(lab, pod):
    node = lab.load().nodes[0]
    before = metric(node, "drop_not_ipv4", "egress")
    # arping is not everywhere: an ARP request by hand, through a packet socket.
    script = (
        "import socket\n"
        "s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n"
        "s.bind(('eth0', 0))\n"
        "mac = s.getsockname()[4]\n"
        "arp = bytes.fromhex('0001080006040001') + mac + socket.inet_aton('"
        f"{pod.ip}') + bytes(6) + socket.inet_aton('169.254.1.1')\n"
        "for _ in range(3): s.send(b'\\xff' * 6 + mac + b'\\x08\\x06' + arp)\n")
    _sh(in_netns(pod.netns, [sys.executable, "-c", script]))
    assert metric(node, "drop_not_ipv4", "egress") >= before + 3


def test_a_missing_endpoint_entry_closes_the_pod(lab, pod):
    """With its endpoints-map entry gone, the node's packets into the pod are dropped
    (they were delivered unjudged); back in place, they flow again."""
    node = lab.load().nodes[0]
    key = EndpointKey.for_ip(pod.ip)
    with servers(lab, "default/fc", [8080], "fc"):
        assert probe(lab, f"node:{node.name}", pod.ip, 8080, "udp") == "fc:hello"
        with BpfMap.open_pinned(node.bpffs_root, layouts.ENDPOINTS) as m:
            value = m.lookup(key)
            assert value is not None
            before = metric(node, "drop_unknown_endpoint", "ingress")
            # The pod's reply would be dropped anyway (its source has no endpoint): that
            # it never tried to reply shows the request never reached it.
            replies = metric(node, "drop_spoofed_source", "egress")
            m.delete(key)
            try:
                assert probe(lab, f"node:{node.name}", pod.ip, 8080, "udp",
                             timeout=1) is None
                assert metric(node, "drop_unknown_endpoint", "ingress") > before
                assert metric(node, "drop_spoofed_source", "egress") == replies, (
                    "delivered into a pod with no endpoint entry")
            finally:
                m.update(key, value)
        assert probe(lab, f"node:{node.name}", pod.ip, 8080, "udp") == "fc:hello"


def test_a_lost_state_file_neither_opens_nor_cuts_off_pods():
    """The agent restarts without its endpoints.json (lost, damaged): the pod's map entry
    stays as the kernel had it, so the pod is neither opened (its default deny holds for
    the outside) nor cut off (the node still reaches it). Before, restore deleted every
    entry the file did not name. The runtime's DEL still removes it all. (A lab of its
    own: every pod of the node loses its record.)"""
    from pathlib import Path

    from labkit import unique_lab_name

    from cilia.client import AgentClient
    from cilia.lab.lab import Lab

    lab = Lab(unique_lab_name())
    try:
        lab.up()
        lost = lab.run_pod(pod_manifest("lost", labels={"app": "lost"}))
        lab.datastore.put({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "deny-lost", "namespace": "default"},
            "spec": {"podSelector": {"matchLabels": {"app": "lost"}},
                     "policyTypes": ["Ingress"]}})
        node = lab.load().nodes[0]
        AgentClient(node.socket).wait_policy_synced()
        key = EndpointKey.for_ip(lost.ip)
        with BpfMap.open_pinned(node.bpffs_root, layouts.ENDPOINTS) as m:
            assert m.lookup(key).flags & layouts.ENDPOINT_F_INGRESS_ENFORCED
        with servers(lab, "default/lost", [8080], "lost"):
            assert probe(lab, f"node:{node.name}", lost.ip, 8080, "udp") == "lost:hello"
            assert probe(lab, "outside", lost.ip, 8080, "udp", timeout=1) is None
            lab.stop_agent()
            Path(node.state_dir, "endpoints.json").unlink()
            node = lab.start_agent()
            with BpfMap.open_pinned(node.bpffs_root, layouts.ENDPOINTS) as m:
                after = m.lookup(key)
            assert after is not None, "restore deleted the pod's entry"
            assert after.flags & layouts.ENDPOINT_F_INGRESS_ENFORCED
            assert probe(lab, f"node:{node.name}", lost.ip, 8080, "udp") == "lost:hello"
            assert probe(lab, "outside", lost.ip, 8080, "udp", timeout=1) is None
        lab.remove_pod("default", "lost")
        with BpfMap.open_pinned(node.bpffs_root, layouts.ENDPOINTS) as m:
            assert m.lookup(key) is None, "DEL left the entry the state file did not know"
    finally:
        lab.down()


# ---- conntrack never outlives its endpoint ----------------------------------------

UDP_FROM = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", {sport}))
s.settimeout(1)
s.sendto(b"hi", ("{host}", {port}))
try:
    print(s.recvfrom(100)[0].decode())
except socket.timeout:
    print("nothing")
"""


def _endpoints(lab) -> dict[str, dict]:
    return {e["ip"]: e for e in endpoint_list(lab.load().nodes[0])}


def _ct_entries_of(node, ip: str) -> list:
    packed = EndpointKey.for_ip(ip).ip4
    with BpfMap.open_pinned(node.bpffs_root, layouts.CONNTRACK) as ct:
        return [k for k in ct.keys() if packed in (k.saddr, k.daddr)]


def test_deleting_a_pod_removes_its_conntrack_entries(lab):
    """Before, they stayed for their lifetime (a minute for UDP, six hours for TCP): the
    next pod given the address could send "replies" on the old pod's flows."""
    node = lab.load().nodes[0]
    gone = lab.run_pod(pod_manifest("fc-gone"))
    with servers(lab, "default/fc", [8081], "fc"):
        assert probe(lab, "default/fc-gone", lab.pod(lab.load(), "default", "fc").ip, 8081,
                     "udp") == "fc:hello"
        assert _ct_entries_of(node, gone.ip), "the flow made no conntrack entry"
        lab.remove_pod("default", "fc-gone")
        assert not _ct_entries_of(node, gone.ip)


def test_a_flow_of_another_endpoint_is_judged_anew(lab, pod, apply):
    """An entry for this pod's address but made for another endpoint (a deleted pod's,
    whose address this pod got) does not let the pod past its own egress policy. With
    the pod's own endpoint id in the entry, the same packet passes: the entry is used."""
    from cilia.datapath.layouts import CtKey, CtValue

    sender = lab.run_pod(pod_manifest("fc-sender", labels={"app": "fc-sender"}))
    try:
        apply({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"name": "sender-no-egress", "namespace": "default"},
               "spec": {"podSelector": {"matchLabels": {"app": "fc-sender"}},
                        "policyTypes": ["Egress"]}})
        node = lab.load().nodes[0]
        eps = _endpoints(lab)
        own, server_ep = eps[sender.ip]["id"], eps[pod.ip]["id"]
        key = CtKey(EndpointKey.for_ip(sender.ip).ip4, EndpointKey.for_ip(pod.ip).ip4,
                    5555, 8082, 17, 0, b"\0\0")

        def send_with_entry_of(ep_id: int) -> str:
            import time

            with BpfMap.open_pinned(node.bpffs_root, layouts.POLICY_REV) as revs:
                rev = revs.lookup(layouts.U32(0)).value & 0xFF  # judged under today's policy
            with BpfMap.open_pinned(node.bpffs_root, layouts.CONNTRACK) as ct:
                ct.update(key, CtValue(time.monotonic_ns(), 60, ep_id, server_ep, 0, 0, rev, 0))
            script = UDP_FROM.format(sport=5555, host=pod.ip, port=8082)
            return _sh(lab.exec_argv("default/fc-sender", [sys.executable, "-c", script])
                       ).strip()

        with servers(lab, "default/fc", [8082], "fc"):
            assert send_with_entry_of(own) == "fc:hi", "the test's entry is not used"
            assert send_with_entry_of(own + 1000) == "nothing", (
                "passed on another endpoint's conntrack entry")
    finally:
        lab.remove_pod("default", "fc-sender")


# ---- names and state files ------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("container_id", "x/y"), ("ifname", "eth0/x"),
                                         ("pod_name", "../p")])
def test_the_agent_refuses_bad_names_from_any_client(lab, field, value):
    """Not only the plugin checks: a client of the agent's socket sending a container id
    or interface name the CNI spec refuses gets error 4, and nothing is made."""
    from labkit import node_links, sandbox, unique_lab_name

    from cilia.api.v1 import cilia_pb2
    from cilia.cni.client import AgentClient as CniClient
    from cilia.cnispec import INVALID_ENV, CNIError

    node = lab.load().nodes[0]
    links, leased = node_links(node), leases(node)
    with sandbox(unique_lab_name()) as netns:
        args = {"container_id": "c0ffee", "netns": netns, "ifname": "eth0",
                "network_name": "cilia", "cni_version": "1.1.0", "pod_namespace": "default",
                "pod_name": "p", field: value}
        client = CniClient(node.socket)
        try:
            with pytest.raises(CNIError) as err:
                client.call("Add", cilia_pb2.CNIArgs(**args))
        finally:
            if node_links(node) != links:  # made after all: undo it for the next tests
                client.call("Del", cilia_pb2.CNIArgs(**args))
    assert err.value.code == INVALID_ENV, err.value.msg
    assert node_links(node) == links and leases(node) == leased


def test_damaged_state_files_are_rebuilt_from_the_node():
    """ipam.json and endpoints.json overwritten with garbage: the agent starts (before,
    it crash-looped on the JSON error), keeps the pod's entry and its lease, never gives
    the pod's address to a new pod, and keeps the damaged files aside."""
    from pathlib import Path

    from labkit import unique_lab_name

    from cilia.lab.lab import Lab

    lab = Lab(unique_lab_name())
    try:
        lab.up()
        old = lab.run_pod(pod_manifest("old"))
        node = lab.load().nodes[0]
        state = Path(node.state_dir)
        lab.stop_agent()
        for name in ("ipam.json", "endpoints.json"):
            (state / name).write_bytes(b"\x00{not json")
        node = lab.start_agent()
        assert sorted(p.name.split(".corrupt-")[0] for p in state.glob("*.corrupt-*")) == [
            "endpoints.json", "ipam.json"]
        assert old.ip in leases(node), "the surviving pod's address is not leased"
        with BpfMap.open_pinned(node.bpffs_root, layouts.ENDPOINTS) as m:
            assert m.lookup(EndpointKey.for_ip(old.ip)) is not None
        new = [lab.run_pod(pod_manifest(f"new{i}")) for i in range(3)]
        assert old.ip not in {p.ip for p in new}, "an address in use was given again"
        with servers(lab, "default/old", [8080], "old"):
            assert probe(lab, f"node:{node.name}", old.ip, 8080, "udp") == "old:hello"
    finally:
        lab.down()


# ---- a new policy reaches established connections --------------------------------------


@pytest.mark.parametrize("side", ["ingress", "egress"])
def test_a_deny_reaches_established_connections(lab, pod, apply, side):
    """An open TCP connection and a UDP flow, then a policy that forbids them (ingress of
    the server, or egress of the client): their next packets are dropped. Before, a
    connection once allowed passed on its conntrack entry for its whole life (six hours
    for TCP). The bound: the first packet after the agent has applied the policy."""
    lab.run_pod(pod_manifest(f"fc-{side}", labels={"app": f"fc-{side}"}))
    target = "fc" if side == "ingress" else f"fc-{side}"
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": f"deny-{side}", "namespace": "default"},
              "spec": {"podSelector": {"matchLabels": {"app": target}},
                       "policyTypes": [side.capitalize()]}}
    try:
        with servers(lab, "default/fc", [8083], "fc"):
            proc = subprocess.Popen(
                lab.exec_argv(f"default/fc-{side}", [sys.executable, "-c", OPEN_FLOWS.format(
                    host=pod.ip, port=8083)]),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                assert proc.stdout.readline().split() == ["fc:t1", "fc:u1"]
                apply(policy)
                proc.stdin.write("go\n")
                proc.stdin.flush()
                after = proc.stdout.readline().split()
            finally:
                proc.kill()
        assert after == ["none", "none"], f"established flows passed the new policy: {after}"
    finally:
        lab.remove_pod("default", f"fc-{side}")


# ---- ICMP errors belong to their connection ----------------------------------------------

REFUSED = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.connect(("{host}", {port}))
try:
    s.send(b"anyone?")
    s.recv(100)
    print("answered")
except ConnectionRefusedError:
    print("refused")        # the ICMP port unreachable reached the socket
except socket.timeout:
    print("silence")
"""


def test_icmp_errors_reach_a_pod_under_default_deny(lab, pod, apply):
    """A pod whose ingress is default-deny sends a datagram to a closed port outside:
    the ICMP port unreachable that answers it belongs to the pod's own flow (RELATED),
    as path-MTU discovery's "fragmentation needed" does. Before, it was judged as a new
    connection from outside and dropped: the pod waited for nothing."""
    apply({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": "deny-fc-icmp", "namespace": "default"},
           "spec": {"podSelector": {"matchLabels": {"app": "fc"}},
                    "policyTypes": ["Ingress"]}})
    out = _sh(lab.exec_argv("default/fc", [sys.executable, "-c", REFUSED.format(
        host="172.30.0.1", port=9)])).strip()
    assert out == "refused", f"the pod got {out} instead of the ICMP error"


# ---- a full policy map -------------------------------------------------------------------

def test_a_policy_too_big_for_the_map_is_refused_and_stops_nothing_else():
    """A policy map of 64 entries (--policy-map-max) and a policy that needs 100 (100
    ipBlocks): it is refused with its count in its status, the pod it selects stays
    isolated, and everyone else goes on: a new pod gets its network, a small policy is
    enforced. Before, the LPM trie's ENOSPC was an unknown error, the reconcile stopped
    before the enforcement flags were written (the pod stayed open to everyone), and
    every later ADD on the node failed."""
    from labkit import unique_lab_name

    from cilia.client import AgentClient
    from cilia.lab.lab import Lab

    lab = Lab(unique_lab_name())
    try:
        lab.up(agent_args=["--policy-map-max", "64"])
        full = lab.run_pod(pod_manifest("full", labels={"app": "full"}))
        lab.run_pod(pod_manifest("client", labels={"app": "client"}))
        node = lab.load().nodes[0]
        agent = AgentClient(node.socket)
        with servers(lab, "default/full", [8080], "full"):
            assert probe(lab, "default/client", full.ip, 8080) == "full:hello"
            lab.datastore.put({
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "too-big", "namespace": "default"},
                "spec": {"podSelector": {"matchLabels": {"app": "full"}},
                         "policyTypes": ["Ingress"],
                         "ingress": [{"from": [{"ipBlock": {"cidr": f"198.51.100.{i}/32"}}
                                               for i in range(100)]}]}})
            agent.wait_policy_synced()
            assert probe(lab, "default/client", full.ip, 8080, timeout=1) is None, (
                "the pod a too-big policy selects was left open")
        (status,) = [p for p in agent.policies() if p.name == "too-big"]
        assert not status.valid and "needs 100 policy map entries" in status.error, status
        assert agent.status().message == "ok", agent.status().message
        # Everyone else goes on: a new pod, and a small policy on it.
        late = lab.run_pod(pod_manifest("late", labels={"app": "late"}))
        lab.datastore.put({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "small", "namespace": "default"},
            "spec": {"podSelector": {"matchLabels": {"app": "late"}},
                     "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {
                         "app": "client"}}}]}]}})
        agent.wait_policy_synced()
        with servers(lab, "default/late", [8080], "late"):
            assert probe(lab, "default/client", late.ip, 8080) == "late:hello"
            assert probe(lab, "default/full", late.ip, 8080, timeout=1) is None
    finally:
        lab.down()


def _ingress_from(namespace: str, name: str, app: str, peers: list[dict]) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"podSelector": {"matchLabels": {"app": app}},
                     "policyTypes": ["Ingress"], "ingress": [{"from": peers}]}}


def _blocks(prefix: str, first: int, n: int) -> list[dict]:
    return [{"ipBlock": {"cidr": f"{prefix}.{i}/32"}} for i in range(first, first + n)]


def test_one_namespace_cannot_take_the_policy_map_of_the_others():
    """A policy map of 64 entries, a namespace's share of it half (the default of
    --policy-namespace-share). Namespace `tenant` has two policies of 30 entries each,
    each within the per-policy half, together 60; `default` has one of 31. All would
    need 91: the tenant's largest (t-a; by name on a tie) is refused with a status that
    names the namespace, its pod stays isolated, and default's policy is enforced.
    Before, only the largest policies of all were refused while the map overflowed:
    default's 31, so one tenant's policies took the room of the others."""
    from labkit import unique_lab_name

    from cilia.client import AgentClient
    from cilia.lab.lab import Lab

    lab = Lab(unique_lab_name())
    try:
        lab.up(agent_args=["--policy-map-max", "64"])
        lab.datastore.put({"apiVersion": "v1", "kind": "Namespace",
                           "metadata": {"name": "tenant", "labels": {"ns": "tenant"}}})
        t = lab.run_pod(pod_manifest("t", namespace="tenant", labels={"app": "t"}))
        d = lab.run_pod(pod_manifest("d", labels={"app": "d"}))
        lab.run_pod(pod_manifest("client", labels={"app": "client"}))
        agent = AgentClient(lab.load().nodes[0].socket)
        lab.datastore.put(_ingress_from("tenant", "t-a", "t", _blocks("198.51.100", 0, 30)))
        lab.datastore.put(_ingress_from("tenant", "t-b", "t", _blocks("198.51.100", 100, 30)))
        lab.datastore.put(_ingress_from("default", "other", "d", _blocks("203.0.113", 0, 30)
                                        + [{"podSelector": {"matchLabels": {"app": "client"}}}]))
        agent.wait_policy_synced()
        status = {p.name: p for p in agent.policies()}
        assert status["other"].valid, status["other"]
        assert status["t-b"].valid, status["t-b"]
        assert not status["t-a"].valid, status["t-a"]
        assert "namespace tenant's policies together need 60" in status["t-a"].error, (
            status["t-a"].error)
        with servers(lab, "default/d", [8080], "d"), servers(lab, "tenant/t", [8080], "t"):
            assert probe(lab, "default/client", d.ip, 8080) == "d:hello"
            assert probe(lab, "outside", d.ip, 8080, timeout=1) is None
            assert probe(lab, "default/client", t.ip, 8080, timeout=1) is None
            assert probe(lab, "outside", t.ip, 8080, timeout=1) is None
    finally:
        lab.down()


def test_a_bad_cilia_node_stops_nothing_else(lab, pod):
    """A CiliaNode whose pod CIDR is no network: before, the route for it failed and the
    reconcile stopped there, so a policy applied after it was never enforced, and
    nothing said why. Now routing leaves that node out, policy goes on, and `cilia
    status` names the object."""
    import time

    from cilia.client import AgentClient

    node = lab.load().nodes[0]
    rogue = {"apiVersion": "cilia.io/v1alpha1", "kind": "CiliaNode",
             "metadata": {"name": "rogue"},
             "spec": {"podCIDRs": ["banana"],
                      "addresses": [{"type": "InternalIP", "ip": "172.30.0.99"}]}}
    deny = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "deny-fc-rogue", "namespace": "default"},
            "spec": {"podSelector": {"matchLabels": {"app": "fc"}},
                     "policyTypes": ["Ingress"]}}
    with servers(lab, "default/fc", [8084], "fc"):
        assert probe(lab, "outside", pod.ip, 8084) == "fc:hello"
        lab.datastore.put(rogue)
        lab.datastore.put(deny)
        try:
            deadline = time.monotonic() + 15
            while probe(lab, "outside", pod.ip, 8084, timeout=0.5) is not None:
                assert time.monotonic() < deadline, "the policy was never enforced"
            message = AgentClient(node.socket).status().message
            assert "CiliaNode rogue" in message, message
        finally:
            lab.datastore.delete("NetworkPolicy", "default", "deny-fc-rogue")
            lab.datastore.delete("CiliaNode", "", "rogue")
    AgentClient(node.socket).wait_policy_synced(timeout=15)


# ---- a prefilter bigger than its map ---------------------------------------------------

def _bulk_cidrs(start: int, n: int) -> list[str]:
    """n /32s from 100.64.0.0/10 (shared address space: nothing in the lab)."""
    import ipaddress

    base = int(ipaddress.IPv4Address("100.64.0.0"))
    return [f"{ipaddress.IPv4Address(base + i)}/32" for i in range(start, start + n)]


def _until(check, what: str, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_70000_prefilter_cidrs_are_refused_by_object_and_stop_nothing_else():
    """CiliaPrefilter objects holding 70,000 CIDRs, more than the XDP deny list's 65,536
    entries. Objects are taken oldest first (then by name), each whole or not at all:
    `a-bulk` (60,000) fits, `b-bulk` (10,000) does not and denies nothing, `c-outside`
    (the lab's outside address) fits after it. `cilia status` and the log name b-bulk;
    a policy update and a new pod's ADD go on and are enforced; once a-bulk is gone,
    b-bulk fits and is applied. Before, a slot was found by building a set as big as
    the deny list for each CIDR (hours for 60,000), the reconcile thread never got past
    the prefilter to policy, and nothing named the object."""
    from labkit import unique_lab_name

    from cilia.client import AgentClient
    from cilia.lab.lab import Lab

    def prefilter(name: str, cidrs: list[str]) -> dict:
        return {"apiVersion": "cilia.io/v1alpha1", "kind": "CiliaPrefilter",
                "metadata": {"name": name}, "spec": {"deny": cidrs}}

    def denied() -> set[str]:
        with BpfMap.open_pinned(node.bpffs_root, layouts.PREFILTER) as m:
            return {k.prefix for k in m.keys()}

    lab = Lab(unique_lab_name())
    try:
        lab.up()
        victim = lab.run_pod(pod_manifest("victim", labels={"app": "victim"}))
        lab.run_pod(pod_manifest("client", labels={"app": "client"}))
        node = lab.load().nodes[0]
        agent = AgentClient(node.socket)
        with servers(lab, "default/victim", [8080], "victim"):
            assert probe(lab, "outside", victim.ip, 8080) == "victim:hello"
            a, b = _bulk_cidrs(0, 60_000), _bulk_cidrs(60_000, 10_000)
            lab.datastore.put(prefilter("a-bulk", a))
            lab.datastore.put(prefilter("b-bulk", b))
            lab.datastore.put(prefilter("c-outside", ["172.30.0.1/32"]))
            # An unrelated policy update and a pod's ADD, while the prefilter is applied.
            lab.datastore.put({
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "only-client", "namespace": "default"},
                "spec": {"podSelector": {"matchLabels": {"app": "victim"}},
                         "policyTypes": ["Ingress"],
                         "ingress": [{"from": [{"podSelector": {"matchLabels": {
                             "app": "client"}}}]}]}})
            late = lab.run_pod(pod_manifest("late", labels={"app": "late"}))
            _until(lambda: probe(lab, "default/late", victim.ip, 8080, timeout=0.5) is None,
                   "the policy update was never enforced")
            assert probe(lab, "default/client", victim.ip, 8080) == "victim:hello"
            with servers(lab, "default/late", [8080], "late"):
                assert probe(lab, "default/client", late.ip, 8080) == "late:hello"
            agent.wait_policy_synced(timeout=30)
            # What fits is applied, whole objects, in order; the rest is named.
            _until(lambda: len(denied()) == 60_001, "a-bulk and c-outside not applied")
            keys = denied()
            assert set(a) | {"172.30.0.1/32"} == keys and not keys & set(b)
            message = agent.status().message
            assert "CiliaPrefilter b-bulk" in message and "refused" in message, message
            assert "a-bulk" not in message and "c-outside" not in message, message
            assert probe(lab, "outside", victim.ip, 8080, timeout=1) is None  # c-outside
            # Room again: b-bulk fits and is applied, nothing is named any more.
            lab.datastore.delete("CiliaPrefilter", "", "a-bulk")
            _until(lambda: denied() == set(b) | {"172.30.0.1/32"}, "b-bulk never applied")
            _until(lambda: "b-bulk" not in agent.status().message, "b-bulk still named")
    finally:
        lab.down()


# ---- fragments -------------------------------------------------------------------------

BIG_UDP = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.sendto(b"x" * 4000, ("{host}", {port}))
try:
    print(len(s.recvfrom(10000)[0]))
except socket.timeout:
    print(0)
"""


def test_fragmented_datagrams_of_an_allowed_flow_pass(lab, pod, apply):
    """A 4000-byte datagram (three fragments at MTU 1500) to a pod whose ingress allows
    its sender on that port, and its 4003-byte answer: only the first fragment carries
    the ports, and the others now find the connection by their datagram's IP id. Before,
    every non-first fragment to or from an enforced pod was dropped (drop_fragment):
    large UDP (DNS with EDNS, say) never arrived."""
    lab.run_pod(pod_manifest("fc-frag", labels={"app": "fc-frag"}))
    try:
        apply({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"name": "fc-from-frag", "namespace": "default"},
               "spec": {"podSelector": {"matchLabels": {"app": "fc"}},
                        "policyTypes": ["Ingress"],
                        "ingress": [{"from": [{"podSelector": {"matchLabels": {
                            "app": "fc-frag"}}}], "ports": [{"protocol": "UDP",
                                                             "port": 8085}]}]}})
        with servers(lab, "default/fc", [8085], "fc"):
            out = _sh(lab.exec_argv("default/fc-frag", [sys.executable, "-c", BIG_UDP.format(
                host=pod.ip, port=8085)])).strip()
        assert out == str(len("fc:") + 4000), f"the answer was {out} bytes"
    finally:
        lab.remove_pod("default", "fc-frag")


# ---- the node's address is the node's only when the node sends ---------------------------

def test_nodeport_traffic_snated_to_the_node_is_not_the_node(lab, pod, apply):
    """kube-proxy's NodePort (externalTrafficPolicy: Cluster) DNATs to the pod and SNATs
    to the node's address: before, the pod's ingress policy took that for the node
    itself (always allowed) and a default-deny pod was open to the world through any
    NodePort. Only what the node sends from its own sockets is the node; the kubelet's
    probes (the node connecting itself) still pass."""
    node = lab.load().nodes[0]
    tag = ["-m", "comment", "--comment", "cilia-test nodeport"]
    rules = [
        ("PREROUTING", ["-d", node.underlay_ip, "-p", "tcp", "--dport", "30080", *tag,
                        "-j", "DNAT", "--to-destination", f"{pod.ip}:8086"]),
        ("POSTROUTING", ["-d", pod.ip, "-p", "tcp", "--dport", "8086", "-m", "conntrack",
                         "--ctorigdstport", "30080", *tag, "-j", "MASQUERADE"]),
    ]
    for chain, rule in rules:
        _sh(in_netns(node.netns, ["iptables", "-w", "-t", "nat", "-I", chain, *rule]))
    try:
        with servers(lab, "default/fc", [8086], "fc"):
            assert probe(lab, "outside", node.underlay_ip, 30080) == "fc:hello", (
                "the NodePort stand-in does not work")
            apply({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                   "metadata": {"name": "deny-fc-np", "namespace": "default"},
                   "spec": {"podSelector": {"matchLabels": {"app": "fc"}},
                            "policyTypes": ["Ingress"]}})
            assert probe(lab, "outside", node.underlay_ip, 30080, timeout=1) is None, (
                "the world reached a default-deny pod through a NodePort")
            assert probe(lab, f"node:{node.name}", pod.ip, 8086) == "fc:hello", (
                "the node itself (the kubelet's probes) was refused")
    finally:
        for chain, rule in rules:
            subprocess.run(in_netns(node.netns, ["iptables", "-w", "-t", "nat", "-D", chain,
                                                 *rule]), capture_output=True)


# ---- privilege ---------------------------------------------------------------------------

FETCH = """
import sys, urllib.request
try:
    urllib.request.urlopen(f"http://{sys.argv[1]}:9962/metrics", timeout=2).read()
    print("served")
except OSError:
    print("refused")
"""


def test_metrics_only_on_the_node_address_and_loopback(lab):
    """Not on every address the node has (a second one here, as a node on two networks
    would have): before, the agent served 0.0.0.0."""
    node = lab.load().nodes[0]
    extra = "172.30.0.250"
    _sh(in_netns(node.netns, ["ip", "addr", "add", f"{extra}/32", "dev", "eth0"]))
    try:
        answers = {addr: _sh(in_netns(node.netns, [sys.executable, "-c", FETCH, addr])
                             ).strip() for addr in (node.underlay_ip, "127.0.0.1", extra)}
    finally:
        subprocess.run(in_netns(node.netns, ["ip", "addr", "del", f"{extra}/32", "dev",
                                             "eth0"]), capture_output=True)
    assert answers == {node.underlay_ip: "served", "127.0.0.1": "served", extra: "refused"}
