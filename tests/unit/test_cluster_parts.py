"""`cilia cluster`'s pure parts: pins, images, certificates, the e2e summary."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from cilia.cluster import images, upstream
from cilia.cluster.pki import Pki

REPO = Path(__file__).resolve().parents[2]


def test_pins_agree_with_the_wrapper_modules():
    """pins.env is what the README and the images name; the go.mod files are what the
    build uses. They must say the same versions."""
    pins = upstream.pins()
    k8s = (upstream.UPSTREAM_DIR / "kubernetes" / "go.mod").read_text()
    assert re.search(rf"^\s*(require )?k8s\.io/kubernetes {pins['KUBERNETES_VERSION']}$", k8s,
                     re.M)
    staging = pins["KUBERNETES_VERSION"].replace("v1.", "v0.")
    replaced = re.findall(r"^\s+(k8s\.io/\S+) => \S+ (\S+)$", k8s, re.M)
    assert len(replaced) > 25
    assert {v for _, v in replaced} == {staging}
    etcd = (upstream.UPSTREAM_DIR / "etcd" / "go.mod").read_text()
    assert set(re.findall(r"go\.etcd\.io/etcd/\S+ (v[\d.]+)", etcd)) == {pins["ETCD_VERSION"]}
    for mod in ("kubernetes", "etcd"):
        assert (upstream.UPSTREAM_DIR / mod / "go.sum").stat().st_size > 0


def test_build_key_names_the_pins(tmp_path):
    """The cache directory is keyed by the pins: same pins, same directory."""
    out = subprocess.run(["bash", str(upstream.BUILD_SCRIPT), "--dir"], capture_output=True,
                         text=True, check=True, env={"CILIA_CACHE": str(tmp_path),
                                                     "PATH": "/usr/bin:/bin"})
    path = Path(out.stdout.strip())
    assert path.parent.parent == tmp_path / "upstream" and path.name == "bin"
    assert re.fullmatch(r"[0-9a-f]{12}", path.parent.name)


def _members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_image_archive_is_a_deterministic_oci_layout(tmp_path):
    binary = tmp_path / "hello"
    binary.write_bytes(b"\x7fELF not really")
    spec = images.ImageSpec("registry.example/hello:1.0", {"/hello": binary}, ["/hello"],
                            busybox=images.BUSYBOX.exists())
    a = images.build_archive(spec, tmp_path / "a.tar")
    b = images.build_archive(spec, tmp_path / "b.tar")
    assert a.read_bytes() == b.read_bytes()
    files = _members(a)
    index = json.loads(files["index.json"])
    desc = index["manifests"][0]
    assert desc["annotations"]["io.containerd.image.name"] == "registry.example/hello:1.0"
    for name, data in files.items():
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1]
    manifest = json.loads(files["blobs/sha256/" + desc["digest"].split(":")[1]])
    config = json.loads(files["blobs/sha256/" + manifest["config"]["digest"].split(":")[1]])
    assert config["config"]["Entrypoint"] == ["/hello"]
    layer = files["blobs/sha256/" + manifest["layers"][0]["digest"].split(":")[1]]
    (tmp_path / "layer.tar").write_bytes(layer)
    with tarfile.open(tmp_path / "layer.tar") as tar:
        names = tar.getnames()
        assert "hello" in names and "etc/passwd" in names
        assert all(m.mtime == 0 and m.uid == 0 for m in tar.getmembers())


def test_cluster_images_use_the_names_the_e2e_framework_asks_for(tmp_path):
    pins = upstream.pins()
    names = {s.name for s in images.cluster_images(tmp_path, pins)}
    assert f"registry.k8s.io/pause:{pins['PAUSE_VERSION']}" in names
    assert f"registry.k8s.io/e2e-test-images/agnhost:{pins['AGNHOST_VERSION']}" in names


@pytest.mark.skipif(subprocess.run(["which", "openssl"], capture_output=True).returncode != 0,
                    reason="needs the openssl command")
def test_pki_issues_client_certs_with_groups(tmp_path):
    pki = Pki(tmp_path / "pki")
    pki.init()
    cert = pki.issue("node", "system:node:n1", groups=("system:nodes",), ips=("10.0.0.1",),
                     server=True)
    text = subprocess.run(["openssl", "x509", "-in", str(cert.cert), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    assert "O = system:nodes" in text and "CN = system:node:n1" in text
    assert "IP Address:10.0.0.1" in text
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(pki.ca.cert), str(cert.cert)],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    assert oct(cert.key.stat().st_mode & 0o777) == "0o600"
    again = pki.issue("node", "system:node:n1", groups=("system:nodes",))
    assert again.cert.read_bytes() == cert.cert.read_bytes()


def test_junit_summary_counts_only_the_suite(tmp_path):
    report = tmp_path / "junit.xml"
    report.write_text("""<testsuites><testsuite>
<testcase name="[It] a [Feature:NetworkPolicy]"></testcase>
<testcase name="[It] b [Feature:NetworkPolicy]"><failure message="x"/></testcase>
<testcase name="[It] c SCTP [Feature:NetworkPolicy]"><skipped/></testcase>
<testcase name="[It] unrelated"><skipped/></testcase>
<testcase name="[SynchronizedBeforeSuite]"></testcase>
</testsuite></testsuites>""")
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "junit_summary.py"), "netpol",
                          str(report), r"\[Feature:NetworkPolicy\]"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "netpol: 1 passed, 1 failed, 1 skipped"
