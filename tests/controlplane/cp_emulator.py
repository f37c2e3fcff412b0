"""An emulated API server for the control-plane tests: kmock's KubernetesEmulator, gaps
filled. Most tests run against the real API server (conftest.py `cluster`); this one stays
for the faults a real server cannot be made to produce on demand: a watch held back while
every other request is answered, and requests failing with a status of the test's choice
(test_k8s_datastore.py). test_emulator.py checks it against the real server.

kmock 0.8 emulates the Kubernetes API well enough for kopf's own tests, but not for an
operator and agents that rely on the API's guarantees. `ApiServer` subclasses it and
keeps kmock's HTTP server, request parsing and log (`api.requests`), API discovery
(`/api`, `/apis/...`, from kmock's bundled resource list plus the CRDs created) and
error rendering, but serves objects from a store of its own that behaves like the real
one where these tests depend on it. The gaps, and what fills each:

- no uid, resourceVersion, creationTimestamp, generateName: assigned on create; one
  global, increasing resourceVersion; metadata.generation moves when the spec does.
- no PUT, no 409: PUT replaces; create of an existing name is 409 AlreadyExists; a PUT,
  a PATCH carrying metadata.resourceVersion, or a DELETE with preconditions that does
  not match the object is 409 Conflict (what leader election and IPAM rely on).
- label and field selectors ignored: both are applied to lists and watches (=, ==, !=,
  in, notin, exists, !key; field selectors on any dotted path); an object leaving a
  filtered watch is sent as DELETED, one entering it as ADDED.
- `/api/v1/namespaces` (list) answered 500 and `/api/v1/namespaces/NAME` was misparsed:
  paths are routed here, knowing which plurals are namespaced.
- `watch=True` (the official client's spelling) was not a watch: true, True and 1 are.
- an object created while a watch sent its initial list could be lost, and every
  (re)started watch replayed all objects as ADDED: a watch is registered and its
  starting point taken in one step on the event loop; a watch with a resourceVersion
  resumes from the history after it (no replay), a watch without one starts with the
  current objects as ADDED (as the real server does); a resourceVersion older than the
  history is answered with an ERROR event 410 Expired.
- no schema validation: CRDs created through the API are served (discovery, status
  subresource) and their openAPIV3Schema is enforced on create, update and patch (422
  with the field's path). CEL rules (x-kubernetes-validations) are not evaluated.
- status subresources: status is dropped on create and ignored by writes to the main
  resource; writes to /status change only status.

Faults for the tests: `break_watches()` (every open watch stream is cut), `hold_watches()`
/ `release_watches()` (new watches wait; changes made meanwhile must be caught up on),
`compact()` (the history is forgotten: resuming watches get 410 and must list again),
`fail(method, plural)` (such requests are answered 503 until `fail(..., None)`).

Where it still differs from the real server (found by running the tests against both; no
test left here depends on these): built-in objects keep apiVersion and kind in list items
(the real server leaves them out); a pod is deleted at once (the real server first sets
its deletionTimestamp: a MODIFIED event before the DELETED one); built-in kinds are not
validated (the real server refuses, e.g., a NetworkPolicy ipBlock whose except is not
inside its cidr); CEL rules are not evaluated; no 429 while a kind's storage initializes.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import ipaddress
import json
import re
import secrets
import threading
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp.web
import attrs
import jsonpatch
import jsonschema
import kmock
import yaml
from kmock._internal import rendering

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "charts" / "cilia" / "crds"
HISTORY_LIMIT = 20000
TRUE = ("true", "True", "1")


@dataclass
class Kind:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    status: bool = False  # has a status subresource
    schema: dict | None = None  # openAPIV3Schema of a CRD

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.plural)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


@dataclass
class Watch:
    kind: Kind
    namespace: str | None
    labels: list
    fields: list
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    broken: bool = False


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _error(status: int, reason: str, message: str, **details) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=status, reason=reason, message=message,
                                 details=details or {"causes": []})


# ---- selectors ---------------------------------------------------------------------

_SET_EXPR = re.compile(r"^\s*(!?)([^\s!=,()]+)\s*(?:(in|notin)\s*\(([^)]*)\))?\s*$")


def parse_label_selector(text: str | None) -> list[tuple[str, str, frozenset]]:
    out = []
    if not text:
        return out
    # Split on commas outside parentheses.
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    for part in (p.strip() for p in parts if p.strip()):
        for op in ("!=", "==", "="):
            if op in part:
                k, v = (s.strip() for s in part.split(op, 1))
                out.append((k, "!=" if op == "!=" else "=", frozenset([v])))
                break
        else:
            m = _SET_EXPR.match(part)
            if not m:
                raise _error(400, "BadRequest", f"unable to parse requirement: {part!r}")
            neg, key, op, values = m.groups()
            if op:
                out.append((key, op, frozenset(v.strip() for v in values.split(","))))
            else:
                out.append((key, "!" if neg else "exists", frozenset()))
    return out


def labels_match(selector: list, labels: dict) -> bool:
    for key, op, values in selector:
        has, value = key in labels, labels.get(key)
        if op == "=" and not (has and value in values):
            return False
        if op == "!=" and has and value in values:
            return False
        if op == "in" and not (has and value in values):
            return False
        if op == "notin" and has and value in values:
            return False
        if op == "exists" and not has:
            return False
        if op == "!" and has:
            return False
    return True


def parse_field_selector(text: str | None) -> list[tuple[str, bool, str]]:
    out = []
    for part in (p.strip() for p in (text or "").split(",") if p.strip()):
        for op, eq in (("!=", False), ("==", True), ("=", True)):
            if op in part:
                path, value = part.split(op, 1)
                out.append((path.strip(), eq, value.strip()))
                break
        else:
            raise _error(400, "BadRequest", f"invalid field selector: {part!r}")
    return out


def fields_match(selector: list, obj: dict) -> bool:
    for path, eq, value in selector:
        cur = obj
        for part in path.split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        actual = "" if cur is None else str(cur)
        if (actual == value) != eq:
            return False
    return True


# ---- schema validation -------------------------------------------------------------

_formats = jsonschema.FormatChecker()


@_formats.checks("cidr", raises=ValueError)
def _is_cidr(value) -> bool:
    if not isinstance(value, str) or "/" not in value:
        raise ValueError(f"{value!r} is not a CIDR (ADDRESS/PREFIX)")
    ipaddress.ip_network(value, strict=False)
    return True


@_formats.checks("int32")
@_formats.checks("int64")
def _is_int(value) -> bool:
    return True


def _path(error: jsonschema.ValidationError) -> str:
    out = ""
    for part in error.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "<root>"


def validate_schema(kind: Kind, obj: dict) -> None:
    if kind.schema is None:
        return
    validator = jsonschema.Draft7Validator(kind.schema, format_checker=_formats)
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        name = (obj.get("metadata") or {}).get("name")
        causes = [{"field": _path(e), "message": e.message} for e in errors]
        message = "; ".join(f"{c['field']}: {c['message']}" for c in causes)
        raise _error(422, "Invalid",
                     f'{kind.kind}.{kind.group} "{name}" is invalid: {message}',
                     name=name, group=kind.group, kind=kind.kind, causes=causes)


_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def merge_patch(target, patch):
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    target = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        else:
            target[k] = merge_patch(target.get(k), v)
    return target


# ---- the server --------------------------------------------------------------------


@attrs.define(kw_only=True)
class ApiServer(kmock.KubernetesEmulator):
    _kinds: dict = attrs.field(factory=dict, init=False)
    _store: dict = attrs.field(factory=dict, init=False)
    _rv: int = attrs.field(default=0, init=False)
    _history: list = attrs.field(factory=list, init=False)
    _compacted: int = attrs.field(default=0, init=False)
    _watches: list = attrs.field(factory=list, init=False)
    _open: asyncio.Event | None = attrs.field(default=None, init=False)
    _closing: bool = attrs.field(default=False, init=False)
    _faults: dict = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        with warnings.catch_warnings():  # kmock reads its bundle with a deprecated API
            warnings.simplefilter("ignore", DeprecationWarning)
            self.resources.load_bundled()
        for res in self.resources:
            info = self.resources[res]
            if res.plural and info.kind and info.namespaced is not None:
                k = Kind(res.group, res.version, res.plural, info.kind, info.namespaced,
                         "status" in info.subresources)
                self._kinds.setdefault((k.group, k.version, k.plural), k)

    # ---- for the tests (call on the server's loop: EmulatorThread.call) -------------

    def objects(self, group: str, plural: str) -> list[dict]:
        return [copy.deepcopy(o) for o in self._store.get((group, plural), {}).values()]

    @property
    def resource_version(self) -> int:
        return self._rv

    def break_watches(self) -> int:
        """Cuts every open watch stream; returns how many there were."""
        for w in self._watches:
            w.broken = True
            w.queue.put_nowait(None)
        return len(self._watches)

    def hold_watches(self) -> int:
        """Cuts every watch and makes new ones wait until `release_watches()`."""
        if self._open is None:
            self._open = asyncio.Event()
        self._open.clear()
        return self.break_watches()

    def release_watches(self) -> None:
        if self._open is not None:
            self._open.set()

    def compact(self) -> None:
        """Forgets the history: a watch resuming from any earlier version gets 410."""
        self._history.clear()
        self._compacted = self._rv

    def fail(self, method: str, plural: str, status: int | None = 503) -> None:
        """Answers `method` requests on `plural` with `status` (None: stop failing)."""
        if status is None:
            self._faults.pop((method.upper(), plural), None)
        else:
            self._faults[(method.upper(), plural)] = status

    def watch_count(self) -> int:
        return len(self._watches)

    def shutdown(self) -> None:
        self._closing = True
        self.release_watches()
        self.break_watches()

    # ---- routing ---------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest):
        """RawHandler.__call__, but kmock's request parser fails on `/api/v1/namespaces`
        (500): such requests are parsed here, without its Kubernetes fields (this class
        routes by path itself)."""
        await raw_request.read()
        try:
            try:
                request = await rendering.Request._parse(raw_request, id=len(self._requests))
            except ValueError:
                request = rendering.Request(
                    id=len(self._requests), raw_request=raw_request, url=raw_request.url,
                    method=raw_request.method, params=dict(raw_request.query),
                    headers=dict(raw_request.headers), body=await raw_request.read(),
                    text=await raw_request.text())
            self._requests.append(request)
            return await self._handle(request)
        except Exception as err:
            return await self._render_error(err)

    async def _handle(self, request):
        raw = request._raw_request
        if raw is None:
            return await kmock.RawHandler._handle(self, request)
        route = self._route(raw.path)
        if route is None:
            return await kmock.RawHandler._handle(self, request)  # discovery and the like
        kind, namespace, name, sub = route
        method = raw.method.upper()
        if (status := self._faults.get((method, kind.plural))) is not None:
            raise _error(status, "ServiceUnavailable", f"{method} {kind.plural}: failing "
                                                       "on purpose (a test's fault)")
        query = dict(raw.query)
        if sub not in (None, "status"):
            raise _error(404, "NotFound", f"the server could not find the requested "
                                          f"resource ({kind.plural}/{sub})")
        if method == "GET" and query.get("watch") in TRUE:
            if name is not None:
                query["fieldSelector"] = ",".join(
                    filter(None, [query.get("fieldSelector"), f"metadata.name={name}"]))
            return await self._watch(raw, kind, namespace, query)
        body = None
        if request.body:
            try:
                body = json.loads(request.body)
            except ValueError as err:
                raise _error(400, "BadRequest", f"the body is not JSON: {err}") from err
        if method == "GET":
            out = self._get(kind, namespace, name) if name else self._list(kind, namespace,
                                                                           query)
            return aiohttp.web.json_response(out)
        if method == "POST" and name is None:
            return aiohttp.web.json_response(self._create(kind, namespace, body), status=201)
        if method == "PUT" and name is not None:
            return aiohttp.web.json_response(self._replace(kind, namespace, name, sub, body))
        if method == "PATCH" and name is not None:
            ctype = raw.headers.get("Content-Type", "").split(";")[0].strip()
            return aiohttp.web.json_response(
                self._patch(kind, namespace, name, sub, body, ctype))
        if method == "DELETE" and name is not None:
            return aiohttp.web.json_response(self._delete(kind, namespace, name, body))
        if method == "DELETE":
            for obj in self._select(kind, namespace, query):
                meta = obj["metadata"]
                self._delete(kind, meta.get("namespace"), meta["name"], None)
            return aiohttp.web.json_response({"kind": "Status", "apiVersion": "v1",
                                              "status": "Success"})
        raise _error(405, "MethodNotAllowed", f"{method} is not supported here")

    def _route(self, path: str):
        parts = [p for p in path.split("/") if p]
        if len(parts) >= 2 and parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        if not rest:
            return None
        namespace = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            k = self._kinds.get((group, version, rest[2]))
            if k is not None and k.namespaced:
                namespace, rest = rest[1], rest[2:]
        k = self._kinds.get((group, version, rest[0]))
        if k is None:
            raise _error(404, "NotFound", f"the server could not find the requested resource "
                                          f"({group or 'core'}/{version} {rest[0]})")
        name = rest[1] if len(rest) > 1 else None
        sub = "/".join(rest[2:]) or None
        return k, namespace, name, sub

    # ---- reads -----------------------------------------------------------------------

    def _objs(self, kind: Kind) -> dict:
        return self._store.setdefault(kind.key, {})

    def _get(self, kind: Kind, namespace: str | None, name: str) -> dict:
        obj = self._objs(kind).get((namespace if kind.namespaced else None, name))
        if obj is None:
            raise _error(404, "NotFound", f'{kind.plural} "{name}" not found', name=name,
                         kind=kind.plural, group=kind.group)
        return copy.deepcopy(obj)

    def _select(self, kind: Kind, namespace: str | None, query: dict) -> list[dict]:
        labels = parse_label_selector(query.get("labelSelector"))
        fields = parse_field_selector(query.get("fieldSelector"))
        return [o for (ns, _), o in sorted(self._objs(kind).items(), key=lambda kv: (
                    kv[0][0] or "", kv[0][1]))
                if (namespace is None or ns == namespace)
                and labels_match(labels, (o["metadata"].get("labels") or {}))
                and fields_match(fields, o)]

    def _list(self, kind: Kind, namespace: str | None, query: dict) -> dict:
        return {"apiVersion": kind.api_version, "kind": f"{kind.kind}List",
                "metadata": {"resourceVersion": str(self._rv)},
                "items": copy.deepcopy(self._select(kind, namespace, query))}

    # ---- writes ----------------------------------------------------------------------

    def _bump(self, obj: dict) -> None:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)

    def _publish(self, kind: Kind, kind_of_event: str, obj: dict, old: dict | None) -> None:
        entry = (self._rv, kind.key, kind_of_event, copy.deepcopy(obj),
                 copy.deepcopy(old) if old is not None else None)
        self._history.append(entry)
        if len(self._history) > HISTORY_LIMIT:
            dropped = self._history[: len(self._history) - HISTORY_LIMIT]
            del self._history[: len(dropped)]
            self._compacted = dropped[-1][0]
        for w in self._watches:
            if w.kind.key == kind.key:
                event = self._event_for(w, entry)
                if event is not None:
                    w.queue.put_nowait(event)

    def _event_for(self, w: Watch, entry) -> dict | None:
        _, _, typ, obj, old = entry

        def matches(o):
            return (o is not None
                    and (w.namespace is None or o["metadata"].get("namespace") == w.namespace)
                    and labels_match(w.labels, o["metadata"].get("labels") or {})
                    and fields_match(w.fields, o))

        now, before = matches(obj), matches(old)
        if typ == "DELETED":
            return {"type": "DELETED", "object": obj} if now or before else None
        if typ == "ADDED":
            return {"type": "ADDED", "object": obj} if now else None
        if now and before:
            return {"type": "MODIFIED", "object": obj}
        if now:
            return {"type": "ADDED", "object": obj}
        if before:
            return {"type": "DELETED", "object": obj}
        return None

    def _check_name(self, kind: Kind, name: object) -> None:
        if not isinstance(name, str) or len(name) > 253 or not _NAME.match(name):
            raise _error(422, "Invalid", f'{kind.kind} "{name}" is invalid: metadata.name: '
                                         "a lowercase RFC 1123 subdomain is required")

    def _create(self, kind: Kind, namespace: str | None, body: object) -> dict:
        if not isinstance(body, dict):
            raise _error(400, "BadRequest", "the body must be an object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        self._check_name(kind, meta.get("name"))
        if kind.namespaced:
            ns = namespace or meta.get("namespace")
            if not ns:
                raise _error(400, "BadRequest", "a namespace is required")
            if namespace and meta.get("namespace") not in (None, namespace):
                raise _error(400, "BadRequest", "the namespace of the object does not match "
                                                "the namespace of the request")
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
        for server_field in ("resourceVersion", "deletionTimestamp"):
            meta.pop(server_field, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        if kind.status:
            obj.pop("status", None)
        if kind.kind == "Pod":
            obj["status"] = {"phase": "Pending"}
        if kind.kind == "Namespace":
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
            obj["status"] = {"phase": "Active"}
        validate_schema(kind, obj)
        key = (meta.get("namespace"), meta["name"])
        if key in self._objs(kind):
            raise _error(409, "AlreadyExists",
                         f'{kind.plural}.{kind.group or "core"} "{meta["name"]}" already '
                         "exists", name=meta["name"], group=kind.group, kind=kind.plural)
        if kind.kind == "CustomResourceDefinition":
            self._establish(obj)
        self._bump(obj)
        self._objs(kind)[key] = obj
        self._publish(kind, "ADDED", obj, None)
        return copy.deepcopy(obj)

    def _write(self, kind: Kind, old: dict, new: dict, sub: str | None) -> dict:
        """Stores `new` in place of `old` after the checks every update shares."""
        if kind.status:
            if sub == "status":
                new = {**copy.deepcopy(old), "status": new.get("status")}
                if new["status"] is None:
                    del new["status"]
            else:
                new = {k: v for k, v in new.items() if k != "status"}
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
        meta, old_meta = new.setdefault("metadata", {}), old["metadata"]
        for fixed in ("name", "namespace", "uid", "creationTimestamp", "generation"):
            if fixed in old_meta:
                meta[fixed] = old_meta[fixed]
            else:
                meta.pop(fixed, None)
        if old_meta.get("deletionTimestamp"):
            meta["deletionTimestamp"] = old_meta["deletionTimestamp"]
        new["apiVersion"], new["kind"] = kind.api_version, kind.kind

        def spec(o):
            return {k: v for k, v in o.items() if k not in ("metadata", "status")}

        if spec(new) != spec(old):
            meta["generation"] = int(old_meta.get("generation") or 1) + 1
        validate_schema(kind, new)
        meta["resourceVersion"] = old_meta["resourceVersion"]
        if new == old:
            return copy.deepcopy(old)
        self._bump(new)
        key = (old_meta.get("namespace"), old_meta["name"])
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            del self._objs(kind)[key]
            self._publish(kind, "DELETED", new, old)
            return copy.deepcopy(new)
        self._objs(kind)[key] = new
        self._publish(kind, "MODIFIED", new, old)
        return copy.deepcopy(new)

    def _check_version(self, kind: Kind, old: dict, wanted: str | None) -> None:
        if wanted and wanted != old["metadata"]["resourceVersion"]:
            raise _error(409, "Conflict",
                         f'Operation cannot be fulfilled on {kind.plural}.{kind.group or "core"}'
                         f' "{old["metadata"]["name"]}": the object has been modified; please '
                         "apply your changes to the latest version and try again",
                         name=old["metadata"]["name"], group=kind.group, kind=kind.plural)

    def _replace(self, kind: Kind, namespace, name, sub, body) -> dict:
        old = self._get(kind, namespace, name)
        if not isinstance(body, dict):
            raise _error(400, "BadRequest", "the body must be an object")
        if (body.get("metadata") or {}).get("name") not in (None, name):
            raise _error(400, "BadRequest", "the name of the object does not match the URL")
        self._check_version(kind, old, (body.get("metadata") or {}).get("resourceVersion"))
        return self._write(kind, old, copy.deepcopy(body), sub)

    def _patch(self, kind: Kind, namespace, name, sub, body, ctype: str) -> dict:
        old = self._get(kind, namespace, name)
        if ctype == "application/json-patch+json":
            try:
                new = jsonpatch.apply_patch(old, body)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as err:
                raise _error(422, "Invalid", f"the JSON patch cannot be applied: {err}") \
                    from err
        elif ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            if not isinstance(body, dict):
                raise _error(400, "BadRequest", "a merge patch must be an object")
            self._check_version(kind, old, (body.get("metadata") or {}).get("resourceVersion"))
            new = merge_patch(old, body)
        else:
            raise _error(415, "UnsupportedMediaType", f"unsupported patch type {ctype!r}")
        return self._write(kind, old, new, sub)

    def _delete(self, kind: Kind, namespace, name, body) -> dict:
        old = self._get(kind, namespace, name)
        pre = (body or {}).get("preconditions") or {} if isinstance(body, dict) else {}
        self._check_version(kind, old, pre.get("resourceVersion"))
        if pre.get("uid") and pre["uid"] != old["metadata"]["uid"]:
            raise _error(409, "Conflict", f"Precondition failed: UID in precondition: "
                                          f"{pre['uid']}, UID in object meta: "
                                          f"{old['metadata']['uid']}")
        meta = old["metadata"]
        if meta.get("finalizers"):
            if meta.get("deletionTimestamp"):
                return old
            new = copy.deepcopy(old)
            new["metadata"]["deletionTimestamp"] = _now()
            return self._write(kind, old, new, None)
        gone = copy.deepcopy(old)
        self._bump(gone)
        del self._objs(kind)[(meta.get("namespace"), meta["name"])]
        self._publish(kind, "DELETED", gone, old)
        if kind.kind == "CustomResourceDefinition":
            self._unestablish(old)
        return gone

    # ---- CRDs ------------------------------------------------------------------------

    def _establish(self, crd: dict) -> None:
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        group, plural, kind = spec.get("group"), names.get("plural"), names.get("kind")
        if not group or not plural or not kind or spec.get("scope") not in ("Namespaced",
                                                                             "Cluster"):
            raise _error(422, "Invalid", "a CRD needs spec.group, spec.names.plural, "
                                         "spec.names.kind and spec.scope")
        if crd["metadata"]["name"] != f"{plural}.{group}":
            raise _error(422, "Invalid", f"metadata.name must be {plural}.{group}")
        for v in spec.get("versions") or []:
            if not v.get("served"):
                continue
            schema = ((v.get("schema") or {}).get("openAPIV3Schema"))
            if not isinstance(schema, dict):
                raise _error(422, "Invalid", f"version {v.get('name')}: a schema is required")
            k = Kind(group, v["name"], plural, kind, spec["scope"] == "Namespaced",
                     "status" in (v.get("subresources") or {}), schema)
            self._kinds[(group, v["name"], plural)] = k
            self.resources[f"{group}/{v['name']}/{plural}"] = kmock.ResourceInfo(
                kind=kind, singular=names.get("singular") or kind.lower(),
                namespaced=k.namespaced,
                verbs={"get", "list", "watch", "create", "update", "patch", "delete",
                       "deletecollection"},
                shortnames=set(names.get("shortNames") or []),
                categories=set(names.get("categories") or []),
                subresources={"status"} if k.status else set())
        crd["status"] = {
            "acceptedNames": names,
            "storedVersions": [v["name"] for v in spec.get("versions") or [] if v.get("storage")],
            "conditions": [{"type": t, "status": "True", "lastTransitionTime": _now(),
                            "reason": "InitialNamesAccepted" if t == "NamesAccepted" else t}
                           for t in ("NamesAccepted", "Established")],
        }

    def _unestablish(self, crd: dict) -> None:
        spec = crd.get("spec") or {}
        plural = (spec.get("names") or {}).get("plural")
        for v in spec.get("versions") or []:
            self._kinds.pop((spec.get("group"), v.get("name"), plural), None)
            self.resources.pop(f"{spec.get('group')}/{v.get('name')}/{plural}", None)

    # ---- watches ---------------------------------------------------------------------

    async def _watch(self, raw, kind: Kind, namespace: str | None, query: dict):
        if self._open is not None and not self._open.is_set():
            await self._open.wait()
        if self._closing:
            raise _error(503, "ServiceUnavailable", "the server is shutting down")
        w = Watch(kind, namespace, parse_label_selector(query.get("labelSelector")),
                  parse_field_selector(query.get("fieldSelector")))
        since = query.get("resourceVersion")
        # The starting point and the registration happen in one step on the loop: no
        # change can fall between them.
        if since in (None, "", "0"):
            initial = [{"type": "ADDED", "object": copy.deepcopy(o)}
                       for o in self._select(kind, namespace, query)]
        elif not since.isdigit():
            raise _error(400, "BadRequest", f"invalid resourceVersion {since!r}")
        elif int(since) < self._compacted:
            initial = [{"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "reason": "Expired", "code": 410,
                "message": f"too old resource version: {since} ({self._compacted})"}}]
        else:
            initial = [e for entry in self._history
                       if entry[0] > int(since) and entry[1] == kind.key
                       and (e := self._event_for(w, entry)) is not None]
        expired = bool(initial) and initial[0]["type"] == "ERROR"
        if not expired:
            self._watches.append(w)
        try:
            timeout = float(query.get("timeoutSeconds") or 1800)
            deadline = asyncio.get_running_loop().time() + timeout
            resp = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.enable_chunked_encoding()
            await resp.prepare(raw)
            for event in initial:
                await resp.write(json.dumps(event).encode() + b"\n")
            if expired:
                await resp.write_eof()
                return resp
            while True:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                try:
                    event = await asyncio.wait_for(w.queue.get(), min(left, 0.5))
                except TimeoutError:
                    if raw.transport is None or raw.transport.is_closing():
                        return resp
                    continue
                if event is None or w.broken:
                    if raw.transport is not None:
                        raw.transport.close()  # cut, not ended: the client sees a break
                    return resp
                await resp.write(json.dumps(event).encode() + b"\n")
            await resp.write_eof()
            return resp
        except (ConnectionError, RuntimeError):
            return resp
        finally:
            if w in self._watches:
                self._watches.remove(w)


# ---- running it beside the tests ---------------------------------------------------


class EmulatorThread:
    """The ApiServer on an event loop in a background thread, so that synchronous tests,
    operator processes and agents can all talk to it over HTTP."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="api-server",
                                       daemon=True)
        self.api: ApiServer | None = None
        self.server = None
        self.url = ""

    def start(self) -> EmulatorThread:
        self.thread.start()
        self.run(self._start())
        return self

    async def _start(self) -> None:
        self.api = ApiServer()
        await self.api.__aenter__()
        self.server = kmock.Server(self.api, host="127.0.0.1")
        await self.server.__aenter__()
        self.url = str(self.server.url).rstrip("/")

    def run(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, *args, **kw):
        """Runs `fn` on the server's loop (where its state lives) and returns the result."""
        async def wrapper():
            return fn(*args, **kw)

        return self.run(wrapper())

    def stop(self) -> None:
        if not self.thread.is_alive():
            return

        async def stop():
            if self.api is not None:
                self.api.shutdown()
            if self.server is not None:
                await self.server.__aexit__(None, None, None)
            if self.api is not None:
                await self.api.__aexit__(None, None, None)

        try:
            self.run(stop(), timeout=15)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    def kubeconfig(self, path: Path, url: str | None = None) -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": url or self.url}}],
            "users": [{"name": "tester", "user": {"token": "test-token"}}],
            "contexts": [{"name": "emulator",
                          "context": {"cluster": "emulator", "user": "tester"}}],
        }))
        return path


def load_crds() -> list[dict]:
    return [yaml.safe_load(p.read_text()) for p in sorted(CRD_DIR.glob("*.yaml"))]
