"""The services controller syncs incrementally (agent/services.py ServiceController):
from the datastore's feed of changed objects it recomputes only the Services,
EndpointSlices and Pods that changed, and plans only their frontends. What must hold:
after any sequence of changes the maps are what a controller starting from nothing
would write, at no point does a packet find a slot without its backend, and one change
among thousands of Services costs that Service, not all of them.

The datastore here is an in-memory one with the kubernetes datastore's read interface
(objects, peek, subscribe: the real ChangeFeed); the maps are dictionaries with the
BPF maps' interface (the datapath tier runs the same controller on the real maps)."""

from __future__ import annotations

import random

import pytest

from cilia.agent.services import (
    Backend,
    Frontend,
    ServiceController,
    ServiceEntry,
)
from cilia.datapath import layouts
from cilia.datastore import ChangeFeed

TCP = 6


class Store:
    """Objects by kind and (namespace, name), and the feeds of their changes."""

    def __init__(self) -> None:
        self.kinds: dict[str, dict[tuple[str, str], dict]] = {}
        self.feeds: list[ChangeFeed] = []
        self.peeks = 0

    def put(self, obj: dict) -> None:
        meta = obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        self.kinds.setdefault(obj["kind"], {})[key] = obj
        self._changed(obj["kind"], key)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        if self.kinds.get(kind, {}).pop((namespace, name), None) is not None:
            self._changed(kind, (namespace, name))

    def _changed(self, kind: str, key: tuple[str, str]) -> None:
        for feed in self.feeds:
            feed.add(kind, {key})

    def subscribe(self, kinds) -> ChangeFeed:
        feed = ChangeFeed(kinds)
        self.feeds.append(feed)
        return feed

    def peek(self, kind: str, namespace: str, name: str) -> dict | None:
        self.peeks += 1
        return self.kinds.get(kind, {}).get((namespace, name))

    def objects(self, kind: str) -> dict[tuple[str, str], dict]:
        return dict(self.kinds.get(kind, {}))


class DictMap:
    """A map's contents, by the bytes of its key, as the kernel keys it."""

    def __init__(self) -> None:
        self.data: dict = {}
        self.fail_after: int | None = None  # raise on that many more writes

    def items(self):
        return list(self.data.values())

    def update(self, key, value) -> None:
        if self.fail_after is not None:
            if self.fail_after == 0:
                self.fail_after = None
                raise OSError(28, "No space left on device")
            self.fail_after -= 1
        self.data[key.pack()] = (key, value)  # the maps' keys are C structs

    def delete(self, key) -> bool:
        return self.data.pop(key.pack(), None) is not None


class Maps:
    def __init__(self) -> None:
        self.maps: dict[str, DictMap] = {}

    def map(self, spec) -> DictMap:
        return self.maps.setdefault(spec.name, DictMap())


def controller(store: Store, maps: Maps | None = None) -> ServiceController:
    return ServiceController(maps or Maps(), store, source="kubernetes", node_name="n1",
                             external=True)


def service(name: str, ip: str, ns: str = "default", node_port: int | None = None,
            external_ips: tuple[str, ...] = (), affinity: bool = False) -> dict:
    port = {"name": "http", "port": 80, "protocol": "TCP"}
    spec = {"clusterIP": ip, "ports": [port], "externalIPs": list(external_ips)}
    if affinity:
        spec["sessionAffinity"] = "ClientIP"
    if node_port:
        port["nodePort"] = node_port
        spec["type"] = "NodePort"
    return {"kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": spec}


def endpoint_slice(name: str, owner: str, ips: list[str], ns: str = "default",
                   terminating: tuple[str, ...] = ()) -> dict:
    eps = [{"addresses": [ip], "nodeName": "n1" if i % 2 else "n2",
            "conditions": {"ready": True}} for i, ip in enumerate(ips)]
    eps += [{"addresses": [ip], "conditions": {"ready": False, "serving": True,
                                               "terminating": True}} for ip in terminating]
    return {"kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": name, "namespace": ns,
                         "labels": {"kubernetes.io/service-name": owner}},
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": eps}


def host_port_pod(name: str, ip: str, host_port: int, node: str = "n1") -> dict:
    return {"kind": "Pod", "metadata": {"name": name, "namespace": "default"},
            "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [
                {"containerPort": 80, "hostPort": host_port}]}]},
            "status": {"podIP": ip, "phase": "Running"}}


def cilia_node(name: str, ip: str) -> dict:
    return {"kind": "CiliaNode", "metadata": {"name": name},
            "spec": {"addresses": [{"type": "InternalIP", "ip": ip}]}}


def served(c: ServiceController) -> dict[Frontend, set[Backend]]:
    """What a packet finds: each frontend in the maps and the backends its slots name,
    checked to exist (a slot below the count naming no backend would drop it)."""
    out = {}
    for fe, value in c.state.services.items():
        slots = c.state.slots.get(value.rev_nat_id, [])
        assert len(slots) >= value.count, (fe, value, slots)
        assert c.state.revnat.get(value.rev_nat_id) == fe
        out[fe] = {c.state.backends[b] for b in slots[:value.count]}
    return out


def affinity(c: ServiceController) -> dict[tuple[Backend, Frontend], int]:
    """Which backends a client's affinity may name, by frontend (ids differ by history)."""
    return {(c.state.backends[b], c.state.revnat[rev]): timeout
            for (b, rev), timeout in c.state.affinity.items()}


def wanted(desired: dict[Frontend, ServiceEntry]) -> dict[Frontend, set[Backend]]:
    return {fe: set(e.backends) for fe, e in desired.items()}


def test_random_changes_converge_to_what_a_fresh_controller_writes():
    rnd = random.Random(7)
    store = Store()
    store.put(cilia_node("n1", "192.168.1.11"))
    store.put(cilia_node("n2", "192.168.1.12"))
    maps = Maps()
    c = controller(store, maps)
    c.sync()
    names = [f"s{i}" for i in range(8)]
    for step in range(400):
        what = rnd.random()
        name = rnd.choice(names)
        if what < 0.25:
            store.put(service(name, f"10.96.0.{names.index(name) + 10}",
                              node_port=rnd.choice([None, 30000 + names.index(name)]),
                              external_ips=rnd.choice([(), ("203.0.113.9",)]),
                              affinity=rnd.random() < 0.5))
        elif what < 0.35:
            store.delete("Service", "default", name)
        elif what < 0.7:  # a slice, maybe moving to another Service
            ips = [f"10.244.{rnd.randint(1, 2)}.{rnd.randint(2, 9)}"
                   for _ in range(rnd.randint(0, 4))]
            store.put(endpoint_slice(f"sl{rnd.randint(0, 9)}", name, ips,
                                     terminating=tuple(rnd.sample(ips, min(1, len(ips))))))
        elif what < 0.8:
            store.delete("EndpointSlice", "default", f"sl{rnd.randint(0, 9)}")
        elif what < 0.9:  # hostPorts, sometimes on a node address a NodePort also has
            store.put(host_port_pod(f"p{rnd.randint(0, 3)}", f"10.244.1.{rnd.randint(2, 9)}",
                                    rnd.choice([8080, 30001]), node=rnd.choice(["n1", "n2"])))
        elif what < 0.97:
            store.delete("Pod", "default", f"p{rnd.randint(0, 3)}")
        else:
            store.put(cilia_node("n2", f"192.168.1.{rnd.randint(12, 14)}"))
        if rnd.random() < 0.6:  # changes also come in batches
            continue
        c.sync()
        fresh = controller(store)
        fresh.sync()
        assert c.desired == fresh.desired, f"step {step}"
        assert served(c) == wanted(c.desired), f"step {step}"
        assert affinity(c) == affinity(fresh), f"step {step}"
        # no backend left behind, none missing (the maps' own copy of the referenced set)
        assert set(c.state.backends.values()) == set(fresh.state.backends.values()), step
        # the maps hold exactly the controller's record of them
        assert len(maps.maps[layouts.LB4_SERVICES.name].data) == len(c.state.services)
        assert len(maps.maps[layouts.LB4_BACKENDS.name].data) == len(c.state.backends)
    # only the node changes (and the first sync) recomputed everything
    assert c.full_syncs < c.syncs / 4


def test_one_change_among_thousands_of_services_costs_that_service():
    store = Store()
    store.put(cilia_node("n1", "192.168.1.11"))
    for i in range(2000):
        store.put(service(f"s{i}", f"10.96.{i // 250}.{i % 250 + 1}"))
        store.put(endpoint_slice(f"s{i}-a", f"s{i}", [f"10.244.{i // 250}.{i % 250 + 1}"]))
    c = controller(store)
    c.sync()
    assert c.full_syncs == 1 and len(c.state.services) == 2000
    store.peeks = 0
    store.put(endpoint_slice("s7-a", "s7", ["10.244.9.1", "10.244.9.2"]))
    c.sync()
    assert c.full_syncs == 1
    assert store.peeks <= 4  # the slice, its Service, the Service's slices
    assert served(c)[Frontend("10.96.0.8", 80, TCP)] == {
        Backend("10.244.9.1", 8080, TCP), Backend("10.244.9.2", 8080, TCP)}
    # an unrelated object (a Pod without hostPorts) touches no frontend
    store.put(host_port_pod("q", "10.244.0.9", 0))
    before = dict(c.state.services)
    c.sync()
    assert c.state.services == before and c.full_syncs == 1


def test_a_frontend_two_sources_claim_goes_to_a_service_then_the_first_by_name():
    store = Store()
    store.put(cilia_node("n1", "192.168.1.11"))
    store.put(service("b", "10.96.0.2", external_ips=("203.0.113.9",)))
    store.put(endpoint_slice("b-x", "b", ["10.244.1.2"]))
    store.put(service("a", "10.96.0.1", ns="zz", external_ips=("203.0.113.9",)))
    store.put(endpoint_slice("a-x", "a", ["10.244.1.3"], ns="zz"))
    store.put(host_port_pod("p", "10.244.1.4", 80))  # on 192.168.1.11:80, as is n:
    store.put(service("n", "10.96.0.3", external_ips=("192.168.1.11",)))
    store.put(endpoint_slice("n-x", "n", ["10.244.1.5"]))
    c = controller(store)
    c.sync()
    ext = Frontend("203.0.113.9", 80, TCP)
    host = Frontend("192.168.1.11", 80, TCP)
    assert c.desired[ext].service == "default/b"  # "default" sorts before "zz"
    assert c.desired[host].service == "default/n"  # a Service's wins over a hostPort's
    store.delete("Service", "default", "b")
    store.delete("Service", "default", "n")
    c.sync()
    assert c.desired[ext].service == "zz/a"
    assert c.desired[host].service == "default/p"
    assert c.desired[host].flags == layouts.LB_F_HOSTPORT
    assert served(c)[host] == {Backend("10.244.1.4", 80, TCP)}
    assert c.full_syncs == 1


def test_a_sync_that_fails_half_way_is_followed_by_a_whole_one():
    store = Store()
    store.put(cilia_node("n1", "192.168.1.11"))
    maps = Maps()
    c = controller(store, maps)
    c.sync()
    store.put(service("web", "10.96.0.1"))
    store.put(endpoint_slice("web-x", "web", ["10.244.1.2", "10.244.1.3"]))
    maps.maps[layouts.LB4_SLOTS.name].fail_after = 1
    with pytest.raises(OSError):
        c.sync()
    c.sync()  # the feed has nothing new: the keys the failed sync took are not lost
    assert served(c) == {Frontend("10.96.0.1", 80, TCP): {
        Backend("10.244.1.2", 8080, TCP), Backend("10.244.1.3", 8080, TCP)}}
    assert c.full_syncs == 2
