"""The node's uplinks: cil_from_netdev at tc ingress, the XDP prefilter before it.

cil_from_netdev is attached idempotently (atomic replace) at every start, and every
device that has it is listed in the cilia_netdevs map: cil_from_pod sends a pod's
connection to another node past the stack only out of one of them, since only their
answers come back past the stack (through cil_from_netdev). The XDP
prefilter is attached only while its deny list has something in it: native XDP on a
veth turns off segmentation offload on its peer, which cut cross-node throughput about
4x in bench/run_host.py, a price only worth paying while something is being dropped.
Both stay when the agent stops, like the pods' programs. `tc filter show dev eth0 ingress` and
`ip link show eth0` (xdp/xdpgeneric) show them.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute

from cilia.datapath import layouts, tc, xdp
from cilia.datapath.layouts import U32, NetdevInfo
from cilia.datapath.loader import Datapath
from cilia.datapath.progs import is_cilias

log = logging.getLogger(__name__)


@dataclass
class Device:
    name: str
    ifindex: int
    xdp_mode: str = ""  # native, generic, or "" while no prefilter program is attached
    uplink: bool = True  # the overlay device gets from-netdev only, never the prefilter
    from_netdev: bool = False


def default_route_device() -> list[str]:
    """The device of the default route, if there is one."""
    with IPRoute() as ipr:
        for r in ipr.get_routes(family=socket.AF_INET, table=254):
            if r["dst_len"] == 0 and r.get_attr("RTA_OIF"):
                return [ipr.get_links(r.get_attr("RTA_OIF"))[0].get_attr("IFLA_IFNAME")]
    return []


def first_address(device: str) -> str:
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=device)
        for a in ipr.get_addr(family=socket.AF_INET, index=index[0]) if index else ():
            return a.get_attr("IFA_ADDRESS")
    raise RuntimeError(f"device {device} has no IPv4 address: give --node-ip")


def detach_cilia_programs(ifindex: int) -> list[str]:
    """Removes cilia's programs (named cil_*) from a device's tc hooks and XDP, leaving
    anyone else's alone; returns what it removed."""
    removed = []
    for point, hook in ((tc.INGRESS, "tc ingress"), (tc.EGRESS, "tc egress")):
        if is_cilias(tc.query(ifindex, point)):
            tc.detach(ifindex, point)
            removed.append(hook)
    found = xdp.query(ifindex)
    if found and is_cilias(found[0]):
        xdp.detach(ifindex)
        removed.append("xdp")
    return removed


class HostDevices:
    def __init__(self, names: list[str], datapath: Datapath, prefilter: bool):
        self.dp = datapath
        self.prefilter = prefilter
        self.devices: list[Device] = []
        with IPRoute() as ipr:
            for name in names:
                index = ipr.link_lookup(ifname=name)
                if not index:
                    raise RuntimeError(f"device {name} (--devices) does not exist")
                self.devices.append(Device(name, index[0]))

    def attach(self) -> None:
        for dev in self.devices:
            self.attach_from_netdev(dev)
            if not self.prefilter:
                xdp.detach(dev.ifindex)
        self.sync_netdevs()

    def sync_netdevs(self) -> None:
        """cilia_netdevs holds exactly the devices with cil_from_netdev (an ifindex from
        an earlier run, now another device's or none, goes): new entries first, then
        stale ones out, so a device that stays is never missing."""
        netdevs = self.dp.map(layouts.NETDEVS)
        wanted = {dev.ifindex: NetdevInfo(layouts.NETDEV_F_UPLINK if dev.uplink
                                          else layouts.NETDEV_F_OVERLAY)
                  for dev in self.devices if dev.from_netdev}
        for ifindex, info in wanted.items():
            netdevs.update(U32(ifindex), info)
        for key in list(netdevs.keys()):
            if key.value not in wanted:
                netdevs.delete(key)

    def set_prefilter(self, active: bool) -> None:
        """The XDP prefilter on every uplink while `active` (something is denied)."""
        for dev in self.devices:
            if not dev.uplink:
                continue
            attached = xdp.query(dev.ifindex)
            if active and self.prefilter:
                if not attached or attached[0] != self._xdp_id():
                    dev.xdp_mode = xdp.attach(dev.ifindex, self.dp.xdp_fd)
                    log.info("XDP prefilter on %s (%s mode)", dev.name, dev.xdp_mode)
            elif attached and is_cilias(attached[0]):
                xdp.detach(dev.ifindex)
                dev.xdp_mode = ""
                log.info("XDP prefilter off %s: nothing to deny", dev.name)

    def _xdp_id(self) -> int:
        from cilia.datapath.progs import program_id

        return program_id(self.dp.xdp_fd)

    def attach_from_netdev(self, dev: Device) -> None:
        tc.attach(dev.ifindex, self.dp.from_netdev_fd, tc.INGRESS)
        dev.from_netdev = True

    def add_overlay(self, name: str, ifindex: int) -> None:
        """The VXLAN device (collect_md): cil_from_vxlan at ingress, where decapsulated
        traffic for local pods takes cil_from_netdev's path once its inner source is
        found to be the sending node's; cil_to_vxlan at egress, which gives every
        packet out of the device its tunnel (agent/routing.py)."""
        dev = next((d for d in self.devices if d.name == name), None)
        if dev is None or dev.ifindex != ifindex:
            self.devices = [d for d in self.devices if d.name != name]
            dev = Device(name, ifindex, uplink=False)
            self.devices.append(dev)
        tc.attach(dev.ifindex, self.dp.from_vxlan_fd, tc.INGRESS)
        tc.attach(dev.ifindex, self.dp.to_vxlan_fd, tc.EGRESS)
        dev.from_netdev = True
        self.sync_netdevs()

    def status(self) -> list[Device]:
        for dev in self.devices:
            found = xdp.query(dev.ifindex)
            dev.xdp_mode = found[1] if found else ""
            dev.from_netdev = tc.query(dev.ifindex, tc.INGRESS) is not None
        return self.devices
