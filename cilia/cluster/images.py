"""Container images without a registry: OCI archives made here from local binaries.

No registry can be reached, so every image a pod needs is made on this machine under
the exact name a manifest or the e2e framework asks for, and imported into each node's
containerd. An image is one uncompressed layer holding static binaries (and busybox
where a shell is expected), so it needs no base image. Archives are deterministic
(fixed mtimes and owners), so the same inputs give the same digest and importing again
changes nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static
# The applets a test image's shell users reach for; each becomes a link to busybox.
BUSYBOX_APPLETS = ("sh", "ls", "cat", "echo", "sleep", "wget", "nc", "ps", "hostname", "env",
                   "grep", "ip", "ping", "nslookup", "test", "true", "false", "mkdir", "rm",
                   "touch", "date", "id", "kill", "head", "tail", "sed", "awk", "cp", "mv")


@dataclass
class ImageSpec:
    name: str  # full reference, e.g. registry.k8s.io/pause:3.10.1
    files: dict[str, Path]  # path in the image -> file on this machine
    entrypoint: list[str]
    cmd: list[str] = field(default_factory=list)
    user: str = ""
    busybox: bool = False
    env: list[str] = field(default_factory=lambda: [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])


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


def _layer(spec: ImageSpec) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = {"bin", "etc", "tmp"}
        for path in spec.files:
            parts = path.strip("/").split("/")[:-1]
            dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        for d in sorted(dirs):
            _add(tar, d, directory=True, mode=0o1777 if d == "tmp" else 0o755)
        _add(tar, "etc/passwd", b"root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n",
             mode=0o644)
        _add(tar, "etc/group", b"root:x:0:\nnogroup:x:65534:\n", mode=0o644)
        if spec.busybox:
            _add(tar, "bin/busybox", BUSYBOX.read_bytes())
            for applet in BUSYBOX_APPLETS:
                _add(tar, f"bin/{applet}", link="busybox")
        for path, src in sorted(spec.files.items()):
            _add(tar, path.strip("/"), src.read_bytes())
    return buf.getvalue()


def _blob(blobs: dict[str, bytes], data: bytes) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"digest": digest, "size": len(data)}


def build_archive(spec: ImageSpec, out: Path) -> Path:
    """Writes an OCI image layout archive for spec; returns out."""
    blobs: dict[str, bytes] = {}
    layer = _layer(spec)
    layer_desc = {"mediaType": "application/vnd.oci.image.layer.v1.tar", **_blob(blobs, layer)}
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": spec.entrypoint, "Cmd": spec.cmd or None, "Env": spec.env,
                   "User": spec.user, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
    }
    config_desc = {"mediaType": "application/vnd.oci.image.config.v1+json",
                   **_blob(blobs, json.dumps(config, sort_keys=True).encode())}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config_desc, "layers": [layer_desc]}
    manifest_desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                     **_blob(blobs, json.dumps(manifest, sort_keys=True).encode())}
    tag = spec.name.rsplit(":", 1)[1]
    manifest_desc["annotations"] = {"io.containerd.image.name": spec.name,
                                    "org.opencontainers.image.ref.name": tag}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [manifest_desc]}
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode(), 0o644)
        _add(tar, "index.json", json.dumps(index, sort_keys=True).encode(), 0o644)
        _add(tar, "blobs", directory=True)
        _add(tar, "blobs/sha256", directory=True)
        for digest, data in sorted(blobs.items()):
            _add(tar, f"blobs/sha256/{digest.split(':', 1)[1]}", data, 0o644)
    shutil.move(tmp, out)
    return out


def cluster_images(bin_dir: Path, pins: dict[str, str]) -> list[ImageSpec]:
    """Every image the cluster's pods and the upstream e2e suites need."""
    return [
        ImageSpec(f"registry.k8s.io/pause:{pins['PAUSE_VERSION']}",
                  {"/pause": bin_dir / "pause"}, ["/pause"], user="65535:65535"),
        ImageSpec(f"registry.k8s.io/e2e-test-images/agnhost:{pins['AGNHOST_VERSION']}",
                  {"/agnhost": bin_dir / "agnhost"}, ["/agnhost"], cmd=["pause"],
                  busybox=True),
        ImageSpec(f"registry.k8s.io/coredns/coredns:{pins['COREDNS_VERSION']}",
                  {"/coredns": bin_dir / "coredns"}, ["/coredns"]),
    ]
