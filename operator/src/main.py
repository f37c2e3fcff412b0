"""cilia-operator: identities, pod CIDRs, policy status and garbage collection.

Every replica serves health and metrics and runs for the Lease; the one that holds it
runs the controllers: kopf (watches, indexes, event handlers) in a thread of its own,
and each controller's periodic sweep (repair and garbage collection from fresh API
lists) on the main loop. A leader that loses the Lease stops its controllers and exits
with status 1 (its pod restarts as a standby); a clean shutdown releases the Lease so a
standby takes over at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading

import kopf

from cilia.datastore.kubernetes import KubeClient
from cilia.operator.config import OperatorConfig
from cilia.operator.events import EventPoster
from cilia.operator.health import HealthServer, State
from cilia.operator.identities import IdentityController
from cilia.operator.ipam import IpamController, NodeGcController
from cilia.operator.leader import LeaseElector
from cilia.operator.metrics import Metrics
from cilia.operator.policies import PolicyController

log = logging.getLogger("cilia.operator")

KOPF_STOP_SECONDS = 10


def connection_info(cfg) -> kopf.ConnectionInfo:
    """kopf's credentials from the official client's configuration (one source for both)."""
    header = (cfg.get_api_key_with_prefix("BearerToken")
              or cfg.get_api_key_with_prefix("authorization") or "")
    parts = header.split(" ", 1)
    scheme, token = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0] or None)
    return kopf.ConnectionInfo(
        server=cfg.host, ca_path=cfg.ssl_ca_cert, insecure=not cfg.verify_ssl,
        username=cfg.username or None, password=cfg.password or None,
        scheme=scheme, token=token, certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
    )


def build_controllers(config: OperatorConfig, client: KubeClient, metrics: Metrics) -> list:
    events = EventPoster(client, config.identity, metrics)
    out: list = []
    if config.identities:
        out.append(IdentityController(client, metrics, grace=config.identity_gc_grace))
    if config.ipam:
        out.append(IpamController(client, metrics, events, pool=config.cluster_pool,
                                  mask=config.node_mask))
    if config.policies:
        out.append(PolicyController(client, metrics, events))
    if config.nodegc:
        out.append(NodeGcController(client, metrics, grace=config.identity_gc_grace))
    return out


def kopf_settings() -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = True  # the CRDs are installed before the operator runs
    settings.posting.enabled = False  # Events are posted explicitly (events.py)
    settings.peering.standalone = True  # one active replica is the Lease's job
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 30
    settings.execution.max_workers = 8
    return settings


def make_registry(client: KubeClient, controllers: list) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**_) -> kopf.ConnectionInfo:
        return connection_info(client.configuration)

    for controller in controllers:
        controller.register(registry)
    return registry


class KopfThread:
    """kopf in a thread of its own, on an event loop of its own, until `stop()` or until
    kopf stops by itself (one of its root tasks failed: e.g. its API discovery cut off
    by the network). Either way the thread ends, which `lead` watches for.

    kopf's stop flag is an asyncio.Event of kopf's own loop, set from other threads with
    call_soon_threadsafe, never a threading.Event: kopf waits for a threading.Event in an
    executor thread, and asyncio.run() joins the executor's threads on the way out, so a
    kopf that stopped by itself hung there until told to stop, and the operator led on,
    ready, with no watch and no handler (only the sweeps)."""

    def __init__(self, registry: kopf.OperatorRegistry, ready: threading.Event):
        self.registry = registry
        self.ready = ready
        self.thread = threading.Thread(target=self._run, name="kopf", daemon=True)
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flag: asyncio.Event | None = None

    def start(self) -> KopfThread:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        loop, flag = self._loop, self._flag
        if loop is not None and flag is not None:
            try:
                loop.call_soon_threadsafe(flag.set)
            except RuntimeError:
                pass  # its loop is closed: kopf is done already

    def _run(self) -> None:
        async def operate() -> None:
            self._flag = asyncio.Event()
            self._loop = asyncio.get_running_loop()
            if self._stopping.is_set():  # stop() came before there was a loop to tell
                return
            await kopf.operator(registry=self.registry, settings=kopf_settings(),
                                clusterwide=True, standalone=True, stop_flag=self._flag,
                                ready_flag=self.ready)

        try:
            asyncio.run(operate())
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("the controllers (kopf) stopped")
            return
        if not self._stopping.is_set():
            log.error("the controllers (kopf) stopped by themselves")


async def sweep_loop(controller, interval: float, metrics: Metrics,
                     stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await asyncio.to_thread(controller.sweep)
            metrics.sweeps.labels(controller.name).inc()
        except Exception as err:
            metrics.sweep_errors.labels(controller.name).inc()
            log.warning("%s sweep failed: %s", controller.name, err)
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            pass


async def lead(config: OperatorConfig, client: KubeClient, metrics: Metrics, state: State,
               elector: LeaseElector, stop: asyncio.Event) -> int:
    controllers = build_controllers(config, client, metrics)
    log.info("controllers: %s", ", ".join(c.name for c in controllers) or "none")
    registry = make_registry(client, controllers)
    kopf_thread = KopfThread(registry, state.controllers_ready)
    state.kopf_thread = kopf_thread.thread
    kopf_thread.start()
    keeper = asyncio.create_task(elector.keep(stop), name="lease")
    kopf_done = asyncio.create_task(asyncio.to_thread(kopf_thread.thread.join),
                                    name="kopf")
    stopped = asyncio.create_task(stop.wait(), name="stop")
    sweeps = [asyncio.create_task(sweep_loop(c, config.gc_interval, metrics, stop),
                                  name=f"sweep-{c.name}") for c in controllers]
    done, _ = await asyncio.wait({keeper, kopf_done, stopped},
                                 return_when=asyncio.FIRST_COMPLETED)
    lost = not stop.is_set() and keeper in done
    crashed = not stop.is_set() and kopf_done in done
    log.info("stopping the controllers (%s)", "leadership lost" if lost else
             "they failed" if crashed else "asked to stop")
    # Stop acting first: the controllers, then the sweeps.
    kopf_thread.stop()
    stop.set()
    await asyncio.gather(*sweeps, keeper, stopped, return_exceptions=True)
    try:
        await asyncio.wait_for(asyncio.shield(kopf_done), KOPF_STOP_SECONDS)
    except TimeoutError:
        # Still running (kopf retries a request it was in the middle of): keep the Lease
        # rather than release it under a writer; it expires, the process exits.
        log.warning("the controllers did not stop within %ds: the lease is left to expire",
                    KOPF_STOP_SECONDS)
        elector.leading = False
    if lost:
        log.error("leadership lost: exiting, to start again as a standby")
        return 1
    if crashed:
        return 1
    return 0


async def run(config: OperatorConfig) -> int:
    client = KubeClient(config.kubeconfig, user_agent=f"cilia-operator/{config.identity}")
    metrics = Metrics()
    elector = LeaseElector(
        client, config.lease_namespace, config.lease_name, config.identity,
        lease_duration=config.lease_duration, renew_deadline=config.renew_deadline,
        retry_period=config.retry_period)
    state = State(last_contact=lambda: elector.last_contact,
                  contact_window=max(3 * config.retry_period, config.lease_duration))
    health = HealthServer(state, metrics.render, host=config.bind_address,
                          health_port=config.health_port, metrics_port=config.metrics_port)
    await health.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("cilia-operator %s: API server %s, lease %s/%s", config.identity, client.server,
             config.lease_namespace, config.lease_name)
    try:
        state.role = "standby"
        if not await elector.acquire(stop):
            return 0
        state.role = "leader"
        metrics.leader.set(1)
        metrics.lease_acquired.inc()
        return await lead(config, client, metrics, state, elector, stop)
    finally:
        state.role = "stopping"
        metrics.leader.set(0)
        if elector.leading:
            await asyncio.to_thread(elector.release)
        await health.stop()
        client.close()


def main(argv: list[str] | None = None) -> None:
    config = OperatorConfig.from_args(argv)
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if config.log_level != "debug":
        logging.getLogger("kopf").setLevel(logging.WARNING)
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    sys.exit(asyncio.run(run(config)))


if __name__ == "__main__":
    main()
