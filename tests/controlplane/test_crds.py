"""cilia's CRDs (charts/cilia/crds, docs/crds.md): valid CustomResourceDefinitions,
structural schemas that reject malformed objects, status subresources, printer columns;
and served and enforced by the real API server (`cilia cluster up` applied them): every
malformed object refused with the field in the message, and the CEL rules
(x-kubernetes-validations) evaluated, which no offline validator here (nor the emulator)
does."""

import copy
import re

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cp_emulator import CRD_DIR, _formats, load_crds

from cilia.datastore.kubernetes import (
    CILIA_CLUSTER_POLICIES,
    CILIA_NODES,
    CILIA_POLICIES,
    CILIA_PREFILTERS,
    IDENTITIES,
    Invalid,
)

K8S_VERSION = "1.30"
EXPECTED = {
    "ciliaidentities.cilia.io": ("CiliaIdentity", "Cluster", False),
    "cilianodes.cilia.io": ("CiliaNode", "Cluster", True),
    "cilianetworkpolicies.cilia.io": ("CiliaNetworkPolicy", "Namespaced", True),
    "ciliaclusterwidenetworkpolicies.cilia.io": ("CiliaClusterwideNetworkPolicy", "Cluster",
                                                 True),
    "ciliaprefilters.cilia.io": ("CiliaPrefilter", "Cluster", False),
}

# The examples of docs/crds.md, and what each printer column shows for them.
IDENTITY = {"apiVersion": "cilia.io/v1alpha1", "kind": "CiliaIdentity",
            "metadata": {"name": "15763"},
            "securityLabels": ["ns:kubernetes.io/metadata.name=x", "pod:app=a"]}
NODE = {"apiVersion": "cilia.io/v1alpha1", "kind": "CiliaNode", "metadata": {"name": "node1"},
        "spec": {"podCIDRs": ["10.244.1.0/24"],
                 "addresses": [{"type": "InternalIP", "ip": "172.30.0.11"}]},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
POLICY_SPEC = {
    "endpointSelector": {"matchLabels": {"pod": "b"}},
    "ingress": [{
        "fromEndpoints": [{"matchLabels": {"pod": "a"}}],
        "fromCIDR": ["192.0.2.0/24"],
        "fromCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}],
        "fromEntities": ["host", "remote-node", "world", "cluster", "all"],
        "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"},
                               {"port": "81", "endPort": 90, "protocol": "UDP"}]}],
        "icmps": [{"fields": [{"type": 8, "family": "IPv4"}]}],
    }],
    "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"pod": "c"}}]}],
    "egress": [{"toEntities": ["world"]}],
    "egressDeny": [],
}
POLICY = {"apiVersion": "cilia.io/v1alpha1", "kind": "CiliaNetworkPolicy",
          "metadata": {"name": "deny-b-from-c", "namespace": "x"}, "spec": POLICY_SPEC,
          "status": {"conditions": [{"type": "Valid", "status": "True", "reason": "Valid",
                                     "message": "ok",
                                     "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}
COLUMNS = {
    "CiliaIdentity": (IDENTITY, {"Labels": ["ns:kubernetes.io/metadata.name=x", "pod:app=a"]}),
    "CiliaNode": (NODE, {"Pod CIDR": "10.244.1.0/24", "Internal IP": "172.30.0.11"}),
    "CiliaNetworkPolicy": (POLICY, {"Valid": "True"}),
    "CiliaPrefilter": ({"apiVersion": "cilia.io/v1alpha1", "kind": "CiliaPrefilter",
                        "metadata": {"name": "block"}, "spec": {"deny": ["192.0.2.0/24"]}},
                       {"Deny": ["192.0.2.0/24"]}),
}


def crds() -> dict[str, dict]:
    """cilia's own CRDs (group cilia.io), by name."""
    return {c["metadata"]["name"]: c for c in load_crds() if c["spec"]["group"] == "cilia.io"}


# The upstream admin policy API's CRD, vendored verbatim (tests/unit/test_cnp_crd.py
# holds it to the release pinned): checked here as the API server takes it.
CNP_CRD = "clusternetworkpolicies.policy.networking.k8s.io"
CNP = {"apiVersion": "policy.networking.k8s.io/v1beta1", "kind": "ClusterNetworkPolicy",
       "metadata": {"name": "deny-y"},
       "spec": {"tier": "Admin", "priority": 5,
                "subject": {"namespaces": {}},
                "ingress": [{"name": "y", "action": "Deny", "from": [{"namespaces": {
                    "matchLabels": {"kubernetes.io/metadata.name": "y"}}}]}]}}


def schema_of(crd: dict) -> dict:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def validate(crd: dict, obj: dict) -> list[str]:
    v = jsonschema.Draft7Validator(schema_of(crd), format_checker=_formats)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(obj)]


def jsonpath(obj, path: str):
    """The subset of kubectl's JSONPath the printer columns use: .a.b, [0],
    [?(@.k=="v")]."""
    cur = [obj]
    for step in re.findall(r'\.[A-Za-z_]+|\[\d+\]|\[\?\(@\.\w+=="[^"]*"\)\]', path):
        nxt = []
        for c in cur:
            if step.startswith("."):
                if isinstance(c, dict) and step[1:] in c:
                    nxt.append(c[step[1:]])
            elif step.startswith("[?"):
                key, value = re.match(r'\[\?\(@\.(\w+)=="([^"]*)"\)\]', step).groups()
                nxt += [i for i in (c if isinstance(c, list) else []) if i.get(key) == value]
            else:
                i = int(step[1:-1])
                if isinstance(c, list) and i < len(c):
                    nxt.append(c[i])
        cur = nxt
    assert "".join(re.findall(r'\.[A-Za-z_]+|\[\d+\]|\[\?\(@\.\w+=="[^"]*"\)\]', path)) \
        == path, f"unsupported JSONPath {path}"
    return cur[0] if len(cur) == 1 else cur


def structural(schema: dict, where: str = "") -> list[str]:
    """Kubernetes' structural-schema rules that matter here: a type everywhere, no
    additionalProperties beside properties, metadata restricted to name/generateName."""
    problems = []
    if "type" not in schema and not schema.get("x-kubernetes-int-or-string") \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        problems.append(f"{where or '<root>'}: no type")
    if "properties" in schema and "additionalProperties" in schema:
        problems.append(f"{where}: properties and additionalProperties")
    for key, sub in (schema.get("properties") or {}).items():
        if where == "" and key == "metadata":
            extra = set(sub.get("properties") or {}) - {"name", "generateName"}
            if extra:
                problems.append(f"metadata: only name and generateName may be restricted, "
                                f"not {extra}")
        problems += structural(sub, f"{where}.{key}" if where else key)
    if isinstance(schema.get("items"), dict):
        problems += structural(schema["items"], f"{where}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        problems += structural(schema["additionalProperties"], f"{where}{{}}")
    return problems


def test_the_crds_are_valid_customresourcedefinitions():
    found = crds()
    assert set(found) == set(EXPECTED), f"files in {CRD_DIR}"
    for name, crd in found.items():
        kind, scope, status = EXPECTED[name]
        kubernetes_validate.validate(crd, K8S_VERSION, strict=True)
        spec = crd["spec"]
        assert spec["group"] == "cilia.io" and spec["scope"] == scope
        assert spec["names"]["kind"] == kind
        assert name == f"{spec['names']['plural']}.cilia.io"
        [version] = spec["versions"]
        assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
        assert ("status" in (version.get("subresources") or {})) == status
        assert structural(schema_of(crd)) == [], name
        columns = {c["name"] for c in version["additionalPrinterColumns"]}
        assert "Age" in columns


def test_the_upstream_cnp_crd_is_a_valid_customresourcedefinition():
    (crd,) = [c for c in load_crds() if c["metadata"]["name"] == CNP_CRD]
    kubernetes_validate.validate(crd, K8S_VERSION, strict=True)
    assert crd["spec"]["scope"] == "Cluster"
    for version in crd["spec"]["versions"]:
        assert structural(version["schema"]["openAPIV3Schema"]) == [], version["name"]
        assert validate({"spec": {"versions": [version]}}, CNP) == [], version["name"]


def test_printer_columns_show_what_docs_crds_md_promises():
    by_kind = {c["spec"]["names"]["kind"]: c for c in load_crds()}
    for kind, (sample, shown) in COLUMNS.items():
        cols = by_kind[kind]["spec"]["versions"][0]["additionalPrinterColumns"]
        for col in cols:
            if col["name"] in shown:
                assert jsonpath(sample, col["jsonPath"]) == shown[col["name"]], col
        assert {c["name"] for c in cols} >= set(shown)


def test_both_policy_kinds_share_one_schema():
    found = crds()
    a = schema_of(found["cilianetworkpolicies.cilia.io"])
    b = schema_of(found["ciliaclusterwidenetworkpolicies.cilia.io"])
    assert a["properties"] == b["properties"]


def _with(obj: dict, path: str, value) -> dict:
    out = copy.deepcopy(obj)
    cur = out
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", path)
    for part in parts[:-1]:
        cur = cur[int(part[1:-1])] if part.startswith("[") else cur[part]
    last = parts[-1]
    if value is KeyError:
        del cur[last]
    elif last.startswith("["):
        cur[int(last[1:-1])] = value
    else:
        cur[last] = value
    return out


MALFORMED = [
    ("CiliaIdentity", "metadata.name", "12"),
    ("CiliaIdentity", "metadata.name", "abc"),
    ("CiliaIdentity", "securityLabels", KeyError),
    ("CiliaIdentity", "securityLabels[0]", "app=a"),
    ("CiliaNode", "spec.podCIDRs[0]", "10.244.1.0"),
    ("CiliaNode", "spec.podCIDRs", ["10.0.0.0/24", "10.0.1.0/24", "10.0.2.0/24"]),
    ("CiliaNode", "spec.addresses[0].type", "Anywhere"),
    ("CiliaNode", "spec.addresses[0].ip", KeyError),
    ("CiliaNode", "status.conditions[0].status", "Maybe"),
    ("CiliaNetworkPolicy", "spec.endpointSelector", KeyError),
    ("CiliaNetworkPolicy", "spec.ingress[0].fromEntities[0]", "moon"),
    ("CiliaNetworkPolicy", "spec.ingress[0].fromCIDR[0]", "192.0.2.0"),
    ("CiliaNetworkPolicy", "spec.ingress[0].fromCIDRSet[0].cidr", KeyError),
    ("CiliaNetworkPolicy", "spec.ingress[0].toPorts[0].ports[0].protocol", "ICMP"),
    ("CiliaNetworkPolicy", "spec.ingress[0].toPorts[0].ports[0].port", 80),
    ("CiliaNetworkPolicy", "spec.ingress[0].toPorts[0].ports[1].endPort", 70000),
    ("CiliaNetworkPolicy", "spec.ingress[0].icmps[0].fields[0].type", 256),
    ("CiliaNetworkPolicy", "spec.ingress[0].icmps[0].fields[0].family", "IPX"),
    ("CiliaNetworkPolicy", "spec.ingressDeny[0].fromEndpoints[0].matchExpressions",
     [{"key": "a", "operator": "Near"}]),
    ("CiliaNetworkPolicy", "spec.egress", {"toEntities": ["world"]}),
    ("CiliaPrefilter", "spec.deny[0]", "192.0.2.1"),
    ("CiliaPrefilter", "spec.deny", KeyError),
]


@pytest.mark.parametrize("kind,path,value", MALFORMED)
def test_schemas_reject_malformed_objects(kind, path, value):
    by_kind = {c["spec"]["names"]["kind"]: c for c in load_crds()}
    sample = COLUMNS[kind][0]
    assert validate(by_kind[kind], sample) == []
    assert validate(by_kind[kind], _with(sample, path, value)), f"{path}={value!r} accepted"


def test_loaded_into_the_api_server_they_are_served_and_enforced(cluster):
    # Discovery: what kubectl and kopf read.
    found = cluster.client.request("GET", "/apis/cilia.io/v1alpha1")
    served = {r["name"]: r for r in found["resources"]}
    for name, (kind, scope, status) in EXPECTED.items():
        plural = name.split(".")[0]
        assert served[plural]["kind"] == kind
        assert served[plural]["namespaced"] == (scope == "Namespaced")
        assert (f"{plural}/status" in served) == status
    assert "cnp" in served["cilianetworkpolicies"]["shortNames"]

    cluster.namespace("x")
    policy = in_namespace(POLICY, cluster.ns("x"))
    cluster.client.create(IDENTITIES, IDENTITY)
    node = cluster.client.create(CILIA_NODES, NODE)
    assert "status" not in node, "status is the status subresource's"
    cluster.client.create(CILIA_POLICIES, {k: v for k, v in policy.items() if k != "status"})
    cluster.client.create(CILIA_CLUSTER_POLICIES, {
        "metadata": {"name": "cw"}, "spec": {"endpointSelector": {}, "egress": [{}]}})
    with pytest.raises(Invalid, match=r"spec.ingress\[0\].fromEntities\[0\]"):
        cluster.client.create(CILIA_POLICIES, _with(policy, "spec.ingress[0].fromEntities[0]",
                                                    "moon") | {"status": {}})
    with pytest.raises(Invalid, match="metadata.name"):
        cluster.client.create(IDENTITIES, _with(IDENTITY, "metadata.name", "12"))
    with pytest.raises(Invalid, match=r"spec.podCIDRs\[0\]"):
        cluster.client.patch(CILIA_NODES, None, "node1", {"spec": {"podCIDRs": ["nope"]}})
    patched = cluster.client.patch(CILIA_NODES, None, "node1", {"status": NODE["status"]},
                                   "status")
    assert patched["status"] == NODE["status"]


def in_namespace(obj: dict, namespace: str) -> dict:
    return {**obj, "metadata": {**obj["metadata"], "namespace": namespace}}


RESOURCES = {"CiliaIdentity": IDENTITIES, "CiliaNode": CILIA_NODES,
             "CiliaNetworkPolicy": CILIA_POLICIES, "CiliaPrefilter": CILIA_PREFILTERS}


def test_the_api_server_refuses_each_malformed_object_naming_the_field(cluster):
    """Every case the offline schema check refuses, refused by the real API server (422,
    the field's path in the message); status through the status subresource."""
    cluster.namespace("x")
    accepted = []
    for kind, path, value in MALFORMED:
        res = RESOURCES[kind]
        sample = COLUMNS[kind][0]
        if res.namespaced:
            sample = in_namespace(sample, cluster.ns("x"))
        bad = _with(sample, path, value)
        try:
            if path.startswith("status."):
                name = sample["metadata"]["name"]
                if cluster.client.get(res, cluster.ns("x") if res.namespaced else None,
                                      name) is None:
                    cluster.client.create(res, {k: v for k, v in sample.items()
                                                if k != "status"})
                cluster.client.patch(res, sample["metadata"].get("namespace"), name,
                                     {"status": bad["status"]}, "status")
            else:
                cluster.client.create(res, {k: v for k, v in bad.items() if k != "status"})
        except Invalid as err:
            assert path in err.message, (kind, path, value, err.message)
            continue
        accepted.append((kind, path, value))
        if not path.startswith("status."):  # (so that the next case is not a 409)
            cluster.client.delete(res, bad["metadata"].get("namespace"),
                                  bad["metadata"]["name"])
    assert not accepted, f"the API server accepted malformed objects: {accepted}"


# What only the CEL rules (x-kubernetes-validations) refuse: the schema alone accepts it.
CEL = [
    ("CiliaIdentity", "metadata.name", "100", "the name is the identity: a number from 256"),
    ("CiliaIdentity", "metadata.name", "65536", "the name is the identity: a number from 256"),
    ("CiliaNetworkPolicy", "spec.ingress[0].toPorts[0].ports[0].port", "0",
     "port must be between 1 and 65535"),
    ("CiliaNetworkPolicy", "spec.ingress[0].toPorts[0].ports[0].port", "70000",
     "port must be between 1 and 65535"),
    ("CiliaNetworkPolicy", "spec.ingress[0].toPorts[0].ports[1].endPort", 80,
     "endPort needs a numeric port not above it"),
    ("CiliaNetworkPolicy", "spec.ingress[0].toPorts[0].ports[1].port", "dns",
     "endPort needs a numeric port not above it"),
]


def test_the_api_server_evaluates_the_cel_rules(cluster):
    by_kind = {c["spec"]["names"]["kind"]: c for c in load_crds()}
    cluster.namespace("x")
    for kind, path, value, message in CEL:
        res = RESOURCES[kind]
        sample = COLUMNS[kind][0]
        if res.namespaced:
            sample = in_namespace(sample, cluster.ns("x"))
        bad = _with(sample, path, value)
        assert validate(by_kind[kind], bad) == [], "the schema alone refuses it"
        with pytest.raises(Invalid, match=message):
            cluster.client.create(res, {k: v for k, v in bad.items() if k != "status"})
    # A cluster-wide policy has the same rules (one schema for both kinds).
    ports = [{"port": "90", "endPort": 80, "protocol": "UDP"}]
    with pytest.raises(Invalid, match="endPort needs a numeric port not above it"):
        cluster.client.create(CILIA_CLUSTER_POLICIES, {"metadata": {"name": "ccnp"}, "spec": {
            "endpointSelector": {}, "egress": [{"toPorts": [{"ports": ports}]}]}})
    # A transition rule: an identity's labels never change (a new set is a new number).
    ident = cluster.client.create(IDENTITIES, IDENTITY)
    with pytest.raises(Invalid, match="securityLabels are immutable"):
        cluster.client.patch(IDENTITIES, None, ident["metadata"]["name"],
                             {"securityLabels": ["ns:kubernetes.io/metadata.name=y"]})


def test_the_api_server_serves_and_checks_cluster_network_policies(cluster):
    """The vendored CRD as `cilia cluster up` applies it: both versions served, cluster-
    scoped, with a status subresource; its schema and CEL rules refuse what the API
    refuses (naming the field), and an object written at one version reads at the
    other."""
    from cilia.datastore.kubernetes import CLUSTER_NETWORK_POLICIES as CNPS
    from cilia.datastore.kubernetes import Resource

    for version in ("v1beta1", "v1alpha2"):
        found = cluster.client.request("GET", f"/apis/policy.networking.k8s.io/{version}")
        served = {r["name"]: r for r in found["resources"]}
        assert served["clusternetworkpolicies"]["kind"] == "ClusterNetworkPolicy"
        assert not served["clusternetworkpolicies"]["namespaced"]
        assert "clusternetworkpolicies/status" in served
    name = f"{cluster.ns('x')}-deny-y"  # (cluster-scoped: made unique per test run)
    created = cluster.client.create(CNPS, {**CNP, "metadata": {"name": name}})
    try:
        assert created["spec"]["priority"] == 5 and "status" not in created
        alpha = Resource("policy.networking.k8s.io", "v1alpha2", "clusternetworkpolicies",
                         "ClusterNetworkPolicy", False)
        assert cluster.client.get(alpha, None, name)["spec"] == created["spec"]
        status = {"conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                                  "message": "ok", "observedGeneration": 1,
                                  "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        patched = cluster.client.patch(CNPS, None, name, {"status": status}, "status")
        assert patched["status"] == status
        for path, value, field in (("spec.tier", "Developer", "spec.tier"),
                                   ("spec.priority", 1001, "spec.priority"),
                                   ("spec.ingress[0].action", "Allow", "action")):
            bad = _with({**CNP, "metadata": {"name": f"{name}-bad"}}, path, value)
            with pytest.raises(Invalid, match=re.escape(field)):
                cluster.client.create(CNPS, bad)
        # Experimental-channel peers are not in the standard CRD: never stored as such.
        experimental = _with({**CNP, "metadata": {"name": f"{name}-exp"}}, "spec.ingress",
                             KeyError)
        experimental["spec"]["egress"] = [{"action": "Deny", "to": [
            {"domainNames": ["example.com"]}, {"nodes": {"matchLabels": {"a": "b"}}}]}]
        try:
            kept = cluster.client.create(CNPS, experimental)["spec"]["egress"][0]["to"]
            assert all(not peer for peer in kept), kept
        except Invalid as err:
            assert "spec.egress[0].to[0]" in err.message, err.message
        # The example of docs/crds.md is what the API server takes.
        doc = docs_example("ClusterNetworkPolicy")
        created = cluster.client.create(CNPS, {k: v for k, v in doc.items() if k != "status"})
        assert created["spec"] == doc["spec"]
    finally:
        for suffix in ("", "-exp"):
            cluster.client.delete(CNPS, None, name + suffix)


def docs_example(kind: str) -> dict:
    """The YAML example in the section of docs/crds.md about `kind`, status made
    concrete."""
    text = (CRD_DIR.parents[2] / "docs" / "crds.md").read_text()
    section = text.split(f"## {kind}", 1)[1]
    block = section.split("```yaml", 1)[1].split("```", 1)[0]
    block = block.replace('"True"|"False"', '"True"').replace("Accepted|Invalid", "Accepted")
    return yaml.safe_load(block.replace("lastTransitionTime: ...", "lastTransitionTime: x"))
