"""Bad values are rejected before anything is installed, with a message that names the
value and says what is wrong: values.schema.json checks shapes, ranges and names; the
templates check what a schema cannot (the pool is a real network, the node block fits)."""

from __future__ import annotations

import pytest
from chartkit import CHART, CUSTOM_VALUES, KPR_VALUES, helm, render

BAD = [
    # (values, what the message must contain)
    ({"ipam": {"clusterPoolIPv4CIDR": "banana"}}, "/ipam/clusterPoolIPv4CIDR"),
    ({"ipam": {"clusterPoolIPv4CIDR": "10.244.0.0"}}, "/ipam/clusterPoolIPv4CIDR"),
    ({"ipam": {"clusterPoolIPv4CIDR": "10.256.0.0/16"}},
     'ipam.clusterPoolIPv4CIDR "10.256.0.0/16": 10.256.0.0 is not an IPv4 address'),
    ({"ipam": {"clusterPoolIPv4CIDR": "10.244.0.0/33"}},
     "the prefix length must be 8 to 28, not 33"),
    ({"ipam": {"clusterPoolIPv4CIDR": "10.244.1.0/16"}},
     "has host bits set: did you mean 10.244.0.0/16?"),
    ({"ipam": {"clusterPoolIPv4MaskSize": 8}}, "/ipam/clusterPoolIPv4MaskSize': minimum: got 8"),
    ({"ipam": {"clusterPoolIPv4MaskSize": 31}}, "/ipam/clusterPoolIPv4MaskSize': maximum"),
    ({"ipam": {"clusterPoolIPv4MaskSize": "24"}}, "/ipam/clusterPoolIPv4MaskSize"),
    ({"ipam": {"clusterPoolIPv4CIDR": "10.0.0.0/24", "clusterPoolIPv4MaskSize": 24}},
     "ipam.clusterPoolIPv4MaskSize 24 must be longer than the pool's prefix (/24)"),
    ({"logLevel": "verbose"},
     "/logLevel': value must be one of 'debug', 'info', 'warning', 'error'"),
    ({"datastore": "etcd"}, "/datastore': value must be one of 'kubernetes', 'local'"),
    ({"cni": {"version": "0.2.0"}}, "/cni/version"),
    ({"cni": {"binDir": "opt/cni/bin"}}, "/cni/binDir"),
    ({"cni": {"confFileName": "cilia.conf"}}, "/cni/confFileName"),
    ({"agent": {"routing": "bgp"}}, "/agent/routing': value must be one of 'native', 'vxlan'"),
    ({"agent": {"mtu": 100}}, "/agent/mtu': minimum: got 100, want 576"),
    ({"agent": {"devices": "eth0"}}, "/agent/devices"),
    ({"agent": {"devices": ["eth0; reboot"]}}, "/agent/devices/0"),
    ({"agent": {"metricsPort": 80}}, "/agent/metricsPort': minimum: got 80"),
    ({"agent": {"sysctls": {"net.ipv4.ip_forward": 1}}}, "/agent/sysctls/net.ipv4.ip_forward"),
    ({"agent": {"sysctls": {"x; rm -rf /": "1"}}},
     "/agent/sysctls': additional properties 'x; rm -rf /' not allowed"),
    ({"agent": {"updateStrategy": {"maxUnavailable": 0}}}, "/agent/updateStrategy/maxUnavailable"),
    ({"agent": {"updateStrategy": {"maxSurge": 1}}}, "additional properties 'maxSurge'"),
    ({"agent": {"extraArgs": ["rm"]}}, "/agent/extraArgs/0"),
    ({"agent": {"flowHistory": -1}}, "/agent/flowHistory"),
    ({"agent": {"conntrackMapMax": 100}}, "/agent/conntrackMapMax"),
    ({"agent": {"conntrackEndpointMax": -1}}, "/agent/conntrackEndpointMax"),
    ({"agent": {"flowHistory": "many"}}, "/agent/flowHistory"),
    ({"agent": {"policyNamespaceShare": 0}}, "/agent/policyNamespaceShare"),
    ({"agent": {"policyNamespaceShare": 1.5}}, "/agent/policyNamespaceShare"),
    ({"agent": {"policyNamespaceShare": "half"}}, "/agent/policyNamespaceShare"),
    ({"operator": {"replicas": 0}}, "/operator/replicas': minimum: got 0, want 1"),
    ({"operator": {"replicaz": 2}}, "/operator': additional properties 'replicaz' not allowed"),
    ({"operator": {"leaderElection": {"leaseName": "Not_A_Name"}}},
     "/operator/leaderElection/leaseName"),
    ({"image": {"digest": "sha256:nothex"}}, "/image/digest"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"serviceMonitor": {"interval": "often"}}, "/serviceMonitor/interval"),
    ({"unknownTopLevel": True}, "additional properties 'unknownTopLevel' not allowed"),
    ({"kubeProxyReplacement": "true"}, "/kubeProxyReplacement"),
    ({"kubeProxyReplacement": True},
     "kubeProxyReplacement=true needs k8sServiceHost (and k8sServicePort, default 6443)"),
    ({"k8sServiceHost": 10}, "/k8sServiceHost"),
    ({"k8sServiceHost": "https://192.0.2.10:6443"}, "/k8sServiceHost"),
    ({"k8sServicePort": "6443"}, "/k8sServicePort"),
    ({"k8sServicePort": 0}, "/k8sServicePort': minimum: got 0, want 1"),
    ({"k8sServicePort": 65536}, "/k8sServicePort': maximum"),
    ({"loadBalancer": {"maglevTableSize": -1}}, "/loadBalancer/maglevTableSize': minimum"),
    ({"loadBalancer": {"maglevTableSize": "1021"}}, "/loadBalancer/maglevTableSize"),
    ({"socketLB": {"enabled": "yes"}}, "/socketLB/enabled"),
    ({"socketLB": {"hostCgroupRoot": "sys/fs/cgroup"}}, "/socketLB/hostCgroupRoot"),
    ({"socketLB": {"hostCgroupRoot": 1}}, "/socketLB/hostCgroupRoot"),
    ({"socketLB": {"cgroup": "/sys/fs/cgroup"}},
     "/socketLB': additional properties 'cgroup' not allowed"),
]


@pytest.mark.parametrize("values,message", BAD, ids=[m for _, m in BAD])
def test_bad_values_are_rejected_with_a_clear_message(values, message):
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmError) as err:
            chart.render(values=values, name="cilia", namespace="kube-system")
    assert message in str(err.value)


def test_schema_errors_come_before_rendering():
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmValuesError, match="/logLevel"):
            chart.validate_schema({"logLevel": "loud"})
        chart.validate_schema(CUSTOM_VALUES)
        chart.validate_schema({})


@pytest.mark.parametrize("values", [
    {},
    CUSTOM_VALUES,
    {"ipam": {"clusterPoolIPv4CIDR": "192.168.0.0/16", "clusterPoolIPv4MaskSize": 30}},
    {"ipam": {"clusterPoolIPv4CIDR": "10.0.0.0/8", "clusterPoolIPv4MaskSize": 16}},
    {"agent": {"mtu": 9000, "updateStrategy": {"maxUnavailable": 2}}},
    {"image": {"digest": "sha256:" + "a" * 64}},
    KPR_VALUES,
    {"k8sServiceHost": "api.example.com", "socketLB": {"enabled": True}},
    {"k8sServiceHost": "fd00::1", "k8sServicePort": 443, "socketLB": {"enabled": None}},
], ids=["default", "custom", "small-blocks", "big-pool", "jumbo", "digest", "kpr",
        "api-by-name", "api-ipv6"])
def test_good_values_render(values):
    assert render(values)


def test_digest_pins_the_image():
    objs = render({"image": {"digest": "sha256:" + "b" * 64}})
    images = {c["image"] for o in objs if o["kind"] == "DaemonSet"
              for c in o["spec"]["template"]["spec"]["containers"]}
    assert images == {"cilia@sha256:" + "b" * 64}


def test_schema_is_valid_draft7_and_defaults_pass_it():
    """Checked by a second implementation too (python-jsonschema), so the schema does not
    depend on one validator's leniency (Helm 3.x and 4 use different ones)."""
    import json

    import jsonschema
    import yaml

    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(defaults)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate({**defaults, "logLevel": "loud"})
