"""Many runtime calls at once, through the real plugin (issue 13): 50 concurrent ADD,
DEL, CHECK and GC calls, with a DEL racing the ADD of the same container for a third
of them. Afterwards: no address given twice, no veth shared or orphaned, leases exactly
the endpoints', the endpoints map exactly the endpoints, and a CHECK of every survivor
passes."""

from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

from labkit import cni, endpoint_list, leases, node_links, sandbox

from cilia.agent.endpoint import host_ifname
from cilia.datapath import layouts
from cilia.datapath.maps import BpfMap

PODS = 18  # 18 ADDs, 6 of them raced by a DEL, then CHECKs, DELs and GCs: 50 calls


def _map_ips(node) -> set[str]:
    with BpfMap.open_pinned(node.bpffs_root, layouts.ENDPOINTS) as m:
        return {k.ip for k in m.keys()}


def test_fifty_concurrent_calls_keep_the_node_consistent(lab):
    node = lab.load().nodes[0]
    links_before, leases_before = node_links(node), leases(node)
    ids = [f"cc{secrets.token_hex(6)}" for _ in range(PODS)]
    raced = set(ids[::3])
    with ExitStack() as stack, ThreadPoolExecutor(max_workers=12) as pool:
        netns = {cid: stack.enter_context(sandbox(f"{node.netns[:8]}-{cid}")) for cid in ids}
        try:
            calls = [pool.submit(cni, node, "ADD", cid, netns[cid], pod=("default", cid))
                     for cid in ids]
            calls += [pool.submit(cni, node, "DEL", cid, netns[cid]) for cid in raced]
            results = [c.result(timeout=120) for c in calls]
            # Every call answered: an ADD succeeded or asked to try again, a DEL succeeded.
            for rc, out in results:
                assert rc == 0 or out.get("code") == 11, out
            eps = {e["containerID"]: e for e in endpoint_list(node)
                   if e["containerID"] in ids}
            addrs = [e["ip"] for e in eps.values()]
            assert len(addrs) == len(set(addrs)), f"an address given twice: {addrs}"
            leased = leases(node)
            ours = {ip: owner for ip, owner in leased.items() if ip not in leases_before}
            assert ours == {e["ip"]: f"{cid}/eth0" for cid, e in eps.items()}
            assert {e["ip"] for e in eps.values()} <= _map_ips(node)
            links = node_links(node) - links_before
            assert links == {host_ifname(cid, "eth0") for cid in eps}, (
                "a veth without an endpoint, or an endpoint without its veth")
            assert set(ids) - raced <= set(eps), "an ADD nobody raced did not stay"
            # CHECK every survivor and GC with all of them valid, at once.
            conf = {"cniVersion": "1.1.0", "name": "cilia", "type": "cilia-cni",
                    "socket": node.socket, "cni.dev/valid-attachments": [
                        {"containerID": c, "ifname": "eth0"} for c in
                        [e["containerID"] for e in endpoint_list(node)]]}
            more = [pool.submit(cni, node, "CHECK", cid, netns[cid]) for cid in eps]
            more += [pool.submit(cni, node, "GC", "", "", config=conf,
                                 env={"CNI_CONTAINERID": None, "CNI_NETNS": None,
                                      "CNI_IFNAME": None}) for _ in range(4)]
            for call in more:
                rc, out = call.result(timeout=120)
                assert rc == 0, out
            assert {e["containerID"] for e in endpoint_list(node)} >= set(eps), "GC removed one"
        finally:
            for cid in ids:
                cni(node, "DEL", cid, netns[cid])
    assert node_links(node) == links_before
    assert leases(node) == leases_before
