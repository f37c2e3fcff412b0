import pytest

from cilia.datastore import ObjectError
from cilia.datastore.local import LocalDatastore


def pod(name, ns="default", labels=None):
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {}}}


def test_put_get_list_delete(tmp_path):
    ds = LocalDatastore(tmp_path)
    assert ds.put(pod("a", labels={"app": "a"})) == "created"
    assert ds.put(pod("a", labels={"app": "a"})) == "unchanged"
    assert ds.put(pod("a", labels={"app": "b"})) == "configured"
    ds.put(pod("b", ns="x"))
    ds.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}})
    assert ds.get("Pod", "default", "a")["metadata"]["labels"] == {"app": "b"}
    assert {p["metadata"]["name"] for p in ds.list("Pod")} == {"a", "b"}
    assert [p["metadata"]["name"] for p in ds.list("Pod", "x")] == ["b"]
    assert [n["metadata"]["name"] for n in ds.list("Namespace")] == ["x"]
    assert ds.delete("Pod", "default", "a") and not ds.delete("Pod", "default", "a")


def test_namespace_defaults_to_default(tmp_path):
    ds = LocalDatastore(tmp_path)
    ds.put({"kind": "Pod", "metadata": {"name": "a"}})
    assert ds.get("Pod", "default", "a")["metadata"]["namespace"] == "default"


@pytest.mark.parametrize("obj,match", [
    ({"kind": "Deployment", "metadata": {"name": "a"}}, "unsupported kind"),
    ({"kind": "Pod", "metadata": {}}, "without metadata.name"),
    ({"kind": "Pod", "metadata": {"name": "Bad_Name"}}, "invalid Pod name"),
    ({"kind": "Pod", "metadata": {"name": "a", "labels": {"x": 1}}}, "labels"),
    ("just a string", "must be a mapping"),
])
def test_bad_manifests_are_rejected_with_the_reason(tmp_path, obj, match):
    with pytest.raises(ObjectError, match=match):
        LocalDatastore(tmp_path).put(obj)


def test_revision_by_kind_and_the_objects_by_key(tmp_path):
    ds = LocalDatastore(tmp_path)
    ds.put(pod("a"))
    pods = ds.revision(["Pod"])
    ds.put({"kind": "Namespace", "metadata": {"name": "x"}})
    assert ds.revision(["Pod"]) == pods != ds.revision()  # another kind: not a Pod change
    ds.put(pod("b", ns="x"))
    assert ds.revision(["Pod"]) != pods
    assert set(ds.objects("Pod")) == {("default", "a"), ("x", "b")}
    assert set(ds.objects("Namespace")) == {("", "x")}


def test_wait_changed_is_woken_by_inotify_even_in_directories_made_later(tmp_path):
    """The agent's loop waits here: a write wakes it (watchdog's inotify observer), in a
    kind's or namespace's directory that did not exist when the watch began too."""
    import threading

    ds = LocalDatastore(tmp_path)
    try:
        for obj in (pod("a"), pod("b", ns="new"), {"kind": "Service", "metadata": {
                "name": "s", "namespace": "new2"}}):
            since = ds.revision()
            seen = ds._watcher().events
            writer = threading.Timer(0.2, ds.put, [obj])
            writer.start()
            revision = ds.wait_changed(since, timeout=60)
            writer.join()
            assert revision != since
            # inotify saw the write too (maybe a moment after the mtime showed it)
            ds._watcher().wait(seen, 30)
            assert ds._watcher().events > seen, "inotify missed a write"
        assert ds.wait_changed(ds.revision(), timeout=0.1) == ds.revision()  # no change
    finally:
        ds.close()


def test_reads_are_not_changes_and_another_writer_is_seen(tmp_path):
    """Only writes are watched: listing and loading objects (the agent's own reads at
    every sync) reach no handler at all (inotify is not asked for opens and closes: each
    was an event for watchdog to handle, a quarter of the agent's CPU under churn); a
    file another program writes in place (created, written, closed) wakes the reader
    like the datastore's own renames."""
    import time

    ds = LocalDatastore(tmp_path)
    try:
        ds.put(pod("a"))
        watcher = ds._watcher()
        handled = []
        real = watcher.on_any_event
        watcher.on_any_event = lambda event: handled.append(event.event_type) or real(event)
        time.sleep(0.3)  # the watch set up, the put's events handled
        handled.clear()
        seen = watcher.events
        for _ in range(20):
            ds.objects("Pod")
            ds.list("Pod")
            ds.get("Pod", "default", "a")
            ds.revision()
        time.sleep(0.5)
        assert handled == [] and watcher.events == seen, f"reads were handled: {handled[:5]}"
        since = ds.revision()
        (tmp_path / "Pod" / "default" / "b.yaml").write_text(
            "kind: Pod\nmetadata: {name: b, namespace: default}\n")
        ds._watcher().wait(seen, 30)
        assert ds._watcher().events > seen, "a file written in place was missed"
        assert ds.wait_changed(since, timeout=30) != since
        assert ("default", "b") in ds.objects("Pod")
    finally:
        ds.close()


def test_a_write_is_one_change_not_its_temporary_file_and_lock(tmp_path):
    """A put makes a temporary file, writes and closes it, renames it into place, under
    the writers' lock: one change for readers (each change wakes every agent for a sync
    that reads the changed directory again, 1,000 policies in one). Deletes, files
    written in place and directories still count."""
    import time

    ds = LocalDatastore(tmp_path)
    try:
        watcher = ds._watcher()

        def changes(action, some: bool = True) -> int:
            seen = watcher.events
            action()
            if some:  # its events come in order: the last one seen, all were
                watcher.wait(seen, 30)
            while True:  # and nothing more comes
                now = watcher.events
                time.sleep(0.3)
                if watcher.events == now:
                    return now - seen

        # the watch is up (its thread sets it) once the first is seen: directories made
        assert changes(lambda: ds.put(pod("a"))) >= 1
        assert changes(lambda: ds.put(pod("a", labels={"v": "2"}))) == 1
        assert changes(lambda: ds.put(pod("b"))) == 1
        assert changes(lambda: ds.delete("Pod", "default", "b")) == 1
        assert changes(lambda: (tmp_path / "Pod" / "default" / ".x.swp").write_text("x"),
                       some=False) == 0
        assert changes(lambda: (tmp_path / "Pod" / "default" / "c.yaml").write_text(
            "kind: Pod\nmetadata: {name: c, namespace: default}\n")) >= 1
        assert changes(lambda: ds.put(pod("d", ns="new"))) >= 1  # a new directory
        assert set(ds.objects("Pod")) == {("default", "a"), ("default", "c"), ("new", "d")}
    finally:
        ds.close()


def test_objects_follow_random_writes_read_by_name_or_whole(tmp_path):
    """A changed directory is read again by the names inotify gave (or whole, when it
    has none yet): after every random put, replace and delete, objects() equals what a
    fresh datastore reads from the files."""
    import random
    import time

    ds = LocalDatastore(tmp_path)
    rnd = random.Random(5)
    try:
        ds._watcher()
        for step in range(150):
            name, ns = f"p{rnd.randrange(12)}", rnd.choice(["a", "b"])
            if rnd.random() < 0.3:
                ds.delete("Pod", ns, name)
            else:
                ds.put({**pod(name, ns=ns), "spec": {"n": step}})
            if rnd.random() < 0.3:
                time.sleep(0.02)  # let inotify's events arrive, sometimes
            want = LocalDatastore(tmp_path).objects("Pod")
            deadline = time.monotonic() + 10
            while (got := ds.objects("Pod")) != want and time.monotonic() < deadline:
                time.sleep(0.01)  # an event still on its way: the next read has it
            assert got == want, f"step {step}"
    finally:
        ds.close()


def test_objects_gone_are_forgotten(tmp_path):
    """The parsed copies of deleted objects are dropped when their directory is read
    again, and a namespace's directory removed whole takes its objects with it: pods
    come and go under new names, and an agent must not keep every one it ever read."""
    import shutil

    ds = LocalDatastore(tmp_path)
    for i in range(50):
        ds.put(pod(f"p{i}", ns=f"ns{i % 2}"))
    assert len(ds.objects("Pod")) == 50 and len(ds._cache) == 50
    for i in range(0, 50, 2):
        ds.delete("Pod", "ns0", f"p{i}")
    ds.put(pod("late", ns="ns1"))
    assert set(ds.objects("Pod")) == {("ns1", f"p{i}") for i in range(1, 50, 2)} | {
        ("ns1", "late")}
    assert sorted(ds._cache) == sorted(str(ds.path("Pod", ns, name))
                                       for ns, name in ds.objects("Pod"))
    shutil.rmtree(tmp_path / "Pod" / "ns1")
    assert ds.objects("Pod") == {} and ds._cache == {}
