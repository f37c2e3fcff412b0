"""Identity exhaustion stops nothing but the pods it touches (issue 13 item 8, and the
tests' list: "identity exhaustion → unrelated ADDs and policy updates keep working and
status names the culprit").

A lab of its own whose agent allocates from three identities (--identity-max 258), all
taken by three pods. Before, the first allocate that failed aborted the whole policy
sync: no policy update reached any pod of the node, and every later ADD failed."""

from __future__ import annotations

import subprocess
import sys

from labkit import cni, leases, node_links, pod_manifest, probe, sandbox, servers

from cilia.identity import INIT, MIN_CLUSTER_IDENTITY


def _policy(allowed: str) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "server-from", "namespace": "default"},
            "spec": {"podSelector": {"matchLabels": {"app": "server"}},
                     "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {
                         "app": allowed}}}]}]}}


def test_identity_exhaustion_stops_only_the_pods_it_touches():
    from labkit import unique_lab_name

    from cilia.client import AgentClient
    from cilia.lab.lab import Lab

    lab = Lab(unique_lab_name())
    try:
        lab.up(agent_args=["--identity-max", str(MIN_CLUSTER_IDENTITY + 2)])
        server = lab.run_pod(pod_manifest("server", labels={"app": "server"}))
        lab.run_pod(pod_manifest("client", labels={"app": "client"}))
        lab.run_pod(pod_manifest("other", labels={"app": "other"}))
        node = lab.load().nodes[0]
        agent = AgentClient(node.socket)
        lab.datastore.put(_policy("client"))
        agent.wait_policy_synced()
        idents = {e.pod_name: e.identity for e in agent.endpoints()}
        assert sorted(idents.values()) == list(range(MIN_CLUSTER_IDENTITY,
                                                     MIN_CLUSTER_IDENTITY + 3))

        # A new pod with a new label set: its ADD fails, code 11, saying why and what
        # to do, and leaves nothing behind.
        lab.datastore.put(pod_manifest("new", labels={"app": "new"}))
        links, leased = node_links(node), leases(node)
        with sandbox(unique_lab_name()) as netns:
            rc, out = cni(node, "ADD", "c0ffee", netns, pod=("default", "new"))
        assert rc != 0 and out.get("code") == 11, out
        assert "default/new" in out["msg"] and "identity space exhausted" in out["msg"], out
        assert "remove unused label sets" in out["msg"], out
        assert node_links(node) == links and leases(node) == leased

        # A pod elsewhere whose identity cannot be had, and this node's pod relabelled
        # to a label set that needs a new one.
        lab.datastore.put({**pod_manifest("ghost", labels={"app": "ghost"}),
                           "status": {"phase": "Running", "podIP": "10.244.9.5"}})
        lab.datastore.update("Pod", "default", "other", lambda p: {
            **p, "metadata": {**p["metadata"], "labels": {"app": "fresh"}}})
        agent.wait_policy_synced()

        with servers(lab, "default/server", [8080], "server"):
            assert probe(lab, "default/client", server.ip, 8080) == "server:hello"
            assert probe(lab, "default/other", server.ip, 8080, timeout=1) is None
            # A policy update still reaches the node's pods: `other` keeps its identity
            # (its relabel waits), and the policy now admits it instead of the client.
            lab.datastore.put(_policy("other"))
            agent.wait_policy_synced()
            assert probe(lab, "default/other", server.ip, 8080) == "server:hello"
            assert probe(lab, "default/client", server.ip, 8080, timeout=1) is None
            # An ADD with a label set that has its identity works, under the policy.
            twin = lab.run_pod(pod_manifest("client2", labels={"app": "client"}))
            assert probe(lab, "default/client2", server.ip, 8080, timeout=1) is None
        eps = {e.pod_name: e.identity for e in agent.endpoints()}
        assert eps["other"] == idents["other"] and eps["client2"] == idents["client"]
        assert twin.ip

        # The ghost is reserved:init in the ipcache, never the world.
        (ghost,) = [e for e in agent.ipcache() if e.prefix == "10.244.9.5/32"]
        assert (ghost.identity, ghost.name) == (INIT, "reserved:init")

        # Status names each culprit, its reason and what it means.
        st = agent.status()
        named = {(u.namespace, u.name): u for u in st.unidentified_pods}
        assert set(named) == {("default", "other"), ("default", "ghost")}, named
        assert named[("default", "other")].local
        assert named[("default", "other")].identity == idents["other"]
        assert not named[("default", "ghost")].local
        assert "identity space exhausted" in named[("default", "ghost")].reason
        assert "pod default/other has no security identity" in st.message, st.message
        assert "pod default/ghost has no security identity" in st.message, st.message
        out = subprocess.run([sys.executable, "-m", "cilia.cli", "--socket", node.socket,
                              "status"], capture_output=True, text=True, check=True).stdout
        assert "pod default/ghost has NO security identity" in out, out
    finally:
        lab.down()
