"""Container images without a registry: OCI archives made here from local binaries.

No registry can be reached, so every image a pod needs is made on this machine under
the exact name a manifest or the e2e framework asks for, and imported into each node's
containerd. An image is one uncompressed layer, with no base image: static binaries
(upstream's, built here), busybox with all its applets where a shell is expected, and
the Debian tools the e2e suites exec in their pods (curl, OpenBSD nc, dig, nslookup,
getent, ...). Debian's tools are dynamically linked, so each comes with its dynamic
loader and the closure of its shared libraries, found by reading the ELF files
(PT_INTERP, DT_NEEDED, DT_RUNPATH) and looked up where glibc's loader looks. A tool
comes from this machine when it is installed here, else from its Debian package
(`apt-get download` of it and of its dependencies this machine lacks, kept in
`$CILIA_CACHE/images/debs`, unpacked with `dpkg-deb -x`): nothing is installed on the
machine to make an image. Archives are deterministic (fixed mtimes and owners, sorted
entries), so the same inputs give the same digest and importing again changes nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import posixpath
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static
# The applets linked when busybox cannot list its own (`busybox --list-full`).
BUSYBOX_APPLETS = ("sh", "ls", "cat", "echo", "sleep", "wget", "nc", "ps", "hostname", "env",
                   "grep", "ip", "ping", "nslookup", "test", "true", "false", "mkdir", "rm",
                   "touch", "date", "id", "kill", "head", "tail", "sed", "awk", "cp", "mv",
                   "seq", "dd", "cut", "tr", "sort", "uniq", "wc", "xargs", "tee", "printf")

# The tags of the e2e images the framework of the pinned Kubernetes asks for
# (k8s.io/kubernetes test/utils/image/manifest.go), made here as stand-ins.
JESSIE_DNSUTILS_TAG = "1.7"
NGINX_TAG = "1.14-4"
HTTPD_TAG = "2.4.38-4"
BUSYBOX_TAG = "1.37.0-1"
E2E_REGISTRY = "registry.k8s.io/e2e-test-images"
# The agnhost tag of sigs.k8s.io/network-policy-api's conformance pods (its
# conformance/base/manifests.yaml, at packaging/upstream/suites.env's version): another
# name of the same agnhost image.
NETWORK_POLICY_API_AGNHOST_TAG = "2.45"

_TRIPLET = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(
    platform.machine(), f"{platform.machine()}-linux-gnu")
# Where glibc's loader looks when there is no ld.so.cache (`ld.so --help`), after RUNPATH.
LIB_DIRS = (f"/lib/{_TRIPLET}", f"/usr/lib/{_TRIPLET}", "/lib64", "/usr/lib64", "/lib", "/usr/lib")

# glibc >= 2.34 has the files and dns NSS modules built in: this file is all getent and
# curl's getaddrinfo need to read the kubelet's /etc/hosts, then DNS.
NSSWITCH = b"passwd: files\ngroup: files\nhosts: files dns\nnetworks: files\n"


class ImageError(RuntimeError):
    """An image cannot be made; the message says why."""


@dataclass(frozen=True)
class Tool:
    """A program from a Debian package, put in an image with what it links."""
    name: str
    package: str  # the Debian package that ships it
    path: str  # where the package installs it
    dest: str  # where it goes in the image


TOOLS = {t.name: t for t in (
    Tool("curl", "curl", "/usr/bin/curl", "/usr/bin/curl"),
    # OpenBSD's nc, as upstream's agnhost has: the suite runs `nc -v -t -w 2` and `nc -u`,
    # which busybox's nc does not know.
    Tool("nc", "netcat-openbsd", "/bin/nc.openbsd", "/usr/bin/nc"),
    Tool("dig", "bind9-dnsutils", "/usr/bin/dig", "/usr/bin/dig"),
    Tool("nslookup", "bind9-dnsutils", "/usr/bin/nslookup", "/usr/bin/nslookup"),
    Tool("host", "bind9-host", "/usr/bin/host", "/usr/bin/host"),
    Tool("getent", "libc-bin", "/usr/bin/getent", "/usr/bin/getent"),
    Tool("ss", "iproute2", "/bin/ss", "/usr/bin/ss"),
    Tool("bash", "bash", "/bin/bash", "/bin/bash"),
    # Debian's busybox-static is a "standalone shell": its sh runs its own applet for any
    # name it knows (nc, nslookup, wget, ...) before looking at PATH, so the real tools
    # above would never run from `sh -c`. Where an image has them, /bin/sh is Debian's
    # dash (as on Debian, and jessie-dnsutils), which looks commands up in PATH.
    Tool("sh", "dash", "/bin/dash", "/bin/sh"),
)}
# What upstream's agnhost image adds to its alpine base (test/images/agnhost/Dockerfile:
# bind-tools, curl, netcat-openbsd, iproute2, bash) that the e2e suites exec; and what
# the DNS specs' jessie-dnsutils querier runs (dig, getent).
AGNHOST_TOOLS = ("sh", "curl", "nc", "dig", "nslookup", "host", "getent", "ss", "bash")
DNSUTILS_TOOLS = ("sh", "dig", "nslookup", "host", "getent", "bash")


@dataclass
class ImageSpec:
    name: str  # full reference, e.g. registry.k8s.io/pause:3.10.1
    files: dict[str, Path]  # path in the image -> file on this machine
    entrypoint: list[str]
    cmd: list[str] = field(default_factory=list)
    user: str = ""
    busybox: bool = False  # busybox and a link for each of its applets
    env: list[str] = field(default_factory=lambda: [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])
    tools: tuple[str, ...] = ()  # names in TOOLS, resolved when the archive is built
    links: dict[str, str] = field(default_factory=dict)  # path in the image -> target
    dirs: tuple[str, ...] = ()  # more (empty) directories
    data: dict[str, bytes] = field(default_factory=dict)  # path in the image -> content
    users: tuple[str, ...] = ()  # more /etc/passwd lines
    groups: tuple[str, ...] = ()  # more /etc/group lines
    also: tuple[str, ...] = ()  # more full references of the same image, imported with it


# ---- ELF: what a dynamically linked program needs ------------------------------------


@dataclass
class ElfInfo:
    interpreter: str | None  # PT_INTERP: the dynamic loader, None when static
    needed: list[str]  # DT_NEEDED sonames, in order
    runpath: list[str]  # DT_RUNPATH (or DT_RPATH) directories, $ORIGIN unexpanded


def read_elf(data: bytes) -> ElfInfo | None:
    """The dynamic-linking facts of a 64-bit little-endian ELF file; None if data is not
    one (a script, a text file)."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads, interp, dynamic = [], None, None
    for i in range(phnum):
        off = phoff + i * phentsize
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, off)
        if p_type == 1:  # PT_LOAD
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == 3:  # PT_INTERP
            interp = data[p_offset:p_offset + p_filesz].split(b"\0", 1)[0].decode()
        elif p_type == 2:  # PT_DYNAMIC
            dynamic = (p_offset, p_filesz)
    needed_offsets, runpath_offsets, rpath_offsets, strtab = [], [], [], None
    if dynamic is not None:
        for off in range(dynamic[0], dynamic[0] + dynamic[1] - 15, 16):
            tag, val = struct.unpack_from("<qQ", data, off)
            if tag == 0:  # DT_NULL
                break
            if tag == 1:
                needed_offsets.append(val)
            elif tag == 5:
                strtab = val
            elif tag == 29:
                runpath_offsets.append(val)
            elif tag == 15:
                rpath_offsets.append(val)
    needed, runpath = [], []
    if strtab is not None:
        base = next((p_offset + strtab - p_vaddr for p_vaddr, p_offset, p_filesz in loads
                     if p_vaddr <= strtab < p_vaddr + p_filesz), None)
        if base is None:
            raise ImageError("ELF file's string table is outside its loaded segments")

        def string(at: int) -> str:
            end = data.index(b"\0", base + at)
            return data[base + at:end].decode()

        needed = [string(o) for o in needed_offsets]
        # DT_RPATH is ignored by the loader when DT_RUNPATH is present.
        for o in runpath_offsets or rpath_offsets:
            runpath.extend(d for d in string(o).split(":") if d)
    return ElfInfo(interp, needed, runpath)


def _lookup(image_path: str, roots: list[Path]) -> Path | None:
    for root in roots:
        candidate = root / image_path.lstrip("/")
        if candidate.is_file():
            return candidate
    return None


def elf_closure(programs: dict[str, Path], roots: list[Path]) -> dict[str, Path]:
    """Every file that programs (image path -> file) need to run: their dynamic loader and
    their shared libraries, recursively, as image path -> file. A library is looked up as
    glibc's loader would (the binary's RUNPATH, then LIB_DIRS) in each of roots in turn,
    so the first root wins. Raises ImageError naming what cannot be found."""
    out: dict[str, Path] = {}
    found: dict[str, str] = {}  # soname -> image path
    todo = sorted(programs.items())
    while todo:
        image_path, src = todo.pop(0)
        info = read_elf(src.read_bytes())
        if info is None:
            continue
        if info.interpreter and info.interpreter not in out:
            loader = _lookup(info.interpreter, roots)
            if loader is None:
                raise ImageError(f"{src}: its dynamic loader {info.interpreter} is not on "
                                 "this machine")
            out[info.interpreter] = loader
        origin = str(PurePosixPath(image_path).parent)
        dirs = [d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin)
                for d in info.runpath] + list(LIB_DIRS)
        for soname in info.needed:
            if soname in found:
                continue
            for d in dirs:
                lib_path = posixpath.normpath(f"{d}/{soname}")
                lib = _lookup(lib_path, roots)
                if lib is not None:
                    found[soname] = lib_path
                    out[lib_path] = lib
                    todo.append((lib_path, lib))
                    break
            else:
                raise ImageError(f"{src} ({image_path}) needs {soname}, found in none of "
                                 f"{', '.join(map(str, roots))}")
    return out


# ---- Debian packages for the tools this machine lacks --------------------------------


def _cache_dir() -> Path:
    return Path(os.environ.get("CILIA_CACHE", "/var/cache/cilia")) / "images"


def _installed_packages() -> set[str]:
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Status}\n"],
                         capture_output=True, text=True, check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.endswith(" installed")}


def _apt(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False,
                          timeout=600)


def _closure(packages: list[str]) -> list[str]:
    """The packages and everything they depend on (Depends and Pre-Depends), by apt."""
    args = ["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
            "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", *packages]
    res = _apt(args)
    if res.returncode != 0:
        _apt(["apt-get", "update", "-qq"])
        res = _apt(args)
    if res.returncode != 0:
        raise ImageError(f"apt-cache depends {' '.join(packages)}: {res.stderr.strip()}")
    return sorted({line.strip() for line in res.stdout.splitlines()
                   if line and not line[0].isspace() and not line.startswith("<")})


def debian_root(packages: list[str], cache: Path | None = None) -> Path:
    """A directory holding packages and those of their dependencies this machine lacks,
    unpacked (`dpkg-deb -x`) from debs fetched once with `apt-get download` into
    CACHE/debs. Nothing is installed."""
    debs = (cache or _cache_dir()) / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    installed = _installed_packages()
    wanted = [p for p in _closure(packages) if p not in installed]
    missing = [p for p in wanted if not any(debs.glob(f"{p}_*.deb"))]
    if missing:
        # apt's sandbox user cannot write the cache; the download is of signed packages.
        args = ["apt-get", "download", "-qq", "-o", "APT::Sandbox::User=root", *missing]
        res = _apt(args, cwd=debs)
        if res.returncode != 0:
            _apt(["apt-get", "update", "-qq"])
            res = _apt(args, cwd=debs)
        if res.returncode != 0:
            raise ImageError(f"apt-get download {' '.join(missing)}: {res.stderr.strip()}")
    chosen = [deb for p in wanted for deb in sorted(debs.glob(f"{p}_*.deb"))[-1:]]
    key = hashlib.sha256(" ".join(d.name for d in chosen).encode()).hexdigest()[:12]
    root = debs / f"root-{key}"
    if not root.is_dir():
        tmp = Path(tempfile.mkdtemp(dir=debs, prefix=".root-"))
        for deb in chosen:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True,
                           capture_output=True)
        try:
            tmp.rename(root)
        except OSError:  # made meanwhile by another cluster's bring-up
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _host_file(path: str) -> Path | None:
    """path on this machine, also under the other half of a merged /usr."""
    for p in (path, "/usr" + path if not path.startswith("/usr/") else path[4:]):
        if Path(p).is_file():
            return Path(p)
    return None


def resolve_tools(names: tuple[str, ...], cache: Path | None = None, fetch=debian_root
                  ) -> tuple[dict[str, Path], dict[str, str], dict[str, str]]:
    """The files that put the tools names in an image (each tool at its dest, with its
    loader and libraries), where each tool came from ("this machine" or its Debian
    package), and the tools that cannot be had, with why. A tool this machine lacks
    comes from its package, by fetch(packages, cache) (debian_root)."""
    files: dict[str, Path] = {}
    origin: dict[str, str] = {}
    missing: dict[str, str] = {}
    lacking = sorted({TOOLS[n].package for n in names if _host_file(TOOLS[n].path) is None})
    roots = [Path("/")]
    if lacking:
        try:
            roots.append(fetch(lacking, cache))
        except (ImageError, OSError, subprocess.SubprocessError) as e:
            missing.update({n: f"{TOOLS[n].package}: {e}" for n in names
                            if TOOLS[n].package in lacking})
    for name in names:
        if name in missing:
            continue
        tool = TOOLS[name]
        src = _host_file(tool.path)
        where = "this machine"
        if src is None:
            src = _lookup(tool.path, roots[1:]) or _lookup("/usr" + tool.path, roots[1:])
            where = f"Debian package {tool.package}"
        if src is None:
            missing[name] = f"{tool.package} has no {tool.path}"
            continue
        try:
            needs = elf_closure({tool.dest: src}, roots)
        except (ImageError, OSError) as e:
            missing[name] = str(e)
            continue
        files[tool.dest] = src
        files.update(needs)
        origin[name] = where
    return files, origin, missing


# ---- the archive ---------------------------------------------------------------------


def _add(tar: tarfile.TarFile, name: str, data: bytes | None = None, mode: int = 0o755,
         link: str | None = None, directory: bool = False) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.uid = info.gid = 0
    info.mode = mode
    if directory:
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    elif link is not None:
        info.type = tarfile.SYMTYPE
        info.linkname = link
        tar.addfile(info)
    else:
        info.size = len(data or b"")
        tar.addfile(info, io.BytesIO(data or b""))


def busybox_applets() -> list[str]:
    """Where each of busybox's applets goes (bin/sh, usr/bin/seq, ...), as it says."""
    res = subprocess.run([str(BUSYBOX), "--list-full"], capture_output=True, text=True,
                         check=False)
    listed = [a.strip("/") for a in res.stdout.split()] if res.returncode == 0 else []
    listed = [a for a in listed if a.split("/")[0] in ("bin", "sbin", "usr")]
    return sorted(listed) or [f"bin/{a}" for a in BUSYBOX_APPLETS]


def _layer(spec: ImageSpec, files: dict[str, Path]) -> bytes:
    """The image's one layer: files (image path -> file), spec's links, data and dirs,
    busybox and its applets (where no file is), /etc/passwd, /etc/group."""
    files = {p.strip("/"): src for p, src in files.items()}
    data = {p.strip("/"): d for p, d in spec.data.items()}
    links = {p.strip("/"): t for p, t in spec.links.items()}
    if spec.busybox:
        files.setdefault("bin/busybox", BUSYBOX)
        for applet in busybox_applets():
            if applet not in files and applet not in links and applet not in data:
                target = "busybox" if applet.startswith("bin/") else "/bin/busybox"
                links[applet] = target
    entries: dict[str, tuple] = {}
    for path, src in files.items():
        entries[path] = ("file", src.read_bytes(), 0o755)
    for path, content in data.items():
        entries[path] = ("file", content, 0o644)
    for path, target in links.items():
        entries.setdefault(path, ("link", target))
    entries.setdefault("etc/passwd", ("file", (
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"
        + "".join(f"{u}\n" for u in spec.users)).encode(), 0o644))
    entries.setdefault("etc/group", ("file", (
        "root:x:0:\nnogroup:x:65534:\n" + "".join(f"{g}\n" for g in spec.groups)).encode(),
        0o644))
    dirs = {"bin", "etc", "tmp"} | {d.strip("/") for d in spec.dirs}
    for path in entries:
        parts = path.split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in sorted(dirs):
            _add(tar, d, directory=True, mode=0o1777 if d == "tmp" else 0o755)
        for path, entry in sorted(entries.items()):
            if entry[0] == "link":
                _add(tar, path, link=entry[1])
            else:
                _add(tar, path, entry[1], mode=entry[2])
    return buf.getvalue()


def _blob(blobs: dict[str, bytes], data: bytes) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"digest": digest, "size": len(data)}


def build_archive(spec: ImageSpec, out: Path, cache: Path | None = None,
                  fetch=debian_root) -> Path:
    """Writes an OCI image layout archive for spec; returns out. spec's tools are resolved
    here (see resolve_tools); /etc/cilia-image.json in the image says what it holds and
    where each tool came from."""
    files = dict(spec.files)
    origin: dict[str, str] = {}
    missing: dict[str, str] = {}
    if spec.tools:
        tool_files, origin, missing = resolve_tools(spec.tools, cache, fetch)
        for path, src in tool_files.items():
            files.setdefault(path, src)
    about = {"image": spec.name, "made_by": "cilia/cluster/images.py",
             "busybox": spec.busybox, "tools": origin}
    if missing:
        about["missing"] = missing
        for name, why in sorted(missing.items()):
            print(f"images: {spec.name} is made without {name}: {why}", file=sys.stderr)
    spec = ImageSpec(**{**spec.__dict__, "data": {
        **spec.data,
        "/etc/cilia-image.json": json.dumps(about, indent=1, sort_keys=True).encode() + b"\n"}})
    if spec.tools or spec.busybox:
        spec.data.setdefault("/etc/nsswitch.conf", NSSWITCH)
    blobs: dict[str, bytes] = {}
    layer = _layer(spec, files)
    layer_desc = {"mediaType": "application/vnd.oci.image.layer.v1.tar", **_blob(blobs, layer)}
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": spec.entrypoint or None, "Cmd": spec.cmd or None,
                   "Env": spec.env, "User": spec.user, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
    }
    config_desc = {"mediaType": "application/vnd.oci.image.config.v1+json",
                   **_blob(blobs, json.dumps(config, sort_keys=True).encode())}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config_desc, "layers": [layer_desc]}
    manifest_desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                     **_blob(blobs, json.dumps(manifest, sort_keys=True).encode())}
    # One entry of the index a name: `ctr images import` makes each of them.
    named = [{**manifest_desc, "annotations": {
        "io.containerd.image.name": name,
        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]}}
        for name in (spec.name, *spec.also)]
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": named}
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode(), 0o644)
        _add(tar, "index.json", json.dumps(index, sort_keys=True).encode(), 0o644)
        _add(tar, "blobs", directory=True)
        _add(tar, "blobs/sha256", directory=True)
        for digest, data in sorted(blobs.items()):
            _add(tar, f"blobs/sha256/{digest.split(':', 1)[1]}", data, 0o644)
    shutil.move(tmp, out)
    if missing:
        # Older than any input: the next cluster up makes it again, and may find them then.
        os.utime(out, (0, 0))
    return out


# ---- the images ----------------------------------------------------------------------


def _go_mod_cache() -> Path:
    cache = Path(os.environ.get("CILIA_CACHE", "/var/cache/cilia"))
    return Path(os.environ.get("GOMODCACHE") or cache / "go-mod")


# This file is in every image: the recipe that made it. The cluster rebuilds an archive
# older than any of its files, so a changed recipe rebuilds every image.
RECIPE = {"/etc/cilia-image/images.py": Path(__file__).resolve()}


def _static_page(title: str) -> bytes:
    return (f"<!DOCTYPE html>\n<html><head><title>{title}</title></head>"
            f"<body><h1>{title}</h1></body></html>\n").encode()


def cluster_images(bin_dir: Path, pins: dict[str, str]) -> list[ImageSpec]:
    """Every image the cluster's pods and the upstream e2e suites need."""
    porter = (_go_mod_cache() / f"k8s.io/kubernetes@{pins['KUBERNETES_VERSION']}"
              / "test/images/agnhost/porter") if "KUBERNETES_VERSION" in pins else None
    agnhost_files = {"/agnhost": bin_dir / "agnhost", **RECIPE}
    # porter's TLS ports read ./localhost.{crt,key} (the Proxy specs' https ports).
    if porter is not None:
        for f in ("localhost.crt", "localhost.key"):
            if (porter / f).is_file():
                agnhost_files[f"/{f}"] = porter / f
    busybox_files = {**RECIPE}
    return [
        ImageSpec(f"registry.k8s.io/pause:{pins['PAUSE_VERSION']}",
                  {"/pause": bin_dir / "pause", **RECIPE}, ["/pause"], user="65535:65535"),
        # Upstream's agnhost (test/images/agnhost/Dockerfile) on alpine with its busybox:
        # agnhost, agnhost-2, the tools below, /uploads (netexec), the porter's
        # certificate, and the user and group the SupplementalGroups specs expect. Also
        # under the tag network-policy-api's conformance pods ask for.
        ImageSpec(f"registry.k8s.io/e2e-test-images/agnhost:{pins['AGNHOST_VERSION']}",
                  agnhost_files, ["/agnhost"], cmd=["pause"], busybox=True,
                  tools=AGNHOST_TOOLS, links={"/agnhost-2": "agnhost"}, dirs=("/uploads",),
                  users=("user-defined-in-image:x:1000:1000::/home/user-defined-in-image:"
                         "/bin/sh",),
                  groups=("user-defined-in-image:x:1000:",
                          "group-defined-in-image:x:50000:user-defined-in-image"),
                  also=(f"{E2E_REGISTRY}/agnhost:{NETWORK_POLICY_API_AGNHOST_TAG}",)),
        ImageSpec(f"registry.k8s.io/coredns/coredns:{pins['COREDNS_VERSION']}",
                  {"/coredns": bin_dir / "coredns", **RECIPE}, ["/coredns"]),
        # The DNS specs' second querier: Debian jessie's dnsutils upstream; here busybox
        # with dig, nslookup, host and getent; the pod gives the command (`sh -c ...`).
        ImageSpec(f"{E2E_REGISTRY}/jessie-dnsutils:{JESSIE_DNSUTILS_TAG}", busybox_files,
                  [], cmd=["/bin/sh"], busybox=True, tools=DNSUTILS_TOOLS),
        # The e2e framework's default Linux test image.
        ImageSpec(f"{E2E_REGISTRY}/busybox:{BUSYBOX_TAG}", busybox_files, [],
                  cmd=["/bin/sh"], busybox=True),
        # Stand-ins for nginx and httpd: busybox's httpd serving a page on port 80, where
        # the specs (EndpointSlice, apps) only need a running web server.
        ImageSpec(f"{E2E_REGISTRY}/nginx:{NGINX_TAG}", busybox_files,
                  ["/usr/sbin/httpd", "-f", "-v", "-p", "80", "-h", "/usr/share/nginx/html"],
                  busybox=True, data={"/usr/share/nginx/html/index.html":
                                      _static_page("Welcome to nginx!")}),
        ImageSpec(f"{E2E_REGISTRY}/httpd:{HTTPD_TAG}", busybox_files,
                  ["/usr/sbin/httpd", "-f", "-v", "-p", "80", "-h", "/usr/local/apache2/htdocs"],
                  busybox=True, data={"/usr/local/apache2/htdocs/index.html":
                                      b"<html><body><h1>It works!</h1></body></html>\n"}),
    ]


if __name__ == "__main__":  # python -m cilia.cluster.images OUT_DIR BIN_DIR: build them all
    from cilia.cluster import upstream

    out_dir, bin_dir = Path(sys.argv[1]), Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    for s in cluster_images(bin_dir, upstream.pins()):
        print(build_archive(s, out_dir / (s.name.replace("/", "_").replace(":", "_") + ".tar")))
