"""cilia-agent: loads the datapath, restores endpoints, serves the CNI plugin and CLI."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path

from cilia.agent.config import AgentConfig
from cilia.agent.endpoint import EndpointManager
from cilia.agent.monitor import Monitor
from cilia.agent.policy import PolicyEngine
from cilia.agent.server import serve

from cilia.datapath.loader import Datapath
from cilia.datastore.local import LocalDatastore
from cilia.ipam import Ipam

log = logging.getLogger("cilia.agent")


def _sysctl(name: str, value: str) -> None:
    Path("/proc/sys", *name.split(".")).write_text(value)


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        self.started = time.monotonic()
        node_dir = config.state_dir
        node_dir.mkdir(parents=True, exist_ok=True)
        self.datastore = LocalDatastore(config.local_datastore_dir)
        # The node routes for its pods: traffic the datapath hands to the stack.
        _sysctl("net.ipv4.ip_forward", "1")
        self.datapath = Datapath(config.bpffs_root, config.bpf_dir)
        self.ipam = Ipam(config.pod_cidr, node_dir / "ipam.json")
        self.endpoints = EndpointManager(
            config.node_name, self.datapath, self.ipam, node_dir / "endpoints.json",
            config.mtu, self.pod_labels,
        )
        self.endpoints.restore()
        self.policy = PolicyEngine(self)
        self.endpoints.admit = lambda ep: self.policy.sync(extra=ep)
        self.endpoints.changed = self._endpoint_changed
        self.policy.sync()
        self.monitor = Monitor(self)

    def _endpoint_changed(self, ep, added: bool) -> None:
        """Publishes the pod's address in its status (as the kubelet would), so other
        nodes' ipcaches learn it, and recompiles without the endpoint on delete."""
        def status(pod: dict) -> dict:
            if added:
                pod["status"] = {"phase": "Running", "podIP": ep.ip,
                                 "nodeName": self.config.node_name}
            else:
                pod.pop("status", None)
            return pod

        if ep.pod_name:
            self.datastore.update("Pod", ep.pod_namespace or "default", ep.pod_name, status)
        if not added:
            self.policy.sync()

    def pod_labels(self, namespace: str, name: str) -> dict[str, str] | None:
        pod = self.datastore.get("Pod", namespace or "default", name)
        if pod is None:
            return None
        return dict(pod.get("metadata", {}).get("labels") or {})


def main(argv: list[str] | None = None) -> None:
    config = AgentConfig.from_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        agent = Agent(config)
    except Exception as err:
        log.error("cannot start: %s", err)
        sys.exit(1)
    stop = threading.Event()
    threading.Thread(target=agent.policy.run, args=(stop,), name="policy", daemon=True).start()
    threading.Thread(target=agent.monitor.run, args=(stop,), name="monitor", daemon=True).start()
    server = serve(agent, config.socket)
    log.info(
        "node %s ready: pod CIDR %s, maps in %s, API on %s",
        config.node_name, config.pod_cidr, config.bpffs_root, config.socket,
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    # Leave programs attached and maps pinned: pods keep working while the agent is away.
    log.info("stopping; the datapath keeps running")
    server.stop(grace=2).wait()


if __name__ == "__main__":
    main()
