"""ClusterNetworkPolicy in the local datastore: stored cluster-scoped by `cilia apply`,
checked at apply time as the API server checks it against its CRD, read by the agent as
it reads every policy kind (`objects`), removed by `cilia delete`."""

import copy

import pytest
import yaml

from cilia import cli
from cilia.datastore import ObjectError, check_object
from cilia.datastore.local import LocalDatastore

CNP = {
    "apiVersion": "policy.networking.k8s.io/v1beta1",
    "kind": "ClusterNetworkPolicy",
    "metadata": {"name": "deny-from-y"},
    "spec": {
        "tier": "Admin", "priority": 10,
        "subject": {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "x"}}},
        "ingress": [{"name": "deny-y", "action": "Deny",
                     "from": [{"namespaces": {"matchLabels": {
                         "kubernetes.io/metadata.name": "y"}}}]}],
    },
}


def cnp(**spec) -> dict:
    out = copy.deepcopy(CNP)
    out["spec"].update(spec)
    return out


def test_stored_cluster_scoped_and_read_as_the_agent_reads_policies(tmp_path):
    ds = LocalDatastore(tmp_path)
    assert ds.put(cnp()) == "created"
    assert (tmp_path / "ClusterNetworkPolicy" / "_cluster" / "deny-from-y.yaml").exists()
    assert set(ds.objects("ClusterNetworkPolicy")) == {("", "deny-from-y")}
    assert ds.get("ClusterNetworkPolicy", "", "deny-from-y")["spec"]["priority"] == 10
    assert ds.delete("ClusterNetworkPolicy", "", "deny-from-y")
    assert ds.objects("ClusterNetworkPolicy") == {}


def test_both_served_versions_are_accepted():
    for api in ("policy.networking.k8s.io/v1beta1", "policy.networking.k8s.io/v1alpha2"):
        ref, warnings = check_object({**cnp(), "apiVersion": api})
        assert ref == ("ClusterNetworkPolicy", "", "deny-from-y") and warnings == []


@pytest.mark.parametrize("obj,match", [
    ({**CNP, "apiVersion": "policy.networking.k8s.io/v1"}, "apiVersion"),
    ({**CNP, "apiVersion": None}, "apiVersion"),
    (cnp(tier="Developer"), "spec.tier"),
    (cnp(priority=1001), "spec.priority"),
    (cnp(subject=None), "spec.subject"),
    (cnp(ingress=[{"action": "Allow", "from": [{"namespaces": {}}]}]),
     r"spec.ingress\[0\].action"),
    (cnp(egress=[{"action": "Deny", "to": [{"networks": ["10.0.0.1/8"]}]}]),
     r"spec.egress\[0\].to\[0\].networks\[0\]"),
])
def test_invalid_ones_are_refused_naming_the_field(obj, match):
    with pytest.raises(ObjectError, match=match):
        check_object(obj)


def test_what_cilia_cannot_resolve_is_a_warning_not_a_refusal():
    _, warnings = check_object(cnp(egress=[
        {"action": "Deny", "to": [{"domainNames": ["example.com"]}]}]))
    assert len(warnings) == 1 and "domainNames" in warnings[0]
    assert warnings[0].startswith("ClusterNetworkPolicy deny-from-y: ")


def test_other_kinds_are_checked_as_before():
    pol = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": "p", "namespace": "x"}, "spec": {"podSelector": 7}}
    assert check_object(pol) == (("NetworkPolicy", "x", "p"), [])


def _cli(*argv):
    with pytest.raises(SystemExit) as exit_:
        cli.main(list(argv))
        raise SystemExit(0)
    return exit_.value.code


def test_cilia_apply_and_delete(tmp_path, capsys):
    store = tmp_path / "store"
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump_all([
        CNP, cnp(egress=[{"action": "Pass", "to": [{"domainNames": ["example.com"]}]}])
        | {"metadata": {"name": "pass-dns"}}]))
    assert _cli("apply", "-f", str(good), "--datastore-dir", str(store)) in (0, None)
    out = capsys.readouterr()
    assert "clusternetworkpolicy/deny-from-y created" in out.out
    assert "clusternetworkpolicy/pass-dns created" in out.out
    assert "Warning: ClusterNetworkPolicy pass-dns: spec.egress[0].to[0].domainNames" in out.err
    assert set(LocalDatastore(store).objects("ClusterNetworkPolicy")) == {
        ("", "deny-from-y"), ("", "pass-dns")}

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all([cnp(priority=5) | {"metadata": {"name": "other"}},
                                       cnp(priority=-1)]))
    assert _cli("apply", "-f", str(bad), "--datastore-dir", str(store)) == 1
    assert "spec.priority" in capsys.readouterr().err
    # nothing of a file with an invalid object is stored
    assert LocalDatastore(store).get("ClusterNetworkPolicy", "", "other") is None
    assert LocalDatastore(store).get("ClusterNetworkPolicy", "", "deny-from-y")[
        "spec"]["priority"] == 10

    assert _cli("delete", "-f", str(good), "--datastore-dir", str(store)) in (0, None)
    assert "clusternetworkpolicy/deny-from-y deleted" in capsys.readouterr().out
    assert LocalDatastore(store).objects("ClusterNetworkPolicy") == {}
