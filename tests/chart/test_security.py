"""The security-relevant parts of what the chart renders: who is privileged, what is
mounted from the host, and RBAC that grants each component only what it needs."""

from __future__ import annotations

import pytest
from chartkit import (
    CUSTOM_VALUES,
    KPR_VALUES,
    container,
    containers,
    crd_objects,
    find,
    pod_spec,
    render,
)

VALUE_SETS = {"default": {}, "custom": CUSTOM_VALUES, "kpr": KPR_VALUES}
WORKLOADS = ("DaemonSet", "Deployment", "Job", "StatefulSet", "Pod")
READ = {"get", "list", "watch"}
WATCH = {"list", "watch"}  # what an informer or a kopf watch needs

# Everything that may run privileged: two init containers of the agent's pod (bpffs and
# sysctls on the node) and the uninstall hook's clean-up (it undoes what the agent did).
# Nothing else; the agent itself runs with a list of capabilities.
PRIVILEGED = {
    ("DaemonSet", "cilia-agent"): {"mount-bpf-fs", "apply-sysctls"},
    ("DaemonSet", "cilia-node-cleanup"): {"clean"},
}


def workloads(objs):
    return [o for o in objs if o["kind"] in WORKLOADS]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_only_the_agent_is_privileged(name):
    for obj in workloads(render(VALUE_SETS[name])):
        key = (obj["kind"], obj["metadata"]["name"])
        privileged = {c["name"] for c in containers(obj)
                      if (c.get("securityContext") or {}).get("privileged")}
        assert privileged == PRIVILEGED.get(key, set()), key
        for c in containers(obj):
            if key == ("DaemonSet", "cilia-agent") and c["name"] == "agent":
                continue  # capabilities of its own: test_agent_has_only_its_capabilities
            if c["name"] not in privileged:
                sc = c.get("securityContext") or {}
                assert sc.get("allowPrivilegeEscalation") is False, (key, c["name"])
                assert sc.get("capabilities", {}).get("drop") == ["ALL"], (key, c["name"])
                assert "add" not in sc.get("capabilities", {}), (key, c["name"])
                assert sc.get("readOnlyRootFilesystem") is True, (key, c["name"])


def test_agent_has_only_its_capabilities():
    """Root, not privileged, every capability dropped but the five it uses; no privilege
    escalation beyond them is possible without SYS_ADMIN, which the API server refuses
    to combine with allowPrivilegeEscalation: false."""
    agent = container(find(render(), "DaemonSet", "cilia-agent"), "agent")
    sc = agent["securityContext"]
    assert sc["privileged"] is False and sc["runAsUser"] == 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW",
                                                           "SYS_ADMIN", "BPF", "PERFMON"]}
    custom = container(find(render({"agent": {"capabilities": ["NET_ADMIN"]}}),
                            "DaemonSet", "cilia-agent"), "agent")
    assert custom["securityContext"]["capabilities"]["add"] == ["NET_ADMIN"]


def test_operator_is_unprivileged_and_non_root():
    for values in VALUE_SETS.values():
        dep = find(render(values), "Deployment", "cilia-operator")
        spec = pod_spec(dep)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert not spec.get("hostPID") and not spec.get("hostIPC")
        assert all("hostPath" not in v for v in spec.get("volumes", []))
        (op,) = spec["containers"]
        sc = op["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
        assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"]
        assert spec["serviceAccountName"] == "cilia-operator"


def test_operator_replicas_and_leader_election():
    objs = render()
    dep = find(objs, "Deployment", "cilia-operator")
    assert dep["spec"]["replicas"] == 2
    (op,) = pod_spec(dep)["containers"]
    assert "--leader-election-lease=cilia-operator" in op["args"]
    assert "--leader-election-namespace=$(POD_NAMESPACE)" in op["args"]
    assert "--id=$(POD_NAME)" in op["args"], "the Lease names the pod, not the node"
    assert {"--cluster-pool=$(CILIA_CLUSTER_POOL)", "--node-mask=$(CILIA_NODE_MASK)"} <= set(
        op["args"])
    assert op["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert op["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Two replicas on the host network cannot share a node.
    anti = pod_spec(dep)["affinity"]["podAntiAffinity"]
    assert anti["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == \
        "kubernetes.io/hostname"
    assert find(objs, "PodDisruptionBudget", "cilia-operator")["spec"]["maxUnavailable"] == 1
    custom = find(render(CUSTOM_VALUES), "Deployment", "cilia-operator")
    assert custom["spec"]["replicas"] == 3 and not pod_spec(custom)["hostNetwork"]
    assert "preferredDuringSchedulingIgnoredDuringExecution" in \
        pod_spec(custom)["affinity"]["podAntiAffinity"]


def test_agent_pod_shape():
    ds = find(render(), "DaemonSet", "cilia-agent")
    spec = pod_spec(ds)
    assert spec["hostNetwork"] is True
    assert spec["hostPID"] is False, "host PID only when a runtime passes /proc/PID paths"
    assert [c["name"] for c in spec["initContainers"]] == [
        "mount-bpf-fs", "apply-sysctls", "install-cni"]
    assert {"operator": "Exists"} in spec["tolerations"]
    assert spec["priorityClassName"] == "system-node-critical"
    assert pod_spec(find(render(CUSTOM_VALUES), "DaemonSet", "cilia-agent"))["hostPID"] is True


def test_agent_rolling_update_never_doubles_an_agent():
    for values in VALUE_SETS.values():
        ds = find(render(values), "DaemonSet", "cilia-agent")
        strategy = ds["spec"]["updateStrategy"]
        assert strategy["type"] == "RollingUpdate"
        assert strategy["rollingUpdate"]["maxSurge"] == 0
        assert strategy["rollingUpdate"]["maxUnavailable"] in (1, "10%")
        assert ds["spec"]["minReadySeconds"] >= 1


def _mounts(c):
    return {m["mountPath"]: m for m in c.get("volumeMounts", [])}


def _host_paths(spec):
    return {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}


def test_agent_mounts():
    ds = find(render(), "DaemonSet", "cilia-agent")
    spec = pod_spec(ds)
    host = _host_paths(spec)
    agent = _mounts(container(ds, "agent"))
    expect = {
        "/sys/fs/bpf": "/sys/fs/bpf", "/run/cilia": "/run/cilia",
        "/var/lib/cilia": "/var/lib/cilia", "/run/netns": "/run/netns",
        "/run/xtables.lock": "/run/xtables.lock", "/lib/modules": "/lib/modules",
    }
    for path, host_path in expect.items():
        assert host[agent[path]["name"]] == host_path, path
    assert agent["/run/netns"]["mountPropagation"] == "HostToContainer"
    assert agent["/sys/fs/bpf"]["mountPropagation"] == "HostToContainer"
    assert agent["/lib/modules"]["readOnly"] is True
    # The CNI directories are the installer's alone; the agent does not see them.
    assert not {"/host/cni/bin", "/host/cni/net.d"} & agent.keys()
    bpf = _mounts(container(ds, "mount-bpf-fs"))
    assert bpf["/sys/fs/bpf"]["mountPropagation"] == "Bidirectional"
    assert "volumeMounts" not in container(ds, "apply-sysctls"), "sysctls need no mount"
    cni = _mounts(container(ds, "install-cni"))
    assert host[cni["/host/cni/bin"]["name"]] == "/opt/cni/bin"
    assert host[cni["/host/cni/net.d"]["name"]] == "/etc/cni/net.d"
    assert cni["/etc/cilia/config"]["readOnly"] is True
    args = container(ds, "agent")["args"]
    for flag in ("--socket=/run/cilia/cilia.sock", "--bpffs-root=/sys/fs/bpf/cilia",
                 "--state-dir=/var/lib/cilia", "--bpf-dir=/usr/lib/cilia/bpf",
                 "--datastore=$(CILIA_DATASTORE)", "--node-name=$(NODE_NAME)"):
        assert flag in args
    custom = find(render(CUSTOM_VALUES), "DaemonSet", "cilia-agent")
    chost = _host_paths(pod_spec(custom))
    ccni = _mounts(container(custom, "install-cni"))
    assert chost[ccni["/host/cni/bin"]["name"]] == "/home/kubernetes/bin"
    assert chost[ccni["/host/cni/net.d"]["name"]] == "/etc/cni/custom.d"


# Everything a workload may mount from the host, and why; nothing else, and nothing for
# the others. Values: a path the values choose (key into values), else the fixed path.
HOST_PATHS = {
    "cilia-agent": {
        "/sys/fs/bpf": "pinned maps, programs and socket LB links",
        "/run/cilia": "the agent's API socket, for the CNI plugin on the node",
        "/var/lib/cilia": "IPAM leases and endpoints, across restarts",
        "/run/netns": "pods' network namespaces, by the runtime's paths",
        "/run/xtables.lock": "iptables' lock, shared with the node's other users",
        "/lib/modules": "kernel modules iptables may load (read-only)",
        "cni.binDir": "install-cni: the plugin",
        "cni.confDir": "install-cni: the network config",
        # Socket LB only, read-only: cgroup programs attach to a cgroup v2 directory
        # opened read-only; nothing is written there.
        "socketLB.hostCgroupRoot": "socket LB's cgroup programs attach to it",
    },
    "cilia-node-cleanup": {
        "/sys/fs/bpf": "pins to remove, socket LB links to detach",
        "/run": "/run/cilia itself, removed",
        "/var/lib": "/var/lib/cilia itself, removed",
        "/run/xtables.lock": "iptables' lock",
        "/lib/modules": "kernel modules iptables may load (read-only)",
        "cni.binDir": "the plugin, removed",
        "cni.confDir": "the network config, removed",
    },
}
READ_ONLY = {"/lib/modules", "socketLB.hostCgroupRoot"}


def _value(values: dict, dotted: str, default: str) -> str:
    for key in dotted.split("."):
        values = values.get(key, {}) if isinstance(values, dict) else {}
    return values or default


@pytest.mark.parametrize("name", [*VALUE_SETS, "kpr-no-socket-lb"])
def test_host_paths_are_only_the_listed_ones(name):
    values = VALUE_SETS.get(name) or {**KPR_VALUES, "socketLB": {"enabled": False}}
    defaults = {"cni.binDir": "/opt/cni/bin", "cni.confDir": "/etc/cni/net.d",
                "socketLB.hostCgroupRoot": "/sys/fs/cgroup"}
    socket_lb = name in ("custom", "kpr")
    for obj in workloads(render(values)):
        spec = pod_spec(obj)
        host = _host_paths(spec) if spec.get("volumes") else {}
        allowed = {}
        for key in HOST_PATHS.get(obj["metadata"]["name"], {}):
            if key == "socketLB.hostCgroupRoot" and not socket_lb:
                continue
            path = _value(values, key, defaults[key]) if key in defaults else key
            allowed[path] = key
        assert set(host.values()) == set(allowed), (obj["metadata"]["name"], host)
        for c in containers(obj):
            for m in c.get("volumeMounts", []):
                key = allowed.get(host.get(m["name"], ""))
                if key in READ_ONLY:
                    assert m.get("readOnly") is True, (obj["metadata"]["name"], c["name"],
                                                       m["mountPath"])


def test_agent_probes_ask_the_agent():
    ds = find(render(), "DaemonSet", "cilia-agent")
    agent = container(ds, "agent")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert agent[probe]["exec"]["command"] == [
            "cilia", "--socket", "/run/cilia/cilia.sock", "status"], probe
    assert agent["startupProbe"]["failureThreshold"] * agent["startupProbe"][
        "periodSeconds"] >= 120


def test_sysctls_are_set_before_the_agent():
    ds = find(render(CUSTOM_VALUES), "DaemonSet", "cilia-agent")
    script = container(ds, "apply-sysctls")["args"][0]
    assert "set_sysctl 'net.ipv4.ip_forward' '1'" in script
    assert "set_sysctl 'net.ipv4.conf.all.rp_filter' '0'" in script


def test_agent_args_follow_values():
    ds = find(render(CUSTOM_VALUES), "DaemonSet", "cilia-agent")
    args = container(ds, "agent")["args"]
    assert {"--no-masquerade", "--no-prefilter", "--mtu=1450", "--verbose-datapath"} <= set(args)
    default = container(find(render(), "DaemonSet", "cilia-agent"), "agent")["args"]
    # The Services mode is always said (kube-proxy's, no socket LB); nothing else is off.
    assert not [a for a in default if a.startswith(("--no-", "--mtu"))
                and a not in ("--no-kube-proxy-replacement", "--no-socket-lb")]


def agent_args(values: dict) -> list[str]:
    return container(find(render(values), "DaemonSet", "cilia-agent"), "agent")["args"]


def test_a_namespace_share_of_the_policy_map_follows_values():
    assert "--policy-namespace-share=0.5" in agent_args({})
    assert "--policy-namespace-share=0.25" in agent_args({"agent": {"policyNamespaceShare": 0.25}})
    assert "--policy-namespace-share=1" in agent_args({"agent": {"policyNamespaceShare": 1}})


def test_the_flow_history_size_follows_values():
    assert "--flow-history=16384" in agent_args({})
    assert "--flow-history=0" in agent_args({"agent": {"flowHistory": 0}})
    assert "--flow-history=10000000" in agent_args({"agent": {"flowHistory": 10000000}})


def test_conntrack_sizing_and_kernel_drops_follow_values():
    default = agent_args({})
    assert not [a for a in default if a.startswith(("--ct-", "--no-kernel-drop"))]
    args = agent_args({"agent": {"conntrackMapMax": 1048576, "conntrackEndpointMax": 0,
                                 "kernelDropReasons": False}})
    assert {"--ct-map-max=1048576", "--ct-endpoint-max=0",
            "--no-kernel-drop-reasons"} <= set(args)
    assert "--ct-endpoint-max=5000" in agent_args({"agent": {"conntrackEndpointMax": 5000}})


# ---- RBAC ------------------------------------------------------------------------------


def rules(objs, kind, name):
    return find(objs, kind, name)["rules"]


def verbs_on(rule_list, group, resource):
    return {v for r in rule_list if group in r["apiGroups"] and resource in r["resources"]
            for v in r["verbs"]}


def test_no_wildcards_and_no_secrets():
    for obj in render(CUSTOM_VALUES) + render():
        for rule in obj.get("rules", []) if obj["kind"] in ("Role", "ClusterRole") else []:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], (obj["metadata"]["name"], rule)
            assert "secrets" not in rule["resources"], obj["metadata"]["name"]
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])


# Every rule of every Role and ClusterRole the chart renders, exactly, each verb one the
# code calls (issue 13 item 14): a verb, a resource or a role more is a deliberate change
# here, with the call that needs it. The agent reads through informers (LIST, then WATCH:
# cilia/datastore/kubernetes.py AGENT_KINDS), the operator through kopf's watches and its
# sweeps' LISTs (operator/src); a `get` only where the code asks for one object.
RBAC = {
    ("ClusterRole", "cilia-agent"): {
        ("", "pods"): READ,  # get: a pod the watch has not brought yet (datastore.get)
        ("", "namespaces"): WATCH,
        ("", "services"): WATCH,
        ("discovery.k8s.io", "endpointslices"): WATCH,
        ("networking.k8s.io", "networkpolicies"): WATCH,
        ("cilia.io", "cilianetworkpolicies"): WATCH,
        ("cilia.io", "ciliaclusterwidenetworkpolicies"): WATCH,
        ("cilia.io", "ciliaprefilters"): WATCH,
        ("policy.networking.k8s.io", "clusternetworkpolicies"): WATCH,
        # k8s_identities.py: a create, and on 409 a get of the number's winner
        ("cilia.io", "ciliaidentities"): READ | {"create"},
        # put(node_object): a create, or (it exists: the operator made it) get and patch
        ("cilia.io", "cilianodes"): READ | {"create", "patch"},
    },
    ("ClusterRole", "cilia-operator"): {
        ("", "nodes"): READ,  # kopf's watch (ipam), the sweeps' list, get in the GC
        ("", "pods"): WATCH,  # kopf's watch and index (identities), the sweep's list
        ("", "namespaces"): WATCH,
        ("networking.k8s.io", "networkpolicies"): WATCH,  # kopf (policies)
        # allocation (create; on 409 get the winner), refresh and GC by list, delete
        ("cilia.io", "ciliaidentities"): {"get", "list", "create", "delete"},
        ("cilia.io", "cilianodes"): {"get", "list", "create", "patch", "delete"},  # ipam
        ("cilia.io", "cilianetworkpolicies"): WATCH,  # kopf (policies)
        ("cilia.io", "ciliaclusterwidenetworkpolicies"): WATCH,
        ("cilia.io", "cilianetworkpolicies/status"): {"patch"},  # the Valid condition
        ("cilia.io", "ciliaclusterwidenetworkpolicies/status"): {"patch"},
        ("policy.networking.k8s.io", "clusternetworkpolicies"): WATCH,  # kopf (policies)
        # the Accepted condition (operator/src/policies.py)
        ("policy.networking.k8s.io", "clusternetworkpolicies/status"): {"patch"},
        ("", "events"): {"create"},  # events.py; kopf's own posting is off
    },
    ("Role", "cilia-operator-leader-election"): {  # leader.py
        ("coordination.k8s.io", "leases"): {"create"},
        ("coordination.k8s.io", "leases", "cilia-operator"): {"get", "update"},
    },
    ("Role", "cilia-wait-agents"): {("apps", "daemonsets", "cilia-agent"): {"get"}},
    ("Role", "cilia-node-cleanup"): {("apps", "daemonsets", "cilia-node-cleanup"): {"get"}},
}


def granted(obj: dict) -> dict[tuple, set[str]]:
    """(apiGroup, resource[, resourceName]) -> the verbs a Role or ClusterRole grants."""
    out: dict[tuple, set[str]] = {}
    for rule in obj["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for name in rule.get("resourceNames") or [None]:
                    key = (group, resource) if name is None else (group, resource, name)
                    out.setdefault(key, set()).update(rule["verbs"])
    return out


def test_rbac_rules_are_pinned():
    roles = {(o["kind"], o["metadata"]["name"]): o for o in render()
             if o["kind"] in ("Role", "ClusterRole")}
    assert set(roles) == set(RBAC)
    for key, want in RBAC.items():
        got = granted(roles[key])
        assert got == want, (key, {k: sorted(v) for k, v in got.items() if want.get(k) != v},
                             sorted(want.keys() - got.keys()))


def test_agent_rbac_is_least_privilege():
    r = rules(render(), "ClusterRole", "cilia-agent")
    assert not verbs_on(r, "", "nodes"), "the agent reads CiliaNodes, never Nodes"
    assert not verbs_on(r, "cilia.io", "cilianodes/status"), "it writes no status"
    every_verb = {v for rule in r for v in rule["verbs"]}
    assert "delete" not in every_verb and "deletecollection" not in every_verb
    assert not {"create", "update", "patch"} & verbs_on(r, "", "pods")
    assert not verbs_on(r, "", "pods/status")
    assert not verbs_on(r, "coordination.k8s.io", "leases")


def test_operator_rbac():
    objs = render()
    r = rules(objs, "ClusterRole", "cilia-operator")
    for group, resource in (("cilia.io", "cilianetworkpolicies"),
                            ("cilia.io", "ciliaclusterwidenetworkpolicies"),
                            ("policy.networking.k8s.io", "clusternetworkpolicies")):
        assert verbs_on(r, group, resource) == WATCH, "it writes their status only"
        assert verbs_on(r, group, f"{resource}/status") == {"patch"}
    assert not verbs_on(r, "", "pods") - READ, "the operator never writes pods"
    assert not verbs_on(r, "coordination.k8s.io", "leases"), "leases: namespaced Role only"
    lease = rules(objs, "Role", "cilia-operator-leader-election")
    assert all(rule["resources"] == ["leases"] for rule in lease)
    named = [rule for rule in lease if rule.get("resourceNames")]
    assert named and all(rule["resourceNames"] == ["cilia-operator"] for rule in named)
    assert {v for rule in lease if not rule.get("resourceNames") for v in rule["verbs"]} == {
        "create"}
    binding = find(objs, "RoleBinding", "cilia-operator-leader-election")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "cilia-operator",
                                    "namespace": "kube-system"}]


def test_bindings_name_the_rendered_service_accounts():
    objs = render(CUSTOM_VALUES)
    accounts = {o["metadata"]["name"] for o in objs if o["kind"] == "ServiceAccount"}
    for obj in objs:
        if obj["kind"] in ("ClusterRoleBinding", "RoleBinding"):
            for s in obj["subjects"]:
                assert s["name"] in accounts, obj["metadata"]["name"]
    ds = find(objs, "DaemonSet", "cilia-agent")
    assert pod_spec(ds)["serviceAccountName"] == "agent-sa" and "agent-sa" in accounts


# Objects only the agents act on (the prefilter's deny lists): least privilege keeps the
# operator away from them.
NODE_ONLY = {"ciliaprefilters"}
# The statuses the code writes: the Valid condition of cilia's policies and the Accepted
# condition of ClusterNetworkPolicies, the operator's. CiliaNode's status subresource
# exists, but nothing writes it (yet): nobody may.
STATUS_WRITTEN = {"cilianetworkpolicies", "ciliaclusterwidenetworkpolicies",
                  "clusternetworkpolicies"}


def test_rbac_covers_every_crd():
    crds = crd_objects()
    if not crds:
        pytest.skip("no CRDs in charts/cilia/crds yet")
    objs = render()
    agent, op = rules(objs, "ClusterRole", "cilia-agent"), rules(objs, "ClusterRole",
                                                                   "cilia-operator")
    for crd in crds:
        group, plural = crd["spec"]["group"], crd["spec"]["names"]["plural"]
        assert WATCH <= verbs_on(agent, group, plural), f"agent cannot read {plural}"
        if plural in NODE_ONLY:
            assert not verbs_on(op, group, plural), f"operator needs no {plural}"
        else:
            assert "list" in verbs_on(op, group, plural), f"operator cannot read {plural}"
        writers = [who for who, r in (("agent", agent), ("operator", op))
                   if verbs_on(r, group, f"{plural}/status")]
        assert writers == (["operator"] if plural in STATUS_WRITTEN else []), plural
        if plural in STATUS_WRITTEN:
            assert any("status" in (v.get("subresources") or {})
                       for v in crd["spec"]["versions"]), plural


def test_agents_may_write_only_their_own_cilianode():
    """A ValidatingAdmissionPolicy, bound with Deny, matching the agent's service
    account alone, comparing the CiliaNode's name with the node its token is bound to."""
    objs = render()
    vap = find(objs, "ValidatingAdmissionPolicy", "cilia-agent-own-cilianode")
    assert vap["spec"]["failurePolicy"] == "Fail"
    (rule,) = vap["spec"]["matchConstraints"]["resourceRules"]
    assert set(rule["resources"]) == {"cilianodes", "cilianodes/status"}
    assert set(rule["operations"]) == {"CREATE", "UPDATE", "DELETE"}
    (cond,) = vap["spec"]["matchConditions"]
    assert cond["expression"] == (
        'request.userInfo.username == "system:serviceaccount:kube-system:cilia-agent"')
    (check,) = vap["spec"]["validations"]
    assert "authentication.kubernetes.io/node-name" in check["expression"]
    binding = find(objs, "ValidatingAdmissionPolicyBinding", "cilia-agent-own-cilianode")
    assert binding["spec"] == {"policyName": "cilia-agent-own-cilianode",
                               "validationActions": ["Deny"]}
    assert not [o for o in render({"agent": {"ownCiliaNodeOnly": False}})
                if o["kind"].startswith("ValidatingAdmissionPolicy")]


def test_wait_hook_is_scoped():
    """The Job that makes install and upgrade wait for every agent may only read the
    agents' DaemonSet, runs as non-root with nothing more."""
    objs = render()
    hooks = [o for o in objs
             if o["metadata"]["annotations"].get("helm.sh/hook") == "post-install,post-upgrade"]
    assert {o["kind"] for o in hooks} == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap",
                                          "Job"}
    assert rules(objs, "Role", "cilia-wait-agents") == [
        {"apiGroups": ["apps"], "resources": ["daemonsets"], "resourceNames": ["cilia-agent"],
         "verbs": ["get"]}]
    job = find(objs, "Job", "cilia-wait-agents")
    assert pod_spec(job)["securityContext"]["runAsNonRoot"] is True
    assert container(job, "wait")["command"][2:] == ["cilia-agent", "880"]
    assert not [o for o in render({"agent": {"waitForAllOnInstall": False}})
                if o["metadata"]["annotations"].get("helm.sh/hook", "").startswith("post-install")]


def test_uninstall_hook_is_scoped():
    objs = render()
    hooks = [o for o in objs if o["metadata"]["annotations"].get("helm.sh/hook") not in
             (None, "post-install,post-upgrade")]
    assert {o["metadata"]["annotations"]["helm.sh/hook"] for o in hooks} == {"post-delete"}
    assert all("hook-succeeded" in o["metadata"]["annotations"]["helm.sh/hook-delete-policy"]
               for o in hooks)
    role = rules(objs, "Role", "cilia-node-cleanup")
    assert role == [{"apiGroups": ["apps"], "resources": ["daemonsets"],
                     "resourceNames": ["cilia-node-cleanup"], "verbs": ["get"]}]
    ds = find(objs, "DaemonSet", "cilia-node-cleanup")
    assert pod_spec(ds)["automountServiceAccountToken"] is False
    # It must not create what it removes: cilia's own directories come through parents.
    created = {v["hostPath"]["path"] for v in pod_spec(ds)["volumes"]
               if v.get("hostPath", {}).get("type") in ("DirectoryOrCreate", "FileOrCreate")}
    assert not created & {"/run/cilia", "/var/lib/cilia", "/sys/fs/bpf/cilia"}
    env = {e["name"]: e["value"] for e in container(ds, "clean")["env"]}
    assert env["STATE_DIR"] == "/host/var/lib/cilia"
    assert env["SOCKET"] == "/host/run/cilia/cilia.sock"
    assert not [o for o in render(CUSTOM_VALUES)
                if o["metadata"]["annotations"].get("helm.sh/hook") == "post-delete"], (
                    "cleanupOnUninstall=false")
