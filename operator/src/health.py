"""Liveness, readiness and metrics over HTTP.

- /healthz (liveness): the process's event loop answers, and a leader's kopf thread is
  alive. A standby is alive too: it is waiting, not stuck.
- /readyz (readiness): the API server answered this replica recently, and a leader has
  its controllers running (kopf has listed what it watches). A standby is ready when it
  can reach the API server: it can take over.
- /metrics: Prometheus text format, on its own port (or on the health port if equal).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

log = logging.getLogger(__name__)


@dataclass
class State:
    role: str = "starting"  # starting, standby, leader, stopping
    controllers_ready: threading.Event = field(default_factory=threading.Event)
    kopf_thread: threading.Thread | None = None
    last_contact: Callable[[], float] = lambda: 0.0
    contact_window: float = 30.0

    def live(self) -> tuple[bool, str]:
        if self.role == "leader" and self.kopf_thread is not None \
                and not self.kopf_thread.is_alive():
            return False, "the controllers have stopped"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        age = time.monotonic() - self.last_contact()
        if age > self.contact_window:
            return False, f"no answer from the API server for {age:.0f}s"
        if self.role == "leader" and not self.controllers_ready.is_set():
            return False, "the controllers are starting"
        if self.role not in ("leader", "standby"):
            return False, self.role
        return True, "ok"


class HealthServer:
    def __init__(self, state: State, render_metrics: Callable[[], bytes], *, host: str,
                 health_port: int, metrics_port: int):
        self.state = state
        self.render_metrics = render_metrics
        self.host = host
        self.health_port = health_port
        self.metrics_port = metrics_port
        self._runners: list[web.AppRunner] = []

    def _answer(self, check) -> web.Response:
        ok, why = check()
        body = json.dumps({"ok": ok, "role": self.state.role, "detail": why})
        return web.Response(status=200 if ok else 503, text=body,
                            content_type="application/json")

    async def _healthz(self, _request) -> web.Response:
        return self._answer(self.state.live)

    async def _readyz(self, _request) -> web.Response:
        return self._answer(self.state.ready)

    async def _metrics(self, _request) -> web.Response:
        return web.Response(body=self.render_metrics(),
                            headers={"Content-Type": "text/plain; version=0.0.4"})

    async def start(self) -> None:
        routes = {self.health_port: [web.get("/healthz", self._healthz),
                                     web.get("/readyz", self._readyz)]}
        if self.metrics_port:
            routes.setdefault(self.metrics_port, []).append(web.get("/metrics", self._metrics))
        for port, table in routes.items():
            app = web.Application()
            app.add_routes(table)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, self.host, port).start()
            self._runners.append(runner)
            log.info("serving %s on %s:%d", ", ".join(r.path for r in table
                                                      if hasattr(r, "path")), self.host, port)

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
