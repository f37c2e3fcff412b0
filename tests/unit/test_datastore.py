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
