"""The chart's two Services modes: kube-proxy stays (the default), or cilia replaces it
(kubeProxyReplacement), with socket LB on the host's cgroup v2 for the node's own
sockets, and the API server reached at k8sServiceHost by every container that cannot
count on the `kubernetes` Service's ClusterIP being translated yet."""

from __future__ import annotations

import pytest
from chartkit import (
    CHART,
    CUSTOM_VALUES,
    KPR_VALUES,
    container,
    containers,
    find,
    helm,
    pod_spec,
    render,
    render_files,
)

CGROUP_MOUNT = "/run/cilia/cgroupv2"
API_ENV = ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")
# (kind, name, container) of every container that talks to the API server from the host
# network or before an agent is up: they get k8sServiceHost. The node clean-up's
# containers talk to no API server (no token) and the agent's init containers neither.
API_CLIENTS = {
    ("DaemonSet", "cilia-agent", "agent"),
    ("Deployment", "cilia-operator", "operator"),
    ("Job", "cilia-wait-agents", "wait"),
    ("Job", "cilia-node-cleanup-wait", "wait"),
}


def agent(objs: list[dict]) -> dict:
    return find(objs, "DaemonSet", "cilia-agent")


def agent_args(objs: list[dict]) -> list[str]:
    return container(agent(objs), "agent")["args"]


def cgroup_volumes(objs: list[dict]) -> list[dict]:
    """Volumes of the agent's pod that hold a cgroup hierarchy, and mounts of it."""
    spec = pod_spec(agent(objs))
    return [v for v in spec["volumes"]
            if "cgroup" in v.get("hostPath", {}).get("path", "") or "cgroup" in v["name"]]


def api_env(objs: list[dict]) -> dict[tuple[str, str, str], dict[str, str]]:
    """(kind, name, container) -> its KUBERNETES_SERVICE_* env, for every container."""
    out = {}
    for obj in objs:
        if obj["kind"] not in ("DaemonSet", "Deployment", "Job"):
            continue
        for c in containers(obj):
            env = {e["name"]: e.get("value") for e in c.get("env", []) if e["name"] in API_ENV}
            out[(obj["kind"], obj["metadata"]["name"], c["name"])] = env
    return out


def test_default_leaves_services_to_kube_proxy():
    objs = render()
    args = agent_args(objs)
    assert "--no-kube-proxy-replacement" in args and "--kube-proxy-replacement" not in args
    assert "--no-socket-lb" in args
    assert not [a for a in args if a.startswith(("--socket-lb", "--kube-proxy-replacement"))]
    assert not cgroup_volumes(objs)
    mounts = {m["mountPath"] for c in containers(agent(objs)) for m in c.get("volumeMounts", [])}
    assert CGROUP_MOUNT not in mounts
    assert not any(api_env(objs).values()), "the ClusterIP, through kube-proxy"


def test_kube_proxy_replacement_needs_the_api_servers_address():
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmError) as err:
            chart.render(values={"kubeProxyReplacement": True}, name="cilia",
                         namespace="kube-system")
    message = str(err.value)
    assert "kubeProxyReplacement=true needs k8sServiceHost" in message
    assert "ClusterIP" in message, "it says why"


def test_kube_proxy_replacement_renders_socket_lb_and_the_api_address():
    objs = render(KPR_VALUES)
    args = agent_args(objs)
    assert "--kube-proxy-replacement" in args and "--no-kube-proxy-replacement" not in args
    assert {"--socket-lb", f"--socket-lb-cgroup={CGROUP_MOUNT}"} <= set(args)
    assert "--no-socket-lb" not in args
    (volume,) = cgroup_volumes(objs)
    assert volume["hostPath"] == {"path": "/sys/fs/cgroup", "type": "Directory"}
    mounts = [(c["name"], m) for c in containers(agent(objs))
              for m in c.get("volumeMounts", []) if m["name"] == volume["name"]]
    assert mounts == [("agent", {"name": volume["name"], "mountPath": CGROUP_MOUNT,
                                 "readOnly": True})], "the agent alone, read-only"
    env = api_env(objs)
    want = {"KUBERNETES_SERVICE_HOST": "192.0.2.10", "KUBERNETES_SERVICE_PORT": "6443"}
    for key in API_CLIENTS:
        assert env[key] == want, key
    assert not [k for k, v in env.items() if v and k not in API_CLIENTS]


def test_values_reach_the_pod():
    """CUSTOM_VALUES: another port and a cgroup v1 host's cgroup v2 (unified)."""
    objs = render(CUSTOM_VALUES)
    (volume,) = cgroup_volumes(objs)
    assert volume["hostPath"]["path"] == "/sys/fs/cgroup/unified"
    assert f"--socket-lb-cgroup={CGROUP_MOUNT}" in agent_args(objs)
    env = api_env(objs)
    # The operator is off the host network here, and still runs before any agent.
    assert env[("Deployment", "cilia-operator", "operator")] == {
        "KUBERNETES_SERVICE_HOST": "192.0.2.10", "KUBERNETES_SERVICE_PORT": "443"}
    assert ("Job", "cilia-node-cleanup-wait", "wait") not in env, "cleanupOnUninstall=false"


def test_kube_proxy_replacement_without_socket_lb():
    objs = render({**KPR_VALUES, "socketLB": {"enabled": False}})
    args = agent_args(objs)
    assert "--kube-proxy-replacement" in args and "--no-socket-lb" in args
    assert not [a for a in args if a.startswith("--socket-lb")]
    assert not cgroup_volumes(objs)
    assert api_env(objs)[("DaemonSet", "cilia-agent", "agent")]


@pytest.mark.parametrize("enabled", [None, True], ids=["null-follows", "true"])
def test_socket_lb_on_with_kube_proxy_replacement(enabled):
    objs = render({**KPR_VALUES, "socketLB": {"enabled": enabled}})
    assert f"--socket-lb-cgroup={CGROUP_MOUNT}" in agent_args(objs)
    assert len(cgroup_volumes(objs)) == 1


def test_socket_lb_without_kube_proxy_replacement():
    """Socket LB may be chosen beside kube-proxy: the node's sockets are cilia's first."""
    objs = render({"socketLB": {"enabled": True}})
    args = agent_args(objs)
    assert "--no-kube-proxy-replacement" in args
    assert {"--socket-lb", f"--socket-lb-cgroup={CGROUP_MOUNT}"} <= set(args)
    assert len(cgroup_volumes(objs)) == 1


def test_api_address_without_kube_proxy_replacement():
    """k8sServiceHost is honoured in either mode (a cluster whose ClusterIP is not to be
    relied on), and changes nothing else."""
    objs = render({"k8sServiceHost": "192.0.2.10", "k8sServicePort": 16443})
    env = api_env(objs)
    for key in API_CLIENTS:
        assert env[key] == {"KUBERNETES_SERVICE_HOST": "192.0.2.10",
                            "KUBERNETES_SERVICE_PORT": "16443"}, key
    assert "--no-kube-proxy-replacement" in agent_args(objs)
    assert not cgroup_volumes(objs)


def test_cleanup_needs_only_bpffs_for_socket_lb():
    """`cilia-agent --cleanup` detaches socket LB's links from their pins under the bpffs
    root (agent/socket_lb.py detach_pinned): the clean-up pod has bpffs and no cgroup."""
    ds = find(render(KPR_VALUES), "DaemonSet", "cilia-node-cleanup")
    clean = container(ds, "clean")
    assert "/sys/fs/bpf" in {m["mountPath"] for m in clean["volumeMounts"]}
    assert {e["name"]: e["value"] for e in clean["env"]}["BPFFS_ROOT"] == "/sys/fs/bpf/cilia"
    assert not [v for v in pod_spec(ds)["volumes"] if "cgroup" in str(v)]


def test_notes_say_which_mode():
    off = render_files()["cilia/templates/NOTES.txt"]
    assert ("kube-proxy does NodePorts from outside and the node's own Services; cilia "
            "translates pods' Services before policy") in off
    assert "do not install kube-proxy" not in off
    on = render_files(KPR_VALUES)["cilia/templates/NOTES.txt"]
    assert "cilia does every Service; do not install kube-proxy" in on
    assert "kube-proxy does NodePorts" not in on
    assert "reach no ClusterIP" not in on
    no_lb = render_files({**KPR_VALUES, "socketLB": {"enabled": False}})
    assert "reach no ClusterIP" in no_lb["cilia/templates/NOTES.txt"]

