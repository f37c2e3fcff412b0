"""The `kubernetes` datastore: cluster state from the API server, read through watches.

Three layers, each small:

- `KubeClient`: JSON over HTTP to the API server, authenticated as the official client
  authenticates (a kubeconfig, or the pod's service account in a cluster). Errors are
  `ApiError`s with the HTTP status (`NotFound`, `Conflict`, `Gone`, ...; status 0 when
  the server could not be reached).
- `Informer`: one resource kept in memory by LIST, then WATCH from the list's
  resourceVersion. A broken stream resumes from the last resourceVersion it delivered,
  so nothing is lost and nothing is applied twice; when that version has expired (410
  Gone) it lists again and *replaces* its cache, so objects deleted meanwhile go away
  and none comes back in an older state.
- `KubernetesDatastore`: the same read interface as `LocalDatastore` (`list`, `get`,
  `revision`, `update`, `put`, `delete`) over informers of the kinds the agent reads:
  every pod (every pod's `status.podIP` feeds the ipcache; this node's pods are its
  endpoints), namespaces, NetworkPolicies, cilia's policies, identities and nodes.
  It blocks until every informer has listed once, so the agent never compiles policy
  from a half-filled cache (a restarted agent would otherwise drop every policy and open
  its pods until the watches caught up).

Why a pod whose identity is not known yet is isolated, never open: the agent's policy
engine allocates a pod's identity itself, synchronously, through the same
`IdentityAllocator` as the operator (`KubernetesIdentityStore`: a create that fails with
409 when another allocator won), before the pod's endpoints map entry exists. If the
labels or the identity cannot be had (API unreachable), the CNI ADD fails and is retried
by the runtime: the pod gets no reachable endpoint at all, and no pod start waits on the
operator. A pod the agent cannot see yet in its cache is read from the API directly
(`get`). A remote pod that is not in the cache yet has no ipcache entry, so its traffic
counts as `world`, which only policies that allow the world admit.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import quote

from cilia.datastore import ChangeFeed

log = logging.getLogger(__name__)

CILIA_GROUP = "cilia.io"
CILIA_VERSION = "v1alpha1"


# ---- resources ---------------------------------------------------------------------


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
        out = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            out += f"/namespaces/{quote(namespace, safe='')}"
        out += f"/{self.plural}"
        if name is not None:
            out += f"/{quote(name, safe='')}"
            if subresource:
                out += f"/{subresource}"
        return out


def _cilia(plural: str, kind: str, namespaced: bool = False) -> Resource:
    return Resource(CILIA_GROUP, CILIA_VERSION, plural, kind, namespaced)


PODS = Resource("", "v1", "pods", "Pod", True)
NAMESPACES = Resource("", "v1", "namespaces", "Namespace", False)
NODES = Resource("", "v1", "nodes", "Node", False)
EVENTS = Resource("", "v1", "events", "Event", True)
NETWORK_POLICIES = Resource("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True)
SERVICES = Resource("", "v1", "services", "Service", True)
ENDPOINT_SLICES = Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice",
                           True)
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease", True)
IDENTITIES = _cilia("ciliaidentities", "CiliaIdentity")
CILIA_NODES = _cilia("cilianodes", "CiliaNode")
CILIA_POLICIES = _cilia("cilianetworkpolicies", "CiliaNetworkPolicy", True)
CILIA_CLUSTER_POLICIES = _cilia("ciliaclusterwidenetworkpolicies",
                                "CiliaClusterwideNetworkPolicy")
CILIA_PREFILTERS = _cilia("ciliaprefilters", "CiliaPrefilter")
# sig-network's admin policy API (the CRD of sigs.k8s.io/network-policy-api in the chart;
# cilia/policy/cnp_model.py): read at its storage version, v1beta1.
CLUSTER_NETWORK_POLICIES = Resource("policy.networking.k8s.io", "v1beta1",
                                    "clusternetworkpolicies", "ClusterNetworkPolicy", False)

RESOURCES = {r.kind: r for r in (
    PODS, NAMESPACES, NODES, EVENTS, NETWORK_POLICIES, LEASES, IDENTITIES, CILIA_NODES,
    CILIA_POLICIES, CILIA_CLUSTER_POLICIES, CILIA_PREFILTERS, SERVICES, ENDPOINT_SLICES,
    CLUSTER_NETWORK_POLICIES,
)}


# ---- errors ------------------------------------------------------------------------


class ApiError(Exception):
    """An answer of the API server that is not a success; status 0: no answer at all."""

    def __init__(self, status: int, reason: str = "", message: str = ""):
        super().__init__(f"{status} {reason}: {message}" if status else message)
        self.status = status
        self.reason = reason
        self.message = message


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    """409: AlreadyExists on create, Conflict on a stale resourceVersion."""


class Gone(ApiError):
    """410: the resourceVersion a watch asked for has expired."""


class Invalid(ApiError):
    pass


_ERRORS = {404: NotFound, 409: Conflict, 410: Gone, 422: Invalid}


def _error(status: int, body: bytes | str | dict | None) -> ApiError:
    reason, message = "", ""
    data = body
    if isinstance(body, bytes | str):
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            data = {"message": body.decode(errors="replace") if isinstance(body, bytes)
                    else body}
    if isinstance(data, dict):
        reason, message = data.get("reason") or "", data.get("message") or ""
    return _ERRORS.get(status, ApiError)(status, reason, message)


# ---- the client --------------------------------------------------------------------


def load_configuration(kubeconfig: str | None = None, context: str | None = None):
    """The official client's configuration: from `kubeconfig` if given; else in-cluster
    (the pod's service account), else $KUBECONFIG or ~/.kube/config."""
    import kubernetes.client
    import kubernetes.config

    cfg = kubernetes.client.Configuration()
    if kubeconfig:
        kubernetes.config.load_kube_config(config_file=str(kubeconfig), context=context,
                                           client_configuration=cfg)
        return cfg
    try:
        kubernetes.config.load_incluster_config(client_configuration=cfg)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(context=context, client_configuration=cfg)
    return cfg


class KubeClient:
    """Plain JSON requests to the API server (dicts in, dicts out), on the official
    client's authentication and connection pool. Safe to share between threads."""

    def __init__(self, kubeconfig: str | None = None, *, user_agent: str = "cilia",
                 configuration=None, timeout: float = 30.0):
        import kubernetes.client

        self.configuration = configuration or load_configuration(kubeconfig)
        self.api = kubernetes.client.ApiClient(self.configuration)
        self.api.user_agent = user_agent
        self.timeout = timeout

    @property
    def server(self) -> str:
        return self.configuration.host

    def close(self) -> None:
        self.api.close()

    def request(self, method: str, path: str, *, query: dict | None = None,
                body: object = None, content_type: str | None = None,
                timeout: float | tuple | None = None, stream: bool = False):
        """The decoded JSON answer (or, with `stream`, the open urllib3 response)."""
        import urllib3

        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        params = [(k, str(v)) for k, v in (query or {}).items() if v is not None]
        method, url, headers, body, _ = self.api.param_serialize(
            method, path, query_params=params or None, header_params=headers, body=body,
            auth_settings=["BearerToken"],
        )
        try:
            resp = self.api.rest_client.request(
                method, url, headers=headers, body=body,
                _request_timeout=self.timeout if timeout is None else timeout,
            ).response
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise ApiError(0, "Unreachable", f"{method} {path}: {err}") from err
        if resp.status >= 400:
            try:
                raise _error(resp.status, resp.data)
            finally:
                resp.release_conn()
        if stream:
            return resp
        try:
            data = resp.data
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise ApiError(0, "Unreachable", f"{method} {path}: {err}") from err
        finally:
            resp.release_conn()
        return json.loads(data) if data else {}

    # ---- verbs -----------------------------------------------------------------------

    def get(self, res: Resource, namespace: str | None, name: str,
            subresource: str | None = None) -> dict | None:
        try:
            return self.request("GET", res.path(namespace, name, subresource))
        except NotFound:
            return None

    def list(self, res: Resource, namespace: str | None = None, *,
             label_selector: str | None = None, field_selector: str | None = None) -> dict:
        return self.request("GET", res.path(namespace), query={
            "labelSelector": label_selector, "fieldSelector": field_selector})

    def items(self, res: Resource, namespace: str | None = None, **selectors) -> list[dict]:
        return self.list(res, namespace, **selectors).get("items") or []

    def create(self, res: Resource, obj: dict, namespace: str | None = None) -> dict:
        obj = {"apiVersion": res.api_version, "kind": res.kind, **obj}
        ns = namespace or (obj.get("metadata") or {}).get("namespace")
        return self.request("POST", res.path(ns), body=obj)

    def patch(self, res: Resource, namespace: str | None, name: str, patch: dict | list,
              subresource: str | None = None) -> dict:
        """A JSON merge patch (RFC 7386), or a JSON patch when `patch` is a list."""
        kind = ("application/json-patch+json" if isinstance(patch, list)
                else "application/merge-patch+json")
        return self.request("PATCH", res.path(namespace, name, subresource), body=patch,
                            content_type=kind)

    def replace(self, res: Resource, obj: dict, subresource: str | None = None) -> dict:
        """PUT: fails with Conflict if metadata.resourceVersion is not the current one."""
        meta = obj["metadata"]
        return self.request("PUT", res.path(meta.get("namespace"), meta["name"], subresource),
                            body=obj)

    def delete(self, res: Resource, namespace: str | None, name: str, *,
               resource_version: str | None = None, uid: str | None = None) -> bool:
        """False if it was not there. With preconditions, Conflict if it changed."""
        body = None
        if resource_version or uid:
            pre = {k: v for k, v in (("resourceVersion", resource_version), ("uid", uid)) if v}
            body = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": pre}
        try:
            self.request("DELETE", res.path(namespace, name), body=body)
            return True
        except NotFound:
            return False

    def watch(self, res: Resource, namespace: str | None = None, *,
              resource_version: str | None = None, timeout_seconds: int = 300,
              label_selector: str | None = None, field_selector: str | None = None,
              on_open: Callable[[object], None] | None = None) -> Iterator[dict]:
        """Watch events as they come, until the server ends the stream. `on_open` gets
        the response, so another thread can `shutdown()` it to stop a blocked read."""
        import urllib3

        query = {"watch": "true", "allowWatchBookmarks": "true",
                 "timeoutSeconds": timeout_seconds, "resourceVersion": resource_version,
                 "labelSelector": label_selector, "fieldSelector": field_selector}
        resp = self.request("GET", res.path(namespace), query=query, stream=True,
                            timeout=(10.0, timeout_seconds + 30.0))
        if on_open:
            on_open(resp)
        buf = b""
        try:
            for chunk in resp.stream(65536, decode_content=True):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
            if buf.strip():
                yield json.loads(buf)
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise ApiError(0, "Unreachable", f"watch {res.plural}: {err}") from err
        finally:
            resp.release_conn()


def object_key(obj: dict) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "", meta.get("name") or ""


# ---- informers ---------------------------------------------------------------------


class Informer:
    """One resource, listed and then watched into memory, in a thread of its own."""

    # How often an optional resource the API server does not serve is looked for again.
    absent_retry = 30.0

    def __init__(self, client: KubeClient, res: Resource,
                 changed: Callable[[set[tuple[str, str]]], None],
                 *, field_selector: str | None = None, optional: bool = False,
                 watch_seconds: int = 300):
        self.client = client
        self.res = res
        self.changed = changed
        self.field_selector = field_selector
        self.optional = optional
        self.watch_seconds = watch_seconds
        self.synced = threading.Event()
        self.resource_version: str | None = None
        self.relists = 0
        self.resumes = 0
        self.served = True  # False: the API does not serve this (optional) resource
        self._objects: dict[tuple[str, str], dict] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._response = None
        self._delay = 0.1
        self._thread = threading.Thread(target=self._run, name=f"informer-{res.plural}",
                                        daemon=True)

    def start(self) -> Informer:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        resp = self._response
        if resp is not None:
            try:
                resp.shutdown()
            except Exception:  # already closed or an older urllib3
                pass
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- reads -----------------------------------------------------------------------

    def items(self) -> list[dict]:
        with self._lock:
            return list(self._objects.values())

    def snapshot(self) -> dict[tuple[str, str], dict]:
        with self._lock:
            return dict(self._objects)

    def get(self, namespace: str, name: str) -> dict | None:
        with self._lock:
            return self._objects.get((namespace, name))

    # ---- the loop --------------------------------------------------------------------

    def _run(self) -> None:
        self._delay = 0.1
        while not self._stop.is_set():
            try:
                if self.resource_version is None:
                    self._list()
                self._watch()
            except Gone:
                log.info("%s: resourceVersion %s expired: listing again", self.res.plural,
                         self.resource_version)
                self.resource_version = None
            except NotFound:
                if not self.optional:
                    log.warning("%s: not served by the API server (CRDs installed?); "
                                "retrying", self.res.plural)
                    self._stop.wait(5.0)
                    continue
                # An optional kind the cluster does not have: none of its objects can
                # exist, so it is empty (never fail-open: deleting the CRD deletes
                # every object of it); looked for again later. Said once, not every
                # retry.
                if self.served:
                    group = f"{self.res.group}/" if self.res.group else ""
                    log.warning("%s (%s%s) is not served by the API server (its CRD is "
                                "not installed?): there is no %s to act on; looking again "
                                "every %.0fs", self.res.plural, group, self.res.version,
                                self.res.kind, self.absent_retry)
                self.served = False
                self._replace([], None)
                self._stop.wait(self.absent_retry)
            except Exception as err:
                if self._stop.is_set():
                    break
                log.warning("%s: %s; retrying in %.1fs", self.res.plural, err, self._delay)
                self._stop.wait(self._delay)
                self._delay = min(self._delay * 2, 5.0)

    def _list(self) -> None:
        data = self.client.list(self.res, field_selector=self.field_selector)
        if not self.served:
            log.warning("%s: served by the API server now", self.res.plural)
        self.served = True
        items = data.get("items") or []
        # The API server leaves apiVersion and kind out of the items of a built-in kind's
        # list (a PodList's pods), while watch events carry them: without this an object
        # would have them or not by the way it came, and after a relist every object
        # would differ from itself and count as a change.
        for obj in items:
            obj.setdefault("apiVersion", self.res.api_version)
            obj.setdefault("kind", self.res.kind)
        self._replace(items, (data.get("metadata") or {}).get("resourceVersion"))
        self.relists += 1

    def _replace(self, items: list[dict], resource_version: str | None) -> None:
        new = {object_key(o): o for o in items}
        with self._lock:
            old = self._objects
            differs = {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
            self._objects = new
            self.resource_version = resource_version
        self.synced.set()
        if differs:
            self.changed(differs)

    def _watch(self) -> None:
        def opened(resp):
            self._response = resp
            self._delay = 0.1  # a watch that opens resets the backoff
            # stop() may have come while this watch was being opened, and found no
            # response to shut down: the read below would then block until the server
            # ends the watch (minutes), and close() would give up on this thread.
            if self._stop.is_set():
                try:
                    resp.shutdown()
                except Exception:  # already closed
                    pass

        if self._stop.is_set():
            return

        stream = self.client.watch(
            self.res, resource_version=self.resource_version,
            timeout_seconds=self.watch_seconds + random.randint(0, self.watch_seconds // 5),
            field_selector=self.field_selector, on_open=opened)
        try:
            for event in stream:
                if self._stop.is_set():
                    return
                self._apply(event)
        finally:
            self._response = None
            stream.close()
        self.resumes += 1

    def _apply(self, event: dict) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            raise _error(int(obj.get("code") or 0), obj)
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            self.resource_version = rv or self.resource_version
            return
        key = object_key(obj)
        with self._lock:
            if kind in ("ADDED", "MODIFIED"):
                differs = self._objects.get(key) != obj
                self._objects[key] = obj
            elif kind == "DELETED":
                differs = self._objects.pop(key, None) is not None
            else:
                log.warning("%s: unknown watch event type %r", self.res.plural, kind)
                return
            # Advanced only once the event is applied: a stream that breaks now resumes
            # exactly after it.
            self.resource_version = rv or self.resource_version
        if differs:
            self.changed({key})


# ---- the datastore -----------------------------------------------------------------

# What the agent reads, by kind: (optional: absent from a cluster without its CRD).
AGENT_KINDS = {
    "Pod": False, "Namespace": False, "NetworkPolicy": False,
    "CiliaNetworkPolicy": False, "CiliaClusterwideNetworkPolicy": False,
    "CiliaIdentity": False, "CiliaNode": False, "CiliaPrefilter": True,
    # Services and their EndpointSlices (agent/services.py translates ClusterIPs):
    # optional, so that an API server without them reads as "no Services" (whatever
    # kube-proxy does stays done) rather than holding the agent back.
    "Service": True, "EndpointSlice": True,
    # Optional: a cluster without the network-policy-api CRD has no ClusterNetworkPolicy
    # (the API server answers 404), which is not a reason to hold the agent back. Any
    # other failure (403: RBAC without it) retries and holds back the agent's first sync,
    # since such policies may exist and deny.
    "ClusterNetworkPolicy": True,
}


class DatastoreUnavailable(RuntimeError):
    pass


class KubernetesDatastore:
    """The agent's view of the cluster: informers behind the LocalDatastore interface."""

    def __init__(self, client: KubeClient, node_name: str, *,
                 kinds: dict[str, bool] | None = None, sync_timeout: float | None = None,
                 watch_seconds: int = 300):
        self.client = client
        self.node_name = node_name
        kinds = AGENT_KINDS if kinds is None else kinds
        self._generations = dict.fromkeys(kinds, 0)
        self._feeds: list[ChangeFeed] = []
        self._changes = threading.Condition()  # guards the two above; notified on change
        self._publish_status = True
        self.informers: dict[str, Informer] = {
            kind: Informer(client, RESOURCES[kind],
                           functools.partial(self._changed, kind), optional=optional,
                           watch_seconds=watch_seconds)
            for kind, optional in kinds.items()
        }
        for inf in self.informers.values():
            inf.start()
        try:
            self.wait_synced(sync_timeout)
        except BaseException:
            self.close()
            raise

    @classmethod
    def connect(cls, node_name: str, kubeconfig: str | None = None,
                **kw) -> KubernetesDatastore:
        client = KubeClient(kubeconfig, user_agent=f"cilia-agent/{node_name}")
        log.info("kubernetes datastore: API server %s", client.server)
        return cls(client, node_name, **kw)

    def wait_synced(self, timeout: float | None = None) -> None:
        """Blocks until every informer has listed once (forever without a timeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for kind, inf in self.informers.items():
            while not inf.synced.wait(5.0 if deadline is None
                                      else max(0.0, min(5.0, deadline - time.monotonic()))):
                if deadline is not None and time.monotonic() >= deadline:
                    raise DatastoreUnavailable(
                        f"the API server at {self.client.server} did not list {kind} "
                        f"within {timeout:.0f}s")
                log.info("waiting for the API server to list %s", kind)

    def close(self) -> None:
        for inf in self.informers.values():
            inf._stop.set()
        for inf in self.informers.values():
            inf.stop()

    def _changed(self, kind: str, keys: set[tuple[str, str]]) -> None:
        with self._changes:
            self._generations[kind] += 1
            for feed in self._feeds:
                feed.add(kind, keys)
            self._changes.notify_all()

    # ---- the read interface ----------------------------------------------------------

    def _revision(self, kinds: Iterable[str] | None) -> tuple:
        if kinds is None:
            return tuple(self._generations.values())
        return tuple(self._generations.get(k, 0) for k in sorted(kinds))

    def revision(self, kinds: Iterable[str] | None = None) -> tuple:
        """Changes whenever a watched object of `kinds` (None: any) is created, changed
        or deleted."""
        with self._changes:
            return self._revision(kinds)

    def wait_changed(self, since: tuple, timeout: float,
                     kinds: Iterable[str] | None = None) -> tuple:
        """Wakes as soon as an informer applies a change: no polling."""
        with self._changes:
            self._changes.wait_for(lambda: self._revision(kinds) != since, timeout)
            return self._revision(kinds)

    def subscribe(self, kinds: Iterable[str]) -> ChangeFeed:
        """A feed of the objects of `kinds` that change (see ChangeFeed); read them with
        `peek` and `objects`, which do not copy."""
        feed = ChangeFeed(kinds)
        with self._changes:
            self._feeds.append(feed)
        return feed

    def peek(self, kind: str, namespace: str, name: str) -> dict | None:
        """The stored object itself, not a copy: never to be changed (informers replace
        objects whole, so it stays as it was when read)."""
        inf = self._informer(kind)
        return inf.get(namespace, name) if inf is not None else None

    def objects(self, kind: str) -> dict[tuple[str, str], dict]:
        """Every stored object of `kind` by (namespace, name): a new dict of the objects
        themselves, which are never to be changed (see `peek`)."""
        inf = self._informer(kind)
        return inf.snapshot() if inf is not None else {}

    def list(self, kind: str, namespace: str | None = None) -> list[dict]:
        inf = self._informer(kind)
        if inf is None:
            return []
        items = inf.items()
        if namespace is not None:
            items = [o for o in items if object_key(o)[0] == namespace]
        return copy.deepcopy(sorted(items, key=object_key))

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        inf = self._informer(kind)
        ns = namespace if RESOURCES[kind].namespaced else ""
        obj = inf.get(ns, name) if inf is not None else None
        if obj is None and (inf is None or kind == "Pod"):
            # A pod the kubelet is starting may not have reached the watch yet: ask.
            try:
                obj = self.client.get(RESOURCES[kind], ns, name)
            except ApiError as err:
                raise DatastoreUnavailable(f"cannot read {kind} {namespace}/{name}: {err}"
                                           ) from err
        return copy.deepcopy(obj)

    def _informer(self, kind: str) -> Informer | None:
        if kind not in RESOURCES:
            raise ValueError(f"unsupported kind {kind!r}: the kubernetes datastore reads "
                             f"{', '.join(AGENT_KINDS)}")
        return self.informers.get(kind)

    # ---- writes ----------------------------------------------------------------------

    def put(self, obj: dict) -> str:
        """Creates the object, or merges its labels, annotations and spec into the
        existing one (status belongs to whoever runs the object); like `kubectl apply`
        returns "created", "configured" or "unchanged"."""
        res = RESOURCES[obj["kind"]]
        meta = obj.get("metadata") or {}
        ns = meta.get("namespace") if res.namespaced else None
        body = {k: v for k, v in obj.items() if k != "status"}
        try:
            self.client.create(res, body, ns)
            return "created"
        except Conflict:
            pass
        current = self.client.get(res, ns, meta["name"]) or {}
        patch = {k: v for k, v in body.items() if k not in ("apiVersion", "kind", "metadata")}
        patch["metadata"] = {k: meta[k] for k in ("labels", "annotations") if k in meta}
        merged = _merge(copy.deepcopy(current), patch)
        if merged == current:
            return "unchanged"
        self.client.patch(res, ns, meta["name"], patch)
        return "configured"

    def update(self, kind: str, namespace: str, name: str, fn) -> dict | None:
        """Read-modify-write of one object (None if it does not exist). For a Pod only
        its address is published, and only where no kubelet has set one (the kubelet
        owns pod status; in a cluster whose RBAC forbids it this is a no-op)."""
        res = RESOURCES[kind]
        ns = namespace if res.namespaced else None
        if kind == "Pod":
            # Whether a kubelet set the address already is the API's word, not the
            # watch cache's, which may not have seen the last write yet.
            current = self.client.get(res, ns, name)
            if current is None:
                return None
            new = fn(copy.deepcopy(current))
            self._publish_pod_ip(current, new)
            return new
        for _ in range(5):
            current = self.get(kind, namespace, name)
            if current is None:
                return None
            new = fn(copy.deepcopy(current))
            if new == current:
                return new
            try:
                return self.client.replace(res, new)
            except Conflict:
                time.sleep(0.05)
                current = self.client.get(res, ns, name)
        raise DatastoreUnavailable(f"{kind} {namespace}/{name} keeps changing under update")

    def _publish_pod_ip(self, old: dict, new: dict) -> None:
        ip = (new.get("status") or {}).get("podIP")
        if not ip or not self._publish_status or (old.get("status") or {}).get("podIP"):
            return
        meta = old.get("metadata") or {}
        try:
            self.client.patch(PODS, meta.get("namespace"), meta.get("name"),
                              {"status": {"podIP": ip, "podIPs": [{"ip": ip}]}}, "status")
        except ApiError as err:
            if err.status in (401, 403):
                log.info("pod status is the kubelet's here (%s): not publishing pod IPs", err)
                self._publish_status = False
            elif not isinstance(err, NotFound):
                log.warning("cannot publish %s/%s's address: %s", meta.get("namespace"),
                            meta.get("name"), err)

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        res = RESOURCES[kind]
        return self.client.delete(res, namespace if res.namespaced else None, name)

    # ---- for the agent ---------------------------------------------------------------

    def identity_store(self):
        from cilia.datastore.k8s_identities import KubernetesIdentityStore

        return KubernetesIdentityStore(self.client, cache=self)

    def wait_pod_cidr(self, timeout: float | None = None) -> str:
        """This node's pod CIDR from its CiliaNode (the operator's IPAM writes it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        logged = False
        while True:
            node = self.get("CiliaNode", "", self.node_name) or {}
            cidrs = (node.get("spec") or {}).get("podCIDRs") or []
            if cidrs:
                return cidrs[0]
            if deadline is not None and time.monotonic() > deadline:
                raise DatastoreUnavailable(
                    f"CiliaNode {self.node_name} has no spec.podCIDRs: is cilia-operator "
                    "running, or pass --pod-cidr")
            if not logged:
                log.info("waiting for the operator to give node %s a pod CIDR (CiliaNode "
                         "spec.podCIDRs)", self.node_name)
                logged = True
            time.sleep(0.2)


def _merge(target: dict, patch: dict) -> dict:
    """RFC 7386 JSON merge patch, applied in place."""
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            _merge(target[k], v)
        else:
            target[k] = copy.deepcopy(v)
    return target
