"""cilia/cluster/images.py: ELF closures, Debian tools in images, the e2e images' names."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import tarfile
from pathlib import Path

import pytest

from cilia.cluster import images, upstream

LIBDIR = images.LIB_DIRS[1]  # /usr/lib/<triplet>


def make_elf(interp: str | None = None, needed: tuple[str, ...] = (),
             runpath: str | None = None) -> bytes:
    """A minimal 64-bit little-endian ELF file: PT_LOAD over the whole file, PT_INTERP,
    PT_DYNAMIC with DT_NEEDED, DT_RUNPATH and DT_STRTAB (a virtual address, as in real
    files, so the reader must map it through PT_LOAD)."""
    vaddr = 0x400000
    nph = 1 + (interp is not None) + 1
    body_off = 64 + 56 * nph
    interp_bytes = (interp.encode() + b"\0") if interp else b""
    strtab = b"\0"
    offsets = []
    for s in needed + ((runpath,) if runpath else ()):
        offsets.append(len(strtab))
        strtab += s.encode() + b"\0"
    strtab_off = body_off + len(interp_bytes)
    dyn_off = (strtab_off + len(strtab) + 7) & ~7
    dyn = b"".join(struct.pack("<qQ", 1, o) for o in offsets[:len(needed)])
    if runpath:
        dyn += struct.pack("<qQ", 29, offsets[-1])
    dyn += struct.pack("<qQ", 5, vaddr + strtab_off) + struct.pack("<qQ", 0, 0)
    total = dyn_off + len(dyn)
    ph = struct.pack("<IIQQQQQQ", 1, 5, 0, vaddr, vaddr, total, total, 0x1000)
    if interp:
        ph += struct.pack("<IIQQQQQQ", 3, 4, body_off, vaddr + body_off, vaddr + body_off,
                          len(interp_bytes), len(interp_bytes), 1)
    ph += struct.pack("<IIQQQQQQ", 2, 6, dyn_off, vaddr + dyn_off, vaddr + dyn_off,
                      len(dyn), len(dyn), 8)
    header = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + b"\0" * 9, 3, 62, 1,
                         0, 64, 0, 0, 64, 56, nph, 64, 0, 0)
    out = bytearray(header + ph + interp_bytes + strtab)
    out += b"\0" * (dyn_off - len(out)) + dyn
    return bytes(out)


def put(root: Path, path: str, data: bytes) -> Path:
    p = root / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def layer_of(archive: Path) -> tarfile.TarFile:
    with tarfile.open(archive) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    index = json.loads(files["index.json"])
    manifest = json.loads(files["blobs/sha256/" + index["manifests"][0]["digest"][7:]])
    layer = files["blobs/sha256/" + manifest["layers"][0]["digest"][7:]]
    out = archive.with_suffix(".layer.tar")
    out.write_bytes(layer)
    return tarfile.open(out)


def test_read_elf_finds_loader_needed_and_runpath():
    data = make_elf("/lib64/ld-test.so.2", ("liba.so.1", "libc.so.6"), "$ORIGIN/../lib")
    info = images.read_elf(data)
    assert info.interpreter == "/lib64/ld-test.so.2"
    assert info.needed == ["liba.so.1", "libc.so.6"]
    assert info.runpath == ["$ORIGIN/../lib"]
    static = images.read_elf(make_elf())
    assert static.interpreter is None and static.needed == []
    assert images.read_elf(b"#!/bin/sh\necho hi\n") is None


def test_read_elf_agrees_with_the_machines_dynamic_binaries():
    """On a real binary (curl or Python), what readelf -d says."""
    binary = next((Path(p) for p in ("/usr/bin/curl", "/usr/bin/python3")
                   if Path(p).is_file()), None)
    if binary is None or shutil.which("readelf") is None:
        pytest.skip("needs readelf and a dynamically linked /usr/bin/curl or python3")
    info = images.read_elf(binary.read_bytes())
    if info is None or info.interpreter is None:
        pytest.skip(f"{binary} is not a dynamic ELF here")
    out = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True,
                         check=True).stdout
    assert info.needed == re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)


def test_elf_closure_follows_libraries_and_prefers_the_first_root(tmp_path):
    host, deb = tmp_path / "host", tmp_path / "deb"
    put(host, "/lib64/ld-test.so.2", make_elf())
    put(host, f"{LIBDIR}/libc.so.6", make_elf(None, ("ld-test.so.2",)))
    put(host, f"{LIBDIR}/ld-test.so.2", make_elf())
    put(deb, f"{LIBDIR}/libc.so.6", b"not this one: the first root wins")
    put(deb, f"{LIBDIR}/libtool.so.1", make_elf(None, ("libc.so.6",)))
    put(deb, "/opt/tool/lib/libprivate.so", make_elf(None, ("libc.so.6",)))
    tool = put(deb, "/opt/tool/bin/tool", make_elf("/lib64/ld-test.so.2",
                                                   ("libtool.so.1", "libprivate.so"),
                                                   "$ORIGIN/../lib"))
    closure = images.elf_closure({"/opt/tool/bin/tool": tool}, [host, deb])
    assert closure == {
        "/lib64/ld-test.so.2": host / "lib64/ld-test.so.2",
        f"{LIBDIR}/libtool.so.1": deb / LIBDIR.lstrip("/") / "libtool.so.1",
        "/opt/tool/lib/libprivate.so": deb / "opt/tool/lib/libprivate.so",
        f"{LIBDIR}/libc.so.6": host / LIBDIR.lstrip("/") / "libc.so.6",
        f"{LIBDIR}/ld-test.so.2": host / LIBDIR.lstrip("/") / "ld-test.so.2",
    }
    lonely = put(deb, "/usr/bin/lonely", make_elf("/lib64/ld-test.so.2", ("libnone.so.9",)))
    with pytest.raises(images.ImageError, match="libnone.so.9"):
        images.elf_closure({"/usr/bin/lonely": lonely}, [host, deb])


@pytest.fixture
def fake_tools(monkeypatch, tmp_path):
    """Two tools this machine lacks (their Debian package is 'fetched' as a directory)
    whose loader and libc are on this machine only in a fake root: the host root "/" is
    tried first and has none of these paths."""
    deb = tmp_path / "deb"
    put(deb, "/lib64/ld-cilia-test.so.2", make_elf())
    put(deb, f"{LIBDIR}/libcilia-test-c.so.6", make_elf())
    put(deb, "/usr/bin/cilia-test-nc", make_elf("/lib64/ld-cilia-test.so.2",
                                                ("libcilia-test-c.so.6",)))
    put(deb, "/usr/bin/cilia-test-dig", make_elf("/lib64/ld-cilia-test.so.2",
                                                 ("libcilia-test-c.so.6",)))
    monkeypatch.setattr(images, "TOOLS", {
        "nc": images.Tool("nc", "cilia-test-netcat", "/usr/bin/cilia-test-nc", "/usr/bin/nc"),
        "dig": images.Tool("dig", "cilia-test-dnsutils", "/usr/bin/cilia-test-dig",
                           "/usr/bin/dig"),
    })
    asked = []

    def fetch(packages, cache):
        asked.append(list(packages))
        return deb

    return deb, fetch, asked


def test_tools_this_machine_lacks_come_from_their_packages(fake_tools):
    deb, fetch, asked = fake_tools
    files, origin, missing = images.resolve_tools(("nc", "dig"), fetch=fetch)
    assert asked == [["cilia-test-dnsutils", "cilia-test-netcat"]]
    assert missing == {}
    assert origin == {"nc": "Debian package cilia-test-netcat",
                      "dig": "Debian package cilia-test-dnsutils"}
    assert files["/usr/bin/nc"] == deb / "usr/bin/cilia-test-nc"
    assert files["/lib64/ld-cilia-test.so.2"] == deb / "lib64/ld-cilia-test.so.2"
    libc = f"{LIBDIR}/libcilia-test-c.so.6"
    assert files[libc] == deb / libc.lstrip("/")


@pytest.mark.skipif(not images.BUSYBOX.exists(), reason="needs Debian's busybox-static")
def test_image_with_tools_and_busybox_is_deterministic(fake_tools, tmp_path):
    deb, fetch, _ = fake_tools
    spec = images.ImageSpec("registry.example/tools:1.0", {}, ["/bin/sh"], busybox=True,
                            tools=("nc", "dig"), links={"/agnhost-2": "agnhost"},
                            dirs=("/uploads",), users=("u:x:1000:1000::/:/bin/sh",),
                            groups=("g:x:50000:u",))
    a = images.build_archive(spec, tmp_path / "a.tar", fetch=fetch)
    b = images.build_archive(spec, tmp_path / "b.tar", fetch=fetch)
    assert a.read_bytes() == b.read_bytes()
    with layer_of(a) as layer:
        members = {m.name: m for m in layer.getmembers()}
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members.values())
        names = list(members)
        assert names == sorted(n for n in names if members[n].isdir()) + sorted(
            n for n in names if not members[n].isdir())
        # The tool wins over busybox's applet of the same name, which stays elsewhere.
        assert members["usr/bin/nc"].isfile()
        nc = layer.extractfile("usr/bin/nc").read()
        assert nc == (deb / "usr/bin/cilia-test-nc").read_bytes()
        assert members["bin/sh"].issym() and members["bin/sh"].linkname == "busybox"
        assert members["usr/bin/seq"].issym() and members["usr/bin/seq"].linkname == "/bin/busybox"
        assert members["lib64/ld-cilia-test.so.2"].isfile()
        assert members["agnhost-2"].linkname == "agnhost" and members["uploads"].isdir()
        assert b"hosts: files dns" in layer.extractfile("etc/nsswitch.conf").read()
        assert b"u:x:1000:" in layer.extractfile("etc/passwd").read()
        assert b"g:x:50000:u" in layer.extractfile("etc/group").read()
        about = json.loads(layer.extractfile("etc/cilia-image.json").read())
    assert about["tools"] == {"nc": "Debian package cilia-test-netcat",
                              "dig": "Debian package cilia-test-dnsutils"}
    assert "missing" not in about and a.stat().st_mtime > 0


def test_an_image_whose_tools_cannot_be_had_is_made_without_them_and_left_stale(
        fake_tools, tmp_path, capsys):
    def no_network(packages, cache):
        raise images.ImageError("apt-get download: Temporary failure resolving")

    spec = images.ImageSpec("registry.example/tools:1.0", {}, ["/x"], tools=("nc",))
    out = images.build_archive(spec, tmp_path / "a.tar", fetch=no_network)
    assert out.stat().st_mtime == 0  # older than any input: the next `up` makes it again
    assert "made without nc" in capsys.readouterr().err
    with layer_of(out) as layer:
        assert "usr/bin/nc" not in layer.getnames()
        about = json.loads(layer.extractfile("etc/cilia-image.json").read())
    assert "Temporary failure" in about["missing"]["nc"]


def test_cluster_images_are_the_ones_the_pinned_e2e_framework_asks_for(tmp_path):
    pins = upstream.pins()
    specs = {s.name: s for s in images.cluster_images(tmp_path, pins)}
    reg = images.E2E_REGISTRY
    agnhost = specs[f"{reg}/agnhost:{pins['AGNHOST_VERSION']}"]
    assert {"curl", "nc", "dig", "nslookup", "getent"} <= set(agnhost.tools)
    assert agnhost.busybox and agnhost.links["/agnhost-2"] == "agnhost"
    dnsutils = specs[f"{reg}/jessie-dnsutils:{images.JESSIE_DNSUTILS_TAG}"]
    assert {"dig", "getent"} <= set(dnsutils.tools) and dnsutils.busybox
    for name in (f"{reg}/nginx:{images.NGINX_TAG}", f"{reg}/httpd:{images.HTTPD_TAG}",
                 f"{reg}/busybox:{images.BUSYBOX_TAG}"):
        assert specs[name].busybox
    # Every image carries its recipe: a cached archive older than this file is remade.
    for spec in specs.values():
        assert spec.files["/etc/cilia-image/images.py"] == Path(images.__file__).resolve()
    for spec in specs.values():
        assert set(spec.tools) <= set(images.TOOLS)
    # The tags are those of the pinned Kubernetes' test/utils/image/manifest.go, where
    # its module is in the Go module cache (after `packaging/upstream/build.sh`).
    manifest = (images._go_mod_cache() / f"k8s.io/kubernetes@{pins['KUBERNETES_VERSION']}"
                / "test/utils/image/manifest.go")
    if manifest.is_file():
        text = manifest.read_text()
        for image, tag in (("agnhost", pins["AGNHOST_VERSION"]),
                           ("jessie-dnsutils", images.JESSIE_DNSUTILS_TAG),
                           ("nginx", images.NGINX_TAG), ("httpd", images.HTTPD_TAG),
                           ("busybox", images.BUSYBOX_TAG)):
            assert f'"{image}", "{tag}"}}' in text, image


@pytest.mark.skipif(os.geteuid() != 0 or not images.BUSYBOX.exists()
                    or not Path("/usr/bin/curl").is_file() or shutil.which("chroot") is None
                    or shutil.which("unshare") is None,
                    reason="runs the image's shell, curl and getent in a chroot with /proc: "
                           "needs root, unshare, busybox-static and curl")
def test_the_machines_tools_run_inside_the_image_and_win_over_busybox(tmp_path):
    """With /proc mounted, as in a container, Debian's busybox sh would run its own applet
    for a name it knows before any PATH lookup: the image's sh is dash, so the tool in
    PATH runs (here a script named wget; in the e2e images OpenBSD nc, bind's nslookup)."""
    def no_fetch(packages, cache):
        raise images.ImageError("not in this test")

    spec = images.ImageSpec("registry.example/curl:1.0", {}, ["/bin/sh"], busybox=True,
                            tools=("sh", "curl", "getent"),
                            data={"/usr/local/bin/wget": b"#!/bin/sh\necho not-busybox\n"})
    archive = images.build_archive(spec, tmp_path / "curl.tar", fetch=no_fetch)
    root = tmp_path / "root"
    with layer_of(archive) as layer:
        layer.extractall(root, filter="tar") if hasattr(tarfile, "data_filter") \
            else layer.extractall(root)
    (root / "usr/local/bin/wget").chmod(0o755)
    (root / "proc").mkdir(exist_ok=True)
    (root / "etc/hosts").write_text("127.0.0.1 localhost cilia-test-host\n")
    out = subprocess.run(["unshare", "--mount", "--pid", "--fork", f"--mount-proc={root}/proc",
                          "chroot", str(root), "/bin/sh", "-c",
                          "curl --version && getent hosts cilia-test-host && seq 1 2 && wget"],
                         capture_output=True, text=True, timeout=60,
                         env={"PATH": spec.env[0].split("=", 1)[1]})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("curl ") and "cilia-test-host" in out.stdout
    assert out.stdout.splitlines()[-3:] == ["1", "2", "not-busybox"]
