"""The local datastore: manifests as YAML files under a state directory.

Layout: <root>/<Kind>/<namespace or _cluster>/<name>.yaml, one object per file, written
atomically, so `cilia apply` and a running agent never see half an object and any
person can read the state with `ls` and `cat`. A reader that waits for changes
(`wait_changed`: the agent) is woken by inotify (watchdog's observer, recursive), never
by a poll interval.
"""

from __future__ import annotations

import copy
import fcntl
import os
import threading
import time
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import yaml
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from cilia.datastore import NAMESPACED, ChangeFeed, ObjectKey, object_ref

CLUSTER = "_cluster"
# libyaml's parser where PyYAML has it: about five times faster on thousands of objects.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class LocalDatastore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self._cache: dict[Path, tuple[tuple, dict]] = {}
        self._watch: _Watcher | None = None  # started by the first wait_changed()
        self._watcher_lock = threading.Lock()

    def path(self, kind: str, namespace: str, name: str) -> Path:
        return self.root / kind / (namespace or CLUSTER) / f"{name}.yaml"

    def _load(self, path: Path) -> dict | None:
        """A stored object, parsed once per version of its file: every write is a new
        file (an atomic rename), so (inode, size, mtime) names a version exactly."""
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        version = (st.st_ino, st.st_size, st.st_mtime_ns)
        hit = self._cache.get(path)
        if hit and hit[0] == version:
            return copy.deepcopy(hit[1])
        try:
            obj = yaml.load(path.read_text(), Loader=_Loader)
        except FileNotFoundError:
            return None
        self._cache[path] = (version, obj)
        return copy.deepcopy(obj)

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        return self._load(self.path(kind, namespace, name))

    def list(self, kind: str, namespace: str | None = None) -> list[dict]:
        base = self.root / kind
        dirs = [base / (namespace or CLUSTER)] if namespace is not None else base.glob("*")
        out = []
        for d in dirs:
            for f in sorted(Path(d).glob("*.yaml")):
                obj = self._load(f)
                if obj is not None:
                    out.append(obj)
        return out

    def peek(self, kind: str, namespace: str, name: str) -> dict | None:
        """`get`, for the interface the kubernetes datastore's readers use."""
        return self.get(kind, namespace, name)

    def objects(self, kind: str) -> dict[tuple[str, str], dict]:
        """Every stored object of `kind` by (namespace, name); namespace "" for
        cluster-scoped kinds."""
        out = {}
        for f in sorted((self.root / kind).glob("*/*.yaml")):
            obj = self._load(f)
            if obj is not None:
                ns = f.parent.name
                out[("" if ns == CLUSTER else ns, f.stem)] = obj
        return out

    def put(self, obj: dict) -> str:
        """Stores an object; returns "created", "configured" or "unchanged". Like
        `kubectl apply`, a manifest without status keeps the stored object's status
        (which belongs to whoever runs the object: the agent for a pod)."""
        kind, namespace, name = object_ref(obj)
        if NAMESPACED[kind]:
            obj.setdefault("metadata", {})["namespace"] = namespace
        with self._lock():
            old = self.get(kind, namespace, name)
            if old is not None and "status" in old and "status" not in obj:
                obj = {**obj, "status": old["status"]}
            if old == obj:
                return "unchanged"
            self._write(self.path(kind, namespace, name), obj)
        return "configured" if old is not None else "created"

    def identity_store(self):
        """Where identities are claimed: CiliaIdentity files beside the other objects."""
        from cilia.datastore.identities import LocalIdentityStore

        return LocalIdentityStore(self)

    def revision(self, kinds: Iterable[str] | None = None) -> tuple:
        """Changes whenever an object of `kinds` (None: any) is created, replaced or
        deleted: every write is a rename into its namespace directory, which moves that
        directory's mtime."""
        out = []
        if not self.root.exists():
            return ()
        wanted = None if kinds is None else set(kinds)
        for kind_dir in sorted(self.root.iterdir()):
            if not kind_dir.is_dir() or (wanted is not None and kind_dir.name not in wanted):
                continue
            out.append((kind_dir.name, kind_dir.stat().st_mtime_ns))
            for ns_dir in sorted(kind_dir.iterdir()):
                if ns_dir.is_dir():
                    out.append((kind_dir.name, ns_dir.name, ns_dir.stat().st_mtime_ns))
        return tuple(out)

    def wait_changed(self, since: tuple, timeout: float,
                     kinds: Iterable[str] | None = None) -> tuple:
        """Wakes when a file under the root is written, renamed or removed (inotify,
        through watchdog), then answers if revision(kinds) is no longer `since`."""
        deadline = time.monotonic() + timeout
        watcher = self._watcher()
        while True:
            seen = watcher.events
            revision = self.revision(kinds)
            left = deadline - time.monotonic()
            if revision != since or left <= 0:
                return revision
            # A second at most: a safety net should inotify ever miss a change (its
            # queue overflowing), not the way changes are found.
            watcher.wait(seen, min(left, 1.0))

    def _watcher(self) -> _Watcher:
        with self._watcher_lock:
            if self._watch is None:
                self.root.mkdir(parents=True, exist_ok=True)
                self._watch = _Watcher(self.root)
            return self._watch

    def close(self) -> None:
        with self._watcher_lock:
            if self._watch is not None:
                self._watch.stop()
                self._watch = None

    def subscribe(self, kinds: Iterable[str]) -> ChangeFeed:
        return _RevisionFeed(self, kinds)

    def update(self, kind: str, namespace: str, name: str, fn) -> dict | None:
        """Read-modify-write of one object under a lock (None if it does not exist)."""
        with self._lock():
            obj = self.get(kind, namespace, name)
            if obj is None:
                return None
            new = fn(obj)
            self._write(self.path(kind, namespace, name), new)
            return new

    @contextmanager
    def _lock(self):
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def _write(self, path: Path, obj: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(yaml.safe_dump(obj, sort_keys=False))
        os.replace(tmp, path)

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        try:
            self.path(kind, namespace, name).unlink()
            return True
        except FileNotFoundError:
            return False


class _RevisionFeed(ChangeFeed):
    """The local datastore sees that a kind's directory changed, not which file: any
    change is "anything may have changed" (its scale is a lab's)."""

    def __init__(self, datastore: LocalDatastore, kinds: Iterable[str]):
        super().__init__(kinds)
        self._datastore = datastore
        self._seen: tuple | None = None

    def take(self) -> set[ObjectKey] | None:
        revision = self._datastore.revision(self.kinds)
        with self._lock:
            changed, self._seen = revision != self._seen, revision
        return None if changed else set()


class _Watcher(FileSystemEventHandler):
    """Counts the changes under a root (recursively: kinds' and namespaces' directories
    made later are watched too) and wakes whoever waits for the next one."""

    CHANGES = frozenset({"created", "deleted", "moved", "modified"})

    def __init__(self, root: Path):
        self.events = 0
        self._cond = threading.Condition()
        self._observer = Observer()
        self._observer.daemon = True
        self._observer.schedule(self, str(root), recursive=True)
        self._observer.start()

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in self.CHANGES:
            return  # opened and closed: reads, the datastore's own among them
        with self._cond:
            self.events += 1
            self._cond.notify_all()

    def wait(self, seen: int, timeout: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.events != seen, timeout)

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)
