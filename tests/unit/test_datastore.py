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
