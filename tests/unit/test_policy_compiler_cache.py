"""The compiler remembers parsed policies, selector matches and each policy's entries
between compiles (cilia/policy/compiler.py, Compiler). A stale memory would be a hole
in enforcement, so: after every one of many random changes (policies of every kind
added, changed and removed, pods coming, going, relabelled and renumbered, namespaces
relabelled, named ports changing), a compiler that remembers gives exactly what a fresh
one gives, and a policy that did not change is not parsed again. The compiler computes
a policy again only when one of its inputs changed (the object, whether it is refused,
its selection, its peers' identities, named ports): a missed dependency shows here as
an endpoint whose entries differ from the fresh compile's."""

import random

from test_cnp_compiler import random_cnp
from test_policy_compiler import MemoryStore

from cilia.identity import IdentityAllocator, security_labels
from cilia.policy import compiler as compiler_module
from cilia.policy.compiler import Compiler, PodView

TCP, UDP = 6, 17
APPS = ("a", "b", "c", "d")


def random_peer(rnd: random.Random) -> dict:
    pick = rnd.randrange(5)
    if pick == 0:
        return {"podSelector": {"matchLabels": {"app": rnd.choice(APPS)}}}
    if pick == 1:
        return {"namespaceSelector": {"matchLabels": {"team": rnd.choice(["red", "blue"])}},
                "podSelector": {"matchExpressions": [
                    {"key": "app", "operator": "In", "values": rnd.sample(APPS, 2)}]}}
    if pick == 2:
        return {"ipBlock": {"cidr": f"10.{rnd.randint(1, 3)}.0.0/16",
                            "except": [f"10.{rnd.randint(1, 3)}.0.{rnd.choice([0, 128])}/25"]}}
    if pick == 3:
        return {"namespaceSelector": {}}
    return {"podSelector": {}}


def random_ports(rnd: random.Random) -> list[dict]:
    return rnd.choice([
        [], [{"port": 80}], [{"port": "http"}], [{"port": "dns", "protocol": "UDP"}],
        [{"port": 8000, "endPort": 8000 + rnd.randint(1, 40)}]])


def network_policy(rnd: random.Random, name: str, ns: str) -> dict:
    spec: dict = {"podSelector": rnd.choice([{}, {"matchLabels": {"app": rnd.choice(APPS)}}])}
    direction = rnd.choice(["Ingress", "Egress", "both"])
    rules = [{"peers": [random_peer(rnd) for _ in range(rnd.randint(0, 2))],
              "ports": random_ports(rnd)} for _ in range(rnd.randint(0, 2))]
    if direction in ("Ingress", "both"):
        spec["ingress"] = [{"from": r["peers"], "ports": r["ports"]} for r in rules]
    if direction in ("Egress", "both"):
        spec["egress"] = [{"to": r["peers"], "ports": r["ports"]} for r in rules]
    spec["policyTypes"] = ["Ingress", "Egress"] if direction == "both" else [direction]
    if rnd.random() < 0.05:
        spec["podSelector"] = {"matchLabels": {"bad key!": "x"}}  # invalid: isolates
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def cilia_policy(rnd: random.Random, name: str, ns: str) -> dict:
    peer = rnd.choice([{"fromEndpoints": [{"matchLabels": {"app": rnd.choice(APPS)}}]},
                       {"fromEntities": [rnd.choice(["world", "cluster", "host"])]},
                       {"fromCIDR": [f"10.{rnd.randint(1, 3)}.0.0/16"]}])
    rule = {**peer}
    if rnd.random() < 0.5:
        rule["toPorts"] = [{"ports": [{"port": rnd.choice(["80", "http"]),
                                       "protocol": "TCP"}]}]
    key = rnd.choice(["ingress", "ingressDeny"])
    kind = "CiliaNetworkPolicy" if ns else "CiliaClusterwideNetworkPolicy"
    meta = {"name": name, **({"namespace": ns} if ns else {})}
    return {"apiVersion": "cilia.io/v1alpha1", "kind": kind, "metadata": meta,
            "spec": {"endpointSelector": {"matchLabels": {"app": rnd.choice(APPS)}},
                     key: [rule]}}


class World:
    """Namespaces, pods and policies as a datastore hands them out: a changed object is
    a new object, an unchanged one the same object."""

    def __init__(self, rnd: random.Random):
        self.rnd = rnd
        self.allocator = IdentityAllocator(MemoryStore())
        self.namespaces = {"x": {"team": "red"}, "y": {"team": "blue"}}
        self.pods: dict[str, tuple[str, dict, str, tuple]] = {}
        self.policies: dict[str, dict] = {}
        self.cilia: dict[str, dict] = {}
        self.cluster: dict[str, dict] = {}
        self.refused: dict[tuple[str, str, str], str] = {}
        for i in range(8):
            self.add_pod(f"p{i}")

    def add_pod(self, name: str) -> None:
        rnd = self.rnd
        ports = (("http", TCP, rnd.choice([80, 81, 8080])), ("dns", UDP, 53))
        self.pods[name] = (rnd.choice(["x", "y"]), {"app": rnd.choice(APPS)},
                           f"10.{rnd.randint(1, 3)}.0.{rnd.randint(1, 250)}",
                           ports[:rnd.randint(0, 2)])

    def change(self) -> None:
        rnd, what = self.rnd, self.rnd.random()
        if what < 0.3:
            name = f"np{rnd.randint(0, 9)}"
            self.policies[name] = network_policy(rnd, name, rnd.choice(["x", "y"]))
        elif what < 0.4:
            self.policies.pop(f"np{rnd.randint(0, 9)}", None)
        elif what < 0.55:
            name = f"cnp{rnd.randint(0, 5)}"
            self.cilia[name] = cilia_policy(rnd, name, rnd.choice(["x", "y", ""]))
        elif what < 0.6:
            self.cilia.pop(f"cnp{rnd.randint(0, 5)}", None)
        elif what < 0.72:
            self.add_pod(f"p{rnd.randint(0, 11)}")  # new, relabelled, readdressed, ports
        elif what < 0.8 and self.pods:  # only its named ports' numbers
            name = rnd.choice(sorted(self.pods))
            ns, labels, ip, ports = self.pods[name]
            self.pods[name] = (ns, labels, ip, tuple(
                (n, proto, rnd.choice([80, 81, 8080]) if proto == TCP else number)
                for n, proto, number in ports))
        elif what < 0.88:
            self.pods.pop(f"p{rnd.randint(0, 11)}", None)
        elif what < 0.93:
            i = rnd.randint(0, 4)
            if rnd.random() < 0.8:
                self.cluster[f"p{i}"] = random_cnp(rnd, i)
            else:
                self.cluster.pop(f"p{i}", None)
        elif what < 0.96:  # refused (too big for the map), or no longer
            key = rnd.choice([("NetworkPolicy", rnd.choice(["x", "y"]), f"np{rnd.randint(0, 9)}"),
                              ("ClusterNetworkPolicy", "", f"p{rnd.randint(0, 4)}")])
            if self.refused.pop(key, None) is None:
                self.refused[key] = "too big"
        else:
            ns = rnd.choice(["x", "y"])
            self.namespaces = {**self.namespaces, ns: {"team": rnd.choice(["red", "blue"])}}

    def views(self) -> tuple[list[PodView], dict[int, PodView]]:
        views, local = [], {}
        taken = set()
        for i, (name, (ns, labels, ip, ports)) in enumerate(sorted(self.pods.items())):
            if ip in taken:
                continue
            taken.add(ip)
            ident = self.allocator.allocate(security_labels(labels, ns, self.namespaces[ns]))
            view = PodView(ns, name, dict(labels), ip, ident, ports)
            views.append(view)
            if i % 3:
                local[i + 1] = view
        return views, local


def compile_with(compiler: Compiler, world: World):
    views, local = world.views()
    return compiler.compile(list(world.policies.values()), views, world.namespaces, local,
                            list(world.cilia.values()), dict(world.refused),
                            list(world.cluster.values()))


def test_a_compiler_that_remembers_gives_what_a_fresh_one_gives():
    for seed in range(6):
        rnd = random.Random(seed)
        world = World(rnd)
        remembering = Compiler()
        for step in range(150):
            world.change()
            got = compile_with(remembering, world)
            want = compile_with(Compiler(remembering.cidr_ids), world)
            where = f"seed {seed} step {step}"
            assert got.endpoints == want.endpoints, where
            assert got.cidrs == want.cidrs, where
            # the running counts (the budget reads them) are the entries', recounted
            recount: dict = {}
            for pol in got.endpoints.values():
                for entry in pol.entries.values():
                    key = (entry.rule.kind, entry.rule.namespace, entry.rule.name)
                    recount[key] = recount.get(key, 0) + 1
            assert got.entries_by_policy() == recount, where
            assert [(s.kind, s.namespace, s.name, s.valid, s.error, s.selected, s.warnings)
                    for s in got.statuses] == [
                (s.kind, s.namespace, s.name, s.valid, s.error, s.selected, s.warnings)
                for s in want.statuses], where


def test_an_unchanged_policy_is_not_parsed_again(monkeypatch):
    world = World(random.Random(3))
    for i in range(20):
        world.policies[f"np{i}"] = network_policy(world.rnd, f"np{i}", "x")
    compiler = Compiler()
    compile_with(compiler, world)
    parsed = []
    real = compiler_module.parse_network_policy
    monkeypatch.setattr(compiler_module, "parse_network_policy",
                        lambda obj: parsed.append(obj["metadata"]["name"]) or real(obj))
    world.policies["np7"] = network_policy(world.rnd, "np7", "y")  # a new object
    compile_with(compiler, world)
    assert parsed == ["np7"]


def test_with_no_policy_the_world_has_its_identity():
    from cilia.identity import WORLD
    compiled = Compiler().compile([], [], {}, {})
    assert {str(net): ident for net, ident in compiled.cidrs.items()} == {"0.0.0.0/0": WORLD}
