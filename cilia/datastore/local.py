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
import sys
import threading
import time
from collections.abc import Iterable
from contextlib import contextmanager
from operator import attrgetter
from pathlib import Path

import yaml
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from cilia.datastore import NAMESPACED, ChangeFeed, ObjectKey, object_ref

CLUSTER = "_cluster"


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """libyaml's parser where PyYAML has it (about five times faster on thousands of
    objects), with every string interned: the stored objects are kept parsed, and
    thousands of them repeat the same keys and values ("apiVersion", "matchLabels",
    "TCP", label keys), one copy each instead of one per object (1.4 MiB less at
    1,000 policies)."""


def _interned_str(loader: yaml.BaseLoader, node: yaml.ScalarNode) -> str:
    return sys.intern(loader.construct_scalar(node))


_Loader.add_constructor("tag:yaml.org,2002:str", _interned_str)


_NAME = attrgetter("name")


def _subdirs(path: Path) -> list[tuple[str, str, int]]:
    """(name, path, mtime) of each directory in `path`, by name; none if it is not
    there (os.scandir: whether an entry is a directory comes with the listing, and one
    stat gives its mtime; the agent asks at every sync, for every namespace)."""
    out = []
    try:
        with os.scandir(path) as it:
            for e in it:
                if e.is_dir():
                    try:
                        out.append((e.name, e.path, e.stat().st_mtime_ns))
                    except FileNotFoundError:
                        continue
    except FileNotFoundError:
        return []
    out.sort()
    return out


def _version(st: os.stat_result) -> tuple[int, int, int]:
    """A version of a stored file: every write is a new file (an atomic rename), so
    (inode, size, mtime) names it exactly."""
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def is_object_file(name: str) -> bool:
    """NAME.yaml holds an object; hidden names are writers' temporary files."""
    return name.endswith(".yaml") and not name.startswith(".")


class LocalDatastore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self._cache: dict[str, tuple[tuple, dict]] = {}  # by path
        # a namespace's objects by (namespace, name), by the version of its directory
        self._dirs: dict[str, tuple[tuple, dict]] = {}  # by path
        self._kinds: dict[str, tuple[tuple, dict]] = {}  # a kind's objects, by its dirs'
        self._watch: _Watcher | None = None  # started by the first wait_changed()
        self._watcher_lock = threading.Lock()

    def path(self, kind: str, namespace: str, name: str) -> Path:
        return self.root / kind / (namespace or CLUSTER) / f"{name}.yaml"

    def _load(self, path: Path | str, copied: bool = True, st: os.stat_result | None = None
              ) -> dict | None:
        """A stored object, parsed once per version of its file (_version). Not
        `copied`: the cached object itself, the same one until the file changes. `st`:
        the file's stat, if the caller has it."""
        key = str(path)
        try:
            st = st or os.stat(key)
        except FileNotFoundError:
            return None
        version = _version(st)
        hit = self._cache.get(key)
        if hit and hit[0] == version:
            return copy.deepcopy(hit[1]) if copied else hit[1]
        try:
            with open(key) as f:
                obj = yaml.load(f.read(), Loader=_Loader)
        except FileNotFoundError:
            return None
        self._cache[key] = (version, obj)
        return copy.deepcopy(obj) if copied else obj

    def _read_dir(self, d: str, ns: str) -> dict[tuple[str, str], dict]:
        """A namespace directory's objects by (namespace, name), each parsed once per
        version (_load; os.scandir gives each file's stat with the listing)."""
        try:
            with os.scandir(d) as it:
                files = sorted((e for e in it if is_object_file(e.name)), key=_NAME)
        except FileNotFoundError:
            return {}
        objs = {}
        for e in files:
            try:
                st = e.stat()
            except FileNotFoundError:
                continue
            if (obj := self._load(e.path, copied=False, st=st)) is not None:
                objs[(ns, e.name[:-5])] = obj
        return objs

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
        cluster-scoped kinds. The objects themselves, not copies, never to be changed
        (as the kubernetes datastore's): the same object until its file changes, so
        readers may remember what they derived from it. While the kind's directories
        have not changed, no file is even looked at."""
        counts = self._watch.by_dir if self._watch is not None else {}
        # a namespace's directory is read again only when a write moved its mtime or
        # (within one tick of the file system's clock) inotify saw one in it
        versions = tuple((name, path, mtime, counts.get((kind, name), 0))
                         for name, path, mtime in _subdirs(self.root / kind))
        whole = self._kinds.get(kind)
        if whole is not None and whole[0] == versions:
            return dict(whole[1])  # a copy of the dict, in C: the objects themselves
        out = {}
        for name, d, mtime, count in versions:
            hit = self._dirs.get(d)
            if hit is None or hit[0] != (mtime, count):
                objs = self._read_dir(d, "" if name == CLUSTER else name)
                if hit is not None:
                    self._forget(d, hit[1].keys() - objs.keys())
                hit = self._dirs[d] = ((mtime, count), objs)
            out.update(hit[1])
        if whole is not None:  # a namespace's directory gone with its objects
            for d in {v[1] for v in whole[0]}.difference(v[1] for v in versions):
                if (gone := self._dirs.pop(d, None)) is not None:
                    self._forget(d, gone[1].keys())
        self._kinds[kind] = (versions, out)
        return dict(out)

    def _forget(self, d: str, keys: Iterable[tuple[str, str]]) -> None:
        """Drops the parsed copies of a directory's objects that are gone: pods come and
        go under new names, and an agent keeping every one it ever read would grow
        without end."""
        for _, name in keys:
            self._cache.pop(os.path.join(d, f"{name}.yaml"), None)

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
        directory's mtime; and, once a watcher runs (wait_changed), the count of its
        events under each kind's directory, which also tells apart two writes within
        one tick of the file system's clock."""
        out = []
        wanted = None if kinds is None else set(kinds)
        counts = self._watch.by_kind if self._watch is not None else {}
        for kind, kind_path, mtime in _subdirs(self.root):
            if wanted is not None and kind not in wanted:
                continue
            out.append((kind, mtime, counts.get(kind, 0)))
            out.extend((kind, ns, ns_mtime) for ns, _, ns_mtime in _subdirs(kind_path))
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

    CHANGES = frozenset({"created", "deleted", "moved", "closed"})
    # What changes an object: a file renamed into place (every write here), or created
    # and written and closed (another writer), or deleted; a directory made, moved or
    # removed. Not reads: every listing and load opens a file or directory, the
    # datastore's own too, and each open and close would be an event to handle (they
    # took a quarter of an idle agent's CPU under policy churn).
    WATCHED = [FileMovedEvent, FileCreatedEvent, FileClosedEvent, FileDeletedEvent,
               DirMovedEvent, DirCreatedEvent, DirDeletedEvent]

    def __init__(self, root: Path):
        self.root = root
        self.events = 0
        self.by_kind: dict[str, int] = {}  # events under each kind's directory
        self.by_dir: dict[tuple[str, ...], int] = {}  # and each (kind, namespace)'s
        self._cond = threading.Condition()
        self._observer = Observer()
        self._observer.daemon = True
        self._observer.schedule(self, str(root), recursive=True, event_filter=self.WATCHED)
        self._observer.start()

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in self.CHANGES:
            return  # opened and closed: reads, the datastore's own among them
        where = set()
        for path in (event.src_path, getattr(event, "dest_path", "")):
            try:
                parts = Path(os.fsdecode(path)).relative_to(self.root).parts
            except ValueError:
                continue
            # Only an object's file or a directory: a write's temporary file (made,
            # closed, renamed from) and the writers' lock are none, and waking every
            # reader for each of them made a policy change cost the agent up to four
            # syncs, each reading a 1,000-policy directory again.
            if parts and (event.is_directory or is_object_file(parts[-1])):
                where.add(parts[:2])
        if not where:
            return
        with self._cond:
            for parts in where:
                self.by_kind[parts[0]] = self.by_kind.get(parts[0], 0) + 1
                if len(parts) == 2:
                    self.by_dir[parts] = self.by_dir.get(parts, 0) + 1
            self.events += 1
            self._cond.notify_all()

    def wait(self, seen: int, timeout: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.events != seen, timeout)

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)
