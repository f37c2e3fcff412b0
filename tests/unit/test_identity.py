"""Security identities: which labels count, and the allocator (same labels, same number,
wherever first seen; never one number for two label sets, however allocators race)."""

import os
import threading

import pytest

from cilia.datastore.identities import KIND, LocalIdentityStore, identity_object
from cilia.datastore.local import LocalDatastore
from cilia.identity import (
    CIDR_IDENTITY_BASE,
    HOST,
    MAX_CLUSTER_IDENTITY,
    MIN_CLUSTER_IDENTITY,
    NAMESPACE_NAME_LABEL,
    REMOTE_NODE,
    WORLD,
    IdentityAllocator,
    IdentityExhausted,
    describe,
    security_labels,
    split_labels,
)


class MemoryStore:
    """The store protocol in memory; create is atomic as the real stores' are."""

    def __init__(self):
        self.data = {}
        self.lock = threading.Lock()
        self.creates = 0

    def identities(self):
        with self.lock:
            return dict(self.data)

    def create(self, number, labels):
        with self.lock:
            self.creates += 1
            if number in self.data:
                return False
            self.data[number] = labels
            return True


def labels(app, ns="default", ns_labels=None, **more):
    return security_labels({"app": app, **more}, ns, ns_labels or {})


# ---------------------------------------------------------------- security labels


def test_security_labels_are_pod_and_namespace_labels():
    sl = security_labels({"app": "web"}, "prod", {"team": "a"})
    assert sl == {"pod:app=web", "ns:team=a", f"ns:{NAMESPACE_NAME_LABEL}=prod"}


def test_namespace_name_label_is_always_the_namespace():
    sl = security_labels({}, "prod", {NAMESPACE_NAME_LABEL: "forged"})
    assert sl == {f"ns:{NAMESPACE_NAME_LABEL}=prod"}


def test_pod_and_namespace_labels_never_collide():
    assert security_labels({"team": "a"}, "x", {}) != security_labels({}, "x", {"team": "a"})


def test_split_labels_round_trips():
    pod = {"app": "web", "app.kubernetes.io/name": "shop", "empty": ""}
    ns = {"team": "a", NAMESPACE_NAME_LABEL: "prod"}
    assert split_labels(security_labels(pod, "prod", ns)) == (pod, ns)


def test_describe():
    assert describe(HOST) == "reserved:host"
    assert describe(WORLD) == "reserved:world"
    assert describe(REMOTE_NODE) == "reserved:remote-node"
    assert describe(CIDR_IDENTITY_BASE + 3) == "cidr:3"
    assert describe(300, {"pod:b=1", "pod:a=2"}) == "pod:a=2,pod:b=1"
    assert describe(300) == "300"


def test_reserved_identities_sit_below_the_cluster_range():
    assert max(HOST, WORLD, REMOTE_NODE) < MIN_CLUSTER_IDENTITY
    assert MAX_CLUSTER_IDENTITY < CIDR_IDENTITY_BASE < 1 << 32


# ---------------------------------------------------------------- the allocator


def test_same_labels_same_identity():
    alloc = IdentityAllocator(MemoryStore())
    n = alloc.allocate(labels("web"))
    assert alloc.allocate(labels("web")) == n
    assert alloc.allocate(frozenset(sorted(labels("web"), reverse=True))) == n
    assert MIN_CLUSTER_IDENTITY <= n <= MAX_CLUSTER_IDENTITY
    assert alloc.lookup(labels("web")) == n and alloc.labels_of(n) == labels("web")
    assert alloc.lookup(labels("db")) is None and alloc.labels_of(n + 1) is None


def test_different_labels_different_identities():
    alloc = IdentityAllocator(MemoryStore())
    sets = [labels(f"app{i}", ns=f"ns{i % 7}") for i in range(500)]
    numbers = [alloc.allocate(s) for s in sets]
    assert len(set(numbers)) == len(sets)
    assert all(MIN_CLUSTER_IDENTITY <= n <= MAX_CLUSTER_IDENTITY for n in numbers)


def test_labels_differing_only_in_namespace_get_different_identities():
    alloc = IdentityAllocator(MemoryStore())
    a = alloc.allocate(security_labels({"app": "web"}, "x", {}))
    b = alloc.allocate(security_labels({"app": "web"}, "y", {}))
    c = alloc.allocate(security_labels({"app": "web"}, "x", {"team": "red"}))
    assert len({a, b, c}) == 3


def test_deterministic_across_allocators_on_separate_stores(tmp_path):
    sets = [labels(f"app{i}", ns=f"ns{i % 3}") for i in range(200)]
    one = IdentityAllocator(MemoryStore())
    two = IdentityAllocator(LocalIdentityStore(LocalDatastore(tmp_path)))
    first = [one.allocate(s) for s in sets]
    # The other allocator sees them in another order, and still agrees.
    second = {s: two.allocate(s) for s in reversed(sets)}
    assert first == [second[s] for s in sets]


def test_a_taken_number_moves_on_to_the_next_free_one():
    probe = IdentityAllocator(MemoryStore())
    n = probe.allocate(labels("web"))
    store = MemoryStore()
    store.data[n] = labels("squatter")
    if n + 1 <= MAX_CLUSTER_IDENTITY:
        store.data[n + 1] = labels("another")
    alloc = IdentityAllocator(store)
    m = alloc.allocate(labels("web"))
    assert m not in (n, n + 1) and store.data[m] == labels("web")
    assert alloc.allocate(labels("squatter")) == n


def test_an_identity_already_in_the_store_is_reused():
    store = MemoryStore()
    store.data[4242] = labels("web")
    alloc = IdentityAllocator(store)
    assert alloc.allocate(labels("web")) == 4242
    assert store.creates == 0


def test_a_number_claimed_behind_the_allocators_back():
    """Another allocator took the number after this one refreshed: claim fails, and the
    allocator finds the labels there if they were its own, or moves on."""
    probe = IdentityAllocator(MemoryStore())
    web = probe.allocate(labels("web"))

    class Racing(MemoryStore):
        def create(self, number, lbls):
            if number == web and number not in self.data:
                self.data[number] = self.racer
            return super().create(number, lbls)

    store = Racing()
    store.racer = labels("web")
    assert IdentityAllocator(store).allocate(labels("web")) == web
    store = Racing()
    store.racer = labels("db")
    db = IdentityAllocator(store).allocate(labels("web"))
    assert db != web and store.data == {web: labels("db"), db: labels("web")}


def test_exhaustion_is_an_error_that_says_what_to_do():
    class Full(MemoryStore):
        def identities(self):
            return dict.fromkeys(range(MIN_CLUSTER_IDENTITY, MAX_CLUSTER_IDENTITY + 1),
                                 labels("other"))

    with pytest.raises(IdentityExhausted, match="remove unused label sets"):
        IdentityAllocator(Full()).allocate(labels("web"))


def _race(allocators, sets, rounds=1):
    """Every allocator allocates every label set, all at once; returns what each got."""
    results = [dict() for _ in allocators]
    start = threading.Barrier(len(allocators))
    errors = []

    def work(i, alloc):
        try:
            start.wait()
            order = sets[i:] + sets[:i] if i % 2 else list(reversed(sets))
            for _ in range(rounds):
                for s in order:
                    n = alloc.allocate(s)
                    assert results[i].setdefault(s, n) == n
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i, a)) for i, a in enumerate(allocators)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return results


def _colliding_sets(count, per_number=3):
    """Label sets whose preferred numbers coincide, so allocators fight over them."""
    by_start: dict[int, list] = {}
    i = 0
    while sum(min(len(v), per_number) for v in by_start.values() if len(v) > 1) < count:
        s = labels(f"app{i}")
        by_start.setdefault(IdentityAllocator(MemoryStore()).allocate(s), []).append(s)
        i += 1
    out = []
    for group in by_start.values():
        if len(group) > 1:
            out.extend(group[:per_number])
    return out


def test_racing_allocators_on_one_store_never_collide():
    store = MemoryStore()
    sets = [labels(f"app{i}") for i in range(60)] + _colliding_sets(12)
    results = _race([IdentityAllocator(store) for _ in range(8)], sets)
    assert all(r == results[0] for r in results)
    assert len(set(results[0].values())) == len(sets)
    assert store.data == {n: s for s, n in results[0].items()}


def test_one_allocator_shared_by_threads():
    store = MemoryStore()
    alloc = IdentityAllocator(store)
    sets = [labels(f"app{i}") for i in range(100)]
    results = _race([alloc] * 6, sets)
    assert all(r == results[0] for r in results)
    assert len(set(results[0].values())) == len(sets) == len(store.data)


# ---------------------------------------------------------------- the local store


def test_local_store_persists_identities(tmp_path):
    ds = LocalDatastore(tmp_path)
    n = IdentityAllocator(LocalIdentityStore(ds)).allocate(labels("web"))
    obj = ds.get(KIND, "", str(n))
    assert obj == identity_object(n, labels("web"))
    assert obj["securityLabels"] == sorted(labels("web"))
    # A restarted agent (a new allocator) finds it and claims nothing new.
    again = IdentityAllocator(LocalIdentityStore(LocalDatastore(tmp_path)))
    assert again.allocate(labels("web")) == n
    assert LocalIdentityStore(ds).identities() == {n: labels("web")}


def test_local_store_create_is_exclusive_and_leaves_no_temporary_files(tmp_path):
    store = LocalIdentityStore(LocalDatastore(tmp_path))
    assert store.create(300, labels("web"))
    assert not store.create(300, labels("db"))
    assert store.identities() == {300: labels("web")}
    files = os.listdir(LocalDatastore(tmp_path).path(KIND, "", "300").parent)
    assert files == ["300.yaml"]


def test_local_store_skips_unreadable_objects(tmp_path):
    ds = LocalDatastore(tmp_path)
    store = LocalIdentityStore(ds)
    store.create(300, labels("web"))
    path = ds.path(KIND, "", "not-a-number")
    path.write_text("metadata: {name: not-a-number}\n")
    assert store.identities() == {300: labels("web")}


def test_two_local_stores_on_one_datastore_racing(tmp_path):
    """Two agents (allocators with their own store objects) on one state directory."""
    stores = [LocalIdentityStore(LocalDatastore(tmp_path)) for _ in range(2)]
    allocators = [IdentityAllocator(stores[i % 2]) for i in range(4)]
    sets = [labels(f"app{i}", ns=f"ns{i % 2}") for i in range(25)] + _colliding_sets(6, 2)
    results = _race(allocators, sets)
    assert all(r == results[0] for r in results)
    assert len(set(results[0].values())) == len(sets)
    on_disk = LocalIdentityStore(LocalDatastore(tmp_path)).identities()
    assert on_disk == {n: s for s, n in results[0].items()}
    assert sorted(os.listdir(tmp_path / KIND / "_cluster")) == sorted(
        f"{n}.yaml" for n in on_disk)


def test_local_store_sees_identities_removed_and_claimed_again(tmp_path):
    ds = LocalDatastore(tmp_path)
    store = LocalIdentityStore(ds)
    other = LocalIdentityStore(LocalDatastore(tmp_path))
    assert store.create(300, labels("web")) and store.create(301, labels("db"))
    assert store.identities() == {300: labels("web"), 301: labels("db")}
    assert ds.delete(KIND, "", "300")
    assert store.identities() == {301: labels("db")}
    assert other.create(300, labels("api"))
    assert store.identities() == {300: labels("api"), 301: labels("db")}
