"""Cross-node pod traffic: routes to the other nodes' pod CIDRs, kept in step with the
CiliaNode objects of the datastore.

- native: `<pod CIDR> via <node IP>`: the underlay carries pod addresses as they are.
- vxlan: a kernel VXLAN device, `cilia_vxlan` (VNI 2, UDP 8472), collect_md
  (`external`: `ip -d link show cilia_vxlan`). Each node's device has the first address
  of its pod CIDR and a MAC derived from its node IP, so a remote node needs no more
  than its CiliaNode to be reached: `<pod CIDR> via <its .1> dev cilia_vxlan onlink`, a
  permanent neighbour entry `<its .1> lladdr <its MAC>`, and in the cilia_tunnel map its
  pod CIDR and its node IP, each to its node IP (`bpftool map dump pinned
  <bpffs root>/cilia_tunnel`). cil_to_vxlan (tc egress on the device) gives every
  packet out of it its tunnel from that map; cil_from_vxlan (tc ingress) drops a
  decapsulated frame whose inner source is no address of the node that sent it (the
  outer source, which a collect_md device keeps beside the frame), so that no node can
  speak for another's pods (bpf/lib/antispoof.h).

Everything is marked (routes with protocol 196) and inspectable with `ip route show
proto 196`, `ip neigh show dev cilia_vxlan`, `tc filter show dev cilia_vxlan ingress`
(and `egress`); what no longer matches a CiliaNode is removed, and `cleanup()` removes it
all.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cilia.datapath import layouts
from cilia.datapath.layouts import IpcacheKey, TunnelEndpoint

log = logging.getLogger(__name__)

RTPROT_CILIA = 196
RTNH_F_ONLINK = 4
ADDR_GEN_MODE_NONE = 1  # IN6_ADDR_GEN_MODE_NONE
NUD_PERMANENT = 0x80
VXLAN_DEVICE = "cilia_vxlan"
VXLAN_VNI = layouts.TUNNEL_VNI
VXLAN_PORT = 8472
VXLAN_OVERHEAD = 50


def _is_overlay_device(link) -> bool:
    """Whether an existing cilia_vxlan is what setup() makes: VXLAN, collect_md, our port."""
    info = link.get_attr("IFLA_LINKINFO")
    if info is None or info.get_attr("IFLA_INFO_KIND") != "vxlan":
        return False
    data = info.get_attr("IFLA_INFO_DATA")
    return bool(data is not None and data.get_attr("IFLA_VXLAN_COLLECT_METADATA")
                and data.get_attr("IFLA_VXLAN_PORT") == VXLAN_PORT)


def vtep_mac(node_ip: str) -> str:
    """A locally administered unicast MAC carrying the node's IPv4 address."""
    return "02:c1:" + ":".join(f"{b:02x}" for b in ipaddress.IPv4Address(node_ip).packed)


def vtep_ip(pod_cidr: str) -> str:
    return str(ipaddress.IPv4Network(pod_cidr).network_address + 1)


def node_object(name: str, pod_cidr: str, node_ip: str) -> dict:
    return {
        "apiVersion": "cilia.io/v1alpha1", "kind": "CiliaNode",
        "metadata": {"name": name},
        "spec": {"podCIDRs": [pod_cidr], "addresses": [{"type": "InternalIP", "ip": node_ip}]},
    }


def remote_nodes(nodes: list[dict], own: str, own_cidr: str = "",
                 warn: Callable[[str, str], None] | None = None,
                 ) -> dict[str, tuple[str, str]]:
    """name -> (pod CIDR, node IP) of every other node with both, each checked: a
    CiliaNode whose pod CIDR is no IPv4 network (or a default route, or overlaps this
    node's or an earlier node's), or whose InternalIP is no IPv4 address, is left out,
    and `warn(name, why)` says so: one bad object never takes routes from the others,
    nor this node's pods."""
    out: dict[str, tuple[str, str]] = {}
    taken = [ipaddress.IPv4Network(own_cidr)] if own_cidr else []
    for n in sorted(nodes, key=lambda n: str((n.get("metadata") or {}).get("name"))):
        name = (n.get("metadata") or {}).get("name")
        spec = n.get("spec") or {}
        if not isinstance(spec, dict):
            continue
        cidrs = spec.get("podCIDRs") or []
        ips = [a.get("ip") for a in spec.get("addresses") or []
               if isinstance(a, dict) and a.get("type") == "InternalIP"]
        if not name or name == own or not cidrs or not ips:
            continue
        try:
            cidr = ipaddress.IPv4Network(str(cidrs[0]))
            ip = ipaddress.IPv4Address(str(ips[0]))
        except ValueError as err:
            if warn:
                warn(name, f"{err}")
            continue
        clash = next((t for t in taken if cidr.overlaps(t)), None)
        if cidr.prefixlen < 8 or clash is not None:
            if warn:
                warn(name, f"pod CIDR {cidr} " + (f"overlaps {clash}" if clash else
                                                  "is wider than a /8"))
            continue
        taken.append(cidr)
        out[name] = (str(cidr), str(ip))
    return out


class NodeRoutes:
    def __init__(self, mode: str, node_name: str, pod_cidr: str, node_ip: str, device: str,
                 pod_mtu: int, tunnel=None):
        """`tunnel`: the cilia_tunnel map (a BpfMap), written in overlay mode."""
        self.mode = mode
        self.node_name = node_name
        self.pod_cidr = pod_cidr
        self.node_ip = node_ip
        self.device = device
        self.pod_mtu = pod_mtu
        self.tunnel = tunnel
        self.vxlan_index = 0
        self.remotes: dict[str, tuple[str, str]] = {}
        self.rejected: dict[str, str] = {}  # CiliaNode name -> why it is left out

    def _warn(self, name: str, why: str) -> None:
        if self.rejected.get(name) != why:
            log.error("CiliaNode %s is left out of routing: %s", name, why)
        self.rejected[name] = why

    def setup(self) -> int | None:
        """Creates the VXLAN device in overlay mode, down until the first sync(); returns
        its ifindex."""
        if self.mode != "vxlan":
            self._remove_vxlan()
            return None
        if not self.device or not self.node_ip:
            raise RuntimeError("the VXLAN overlay needs an uplink: give --devices and --node-ip")
        with IPRoute() as ipr:
            uplink = ipr.link_lookup(ifname=self.device)[0]
            mtu = ipr.get_links(uplink)[0].get_attr("IFLA_MTU") - VXLAN_OVERHEAD
            if self.pod_mtu > mtu:
                raise RuntimeError(
                    f"pod MTU {self.pod_mtu} does not fit the overlay ({self.device} MTU "
                    f"minus {VXLAN_OVERHEAD} bytes of VXLAN is {mtu}): give --mtu {mtu}")
            found = ipr.link_lookup(ifname=VXLAN_DEVICE)
            if found and not _is_overlay_device(ipr.get_links(found[0])[0]):
                # An earlier agent's device (FDB-driven, no collect_md: it keeps no outer
                # source for cil_from_vxlan to check) or someone's look-alike: made
                # anew, its routes and neighbours with it (sync() writes them again).
                log.info("replacing %s: not a collect_md VXLAN device on port %d",
                         VXLAN_DEVICE, VXLAN_PORT)
                ipr.link("del", index=found[0])
                found = []
            if not found:
                ipr.link("add", ifname=VXLAN_DEVICE, kind="vxlan", vxlan_collect_metadata=1,
                         vxlan_port=VXLAN_PORT, vxlan_local=self.node_ip, vxlan_learning=0,
                         vxlan_link=uplink, address=vtep_mac(self.node_ip), mtu=mtu)
                found = ipr.link_lookup(ifname=VXLAN_DEVICE)
                # No IPv6 link-local, so no neighbour discovery or MLD of the kernel's
                # own: nothing but IPv4 crosses the overlay (cil_to_vxlan).
                ipr.link("set", index=found[0], IFLA_AF_SPEC={"attrs": [
                    ("AF_INET6", {"attrs": [("IFLA_INET6_ADDR_GEN_MODE", ADDR_GEN_MODE_NONE)]})]})
            self.vxlan_index = found[0]
            addr = vtep_ip(self.pod_cidr)
            if addr not in [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=found[0])]:
                ipr.addr("add", index=found[0], address=addr, prefixlen=32)
        # Up in sync(), once the caller has attached cil_from_vxlan: a new device never
        # decapsulates a frame unchecked.
        return self.vxlan_index

    def sync(self, nodes: list[dict]) -> None:
        self.rejected = {k: v for k, v in self.rejected.items()
                         if any((n.get("metadata") or {}).get("name") == k for n in nodes)}
        remotes = remote_nodes(nodes, self.node_name, self.pod_cidr, self._warn)
        with IPRoute() as ipr:
            if self.mode == "vxlan" and self.vxlan_index:
                ipr.link("set", index=self.vxlan_index, state="up")
            desired = {}
            for cidr, ip in remotes.values():
                if self.mode == "vxlan":
                    desired[cidr] = {"gateway": vtep_ip(cidr), "oif": self.vxlan_index,
                                     "flags": RTNH_F_ONLINK}
                else:
                    desired[cidr] = {"gateway": ip}
            current = {f"{r.get_attr('RTA_DST')}/{r['dst_len']}": r
                       for r in ipr.get_routes(family=socket.AF_INET, proto=RTPROT_CILIA)}
            if self.mode == "vxlan":
                for cidr, ip in remotes.values():
                    self._vtep_neighbour(ipr, cidr, ip)
            # Tunnels before routes: a route never leads into the overlay to a node the
            # datapath has no tunnel for.
            self._sync_tunnels(remotes)
            for cidr, attrs in desired.items():
                r = current.get(cidr)
                if r is None or r.get_attr("RTA_GATEWAY") != attrs["gateway"]:
                    ipr.route("replace", dst=cidr, proto=RTPROT_CILIA, **attrs)
                    log.info("route %s via %s", cidr, attrs["gateway"])
            for cidr in current:
                if cidr not in desired:
                    ipr.route("del", dst=cidr, proto=RTPROT_CILIA)
                    log.info("route %s removed: its node is gone", cidr)
            if self.mode == "vxlan":
                for name, (cidr, _) in self.remotes.items():
                    if name not in remotes:
                        self._forget_vtep(ipr, cidr)
        self.remotes = remotes

    def _vtep_neighbour(self, ipr: IPRoute, cidr: str, ip: str) -> None:
        ipr.neigh("replace", dst=vtep_ip(cidr), lladdr=vtep_mac(ip), ifindex=self.vxlan_index,
                  state=NUD_PERMANENT)

    def _forget_vtep(self, ipr: IPRoute, cidr: str) -> None:
        try:
            ipr.neigh("del", dst=vtep_ip(cidr), ifindex=self.vxlan_index)
        except NetlinkError:
            pass

    def tunnels(self, remotes: dict[str, tuple[str, str]]) -> dict[str, str]:
        """cilia_tunnel as it should be: prefix -> the address of the node that owns it
        (each other node's pod CIDR and its own address); nothing outside overlay mode."""
        if self.mode != "vxlan":
            return {}
        out = {}
        for cidr, ip in remotes.values():
            out[cidr] = ip
            out[f"{ip}/32"] = ip
        return out

    def _sync_tunnels(self, remotes: dict[str, tuple[str, str]]) -> None:
        """New and changed entries first, then stale ones out: a node that stays never
        loses its tunnel."""
        if self.tunnel is None:
            return
        desired = {IpcacheKey.for_prefix(p).pack(): TunnelEndpoint.for_ips(ip, self.node_ip)
                   for p, ip in self.tunnels(remotes).items()}
        current = {k.pack(): v for k, v in self.tunnel.items()}
        for key, value in desired.items():
            if current.get(key) != value:
                self.tunnel.update(IpcacheKey.unpack(key), value)
        for key in current.keys() - desired.keys():
            self.tunnel.delete(IpcacheKey.unpack(key))

    def remote_addresses(self) -> list[str]:
        """Other nodes' addresses (and VTEPs), for the ipcache's remote-node identity."""
        out = []
        for cidr, ip in self.remotes.values():
            out.append(ip)
            if self.mode == "vxlan":
                out.append(vtep_ip(cidr))
        return out

    def _remove_vxlan(self) -> None:
        with IPRoute() as ipr:
            if ipr.link_lookup(ifname=VXLAN_DEVICE):
                ipr.link("del", ifname=VXLAN_DEVICE)

    def cleanup(self) -> None:
        with IPRoute() as ipr:
            for r in ipr.get_routes(family=socket.AF_INET, proto=RTPROT_CILIA):
                ipr.route("del", dst=f"{r.get_attr('RTA_DST')}/{r['dst_len']}",
                          proto=RTPROT_CILIA)
        self._remove_vxlan()
