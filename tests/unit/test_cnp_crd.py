"""The ClusterNetworkPolicy CRD in the chart: sigs.k8s.io/network-policy-api's own
(standard channel), verbatim, of the release cilia pins in one place
(cilia.policy.cnp_model.NETWORK_POLICY_API_VERSION), and what the datastores and the
parser read of it agrees with what it serves."""

import os
from pathlib import Path

import pytest
import yaml

from cilia.datastore.kubernetes import AGENT_KINDS, CLUSTER_NETWORK_POLICIES
from cilia.policy import cnp_model

REPO = Path(__file__).resolve().parents[2]
VERSION = cnp_model.NETWORK_POLICY_API_VERSION
CRD = REPO / "charts" / "cilia" / "crds" / \
    f"network-policy-api-{VERSION}-standard-clusternetworkpolicies.yaml"
UPSTREAM_PATH = "config/crd/standard/policy.networking.k8s.io_clusternetworkpolicies.yaml"


def header_and_body() -> tuple[list[str], str]:
    text = CRD.read_text()
    lines = text.splitlines(keepends=True)
    header = []
    while lines and lines[0].startswith("#"):
        header.append(lines.pop(0))
    return header, "".join(lines)


def crd() -> dict:
    return yaml.safe_load(CRD.read_text())


def test_the_file_is_named_after_the_pinned_release_and_is_the_only_one():
    assert CRD.exists(), f"no {CRD.name} in charts/cilia/crds (pin {VERSION})"
    others = [p.name for p in CRD.parent.glob("network-policy-api-*") if p != CRD]
    assert not others, f"CRDs of other releases: {others}"


def test_the_header_names_the_origin_and_the_body_is_one_document():
    header, body = header_and_body()
    said = "".join(header)
    assert f"sigs.k8s.io/network-policy-api {VERSION}" in said
    assert UPSTREAM_PATH in said and "NETWORK_POLICY_API_VERSION" in said
    assert len([d for d in yaml.safe_load_all(body) if d]) == 1


def test_the_bundle_is_the_pinned_release_standard_channel():
    annotations = crd()["metadata"]["annotations"]
    assert annotations["policy.networking.k8s.io/bundle-version"] == VERSION
    assert annotations["policy.networking.k8s.io/channel"] == "standard"


def _module_cache() -> Path:
    root = os.environ.get("GOMODCACHE") or os.path.join(
        os.environ.get("GOPATH") or os.path.expanduser("~/go"), "pkg", "mod")
    return Path(root) / f"sigs.k8s.io/network-policy-api@{VERSION}" / UPSTREAM_PATH


def test_the_body_is_the_upstream_file_byte_for_byte():
    upstream = _module_cache()
    if not upstream.exists():
        pytest.skip(f"{upstream} is not here (the module is fetched by "
                    "packaging/upstream/build.sh)")
    assert header_and_body()[1] == upstream.read_text(), \
        f"{CRD.name} differs from {upstream}: copy it again, below the header"


def test_what_cilia_reads_is_what_the_crd_serves():
    spec = crd()["spec"]
    assert spec["group"] == cnp_model.GROUP == CLUSTER_NETWORK_POLICIES.group
    assert spec["names"]["kind"] == cnp_model.KIND == CLUSTER_NETWORK_POLICIES.kind
    assert spec["names"]["plural"] == CLUSTER_NETWORK_POLICIES.plural
    assert spec["scope"] == "Cluster" and not CLUSTER_NETWORK_POLICIES.namespaced
    served = {f"{spec['group']}/{v['name']}" for v in spec["versions"] if v["served"]}
    assert served == set(cnp_model.API_VERSIONS)
    (storage,) = [v for v in spec["versions"] if v["storage"]]
    # the agent watches the storage version; the parser's first is the same
    assert CLUSTER_NETWORK_POLICIES.version == storage["name"]
    assert cnp_model.API_VERSIONS[0] == CLUSTER_NETWORK_POLICIES.api_version
    assert all("status" in (v.get("subresources") or {}) for v in spec["versions"])
    # optional: a cluster without this CRD has none, and the agent starts all the same
    assert AGENT_KINDS["ClusterNetworkPolicy"] is True


def test_the_crd_schema_enums_are_the_parser_s():
    (v,) = [v for v in crd()["spec"]["versions"] if v["storage"]]
    props = v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert set(props["tier"]["enum"]) == set(cnp_model.TIERS)
    assert props["priority"]["maximum"] == cnp_model.MAX_PRIORITY
    for direction in ("ingress", "egress"):
        rules = props[direction]
        assert rules["maxItems"] == cnp_model.MAX_RULES
        assert set(rules["items"]["properties"]["action"]["enum"]) == set(cnp_model.ACTIONS)
