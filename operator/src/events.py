"""Kubernetes Events about the objects the operator looks after (`kubectl describe`)."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping

from cilia.datastore.kubernetes import EVENTS, ApiError, KubeClient

log = logging.getLogger(__name__)

COMPONENT = "cilia-operator"
NORMAL = "Normal"
WARNING = "Warning"


def plain(value):
    """A kopf body (read-only mappings all the way down) as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class EventPoster:
    def __init__(self, client: KubeClient, instance: str, metrics=None):
        self.client = client
        self.instance = instance
        self.metrics = metrics

    def post(self, obj: Mapping, type_: str, reason: str, message: str) -> None:
        """Best effort: an Event that cannot be posted is logged, never raised."""
        meta = obj.get("metadata") or {}
        # Events of cluster-scoped objects live in `default`, as kubectl looks for them.
        namespace = meta.get("namespace") or "default"
        stamp = now()
        event = {
            "metadata": {"generateName": f"{meta.get('name')}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"),
                "name": meta.get("name"), "namespace": meta.get("namespace"),
                "uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_, "reason": reason, "message": message[:1024],
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT, "reportingInstance": self.instance,
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        }
        try:
            self.client.create(EVENTS, event, namespace)
        except ApiError as err:
            log.warning("cannot post event %s for %s %s: %s", reason, obj.get("kind"),
                        meta.get("name"), err)
            return
        if self.metrics is not None:
            self.metrics.events.labels(reason).inc()
