"""The network-policy-api conformance harness (scripts/e2e-upstream.sh network-policy-api):
its `-test.v` log made JUnit and counted, the base manifests less their SCTP servers,
and the agnhost tag its pods ask for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from cilia.cluster import images, upstream

REPO = Path(__file__).resolve().parents[2]
SUMMARY = REPO / "scripts" / "junit_summary.py"
BUILD = REPO / "packaging" / "upstream" / "build.sh"

LOG = """\
=== RUN   TestConformance
    conformance_test.go:64: Running conformance tests with cleanup: true
    suite.go:153: Test Setup: Applying base manifests
=== RUN   TestConformance/CNPAdminTierEgressNamedPort
    suite.go:184: Skipping CNPAdminTierEgressNamedPort: suite does not support NamedPorts
=== RUN   TestConformance/CNPAdminTierEgressTCP
    suite.go:195: Applying base/admin_tier/standard-egress-tcp-rules.yaml
=== RUN   TestConformance/CNPAdminTierEgressTCP/Should_allow
=== RUN   TestConformance/CNPAdminTierEgressTCP/Should_deny
    helper.go:100: FAILED Command was [/agnhost connect --timeout=3s --protocol=tcp 10.0.1.5:80]
    helper.go:107: Expected connection to fail from a/b to 10.0.1.5, but it connected.
=== RUN   TestConformance/CNPAdminTierGress
    helper.go:100: FAILED Command was [/agnhost connect --timeout=3s --protocol=sctp 10.0.1.5:9003]
=== RUN   TestConformance/CNPAdminTierPriorityField
=== NAME  TestConformance/CNPAdminTierEgressTCP
    apply.go:90: cleanup
--- FAIL: TestConformance (42.00s)
    --- SKIP: TestConformance/CNPAdminTierEgressNamedPort (0.00s)
    --- FAIL: TestConformance/CNPAdminTierEgressTCP (20.50s)
        --- PASS: TestConformance/CNPAdminTierEgressTCP/Should_allow (0.50s)
        --- FAIL: TestConformance/CNPAdminTierEgressTCP/Should_deny (20.00s)
    --- FAIL: TestConformance/CNPAdminTierGress (11.00s)
    --- PASS: TestConformance/CNPAdminTierPriorityField (3.25s)
=== RUN   TestConformanceProfiles
--- PASS: TestConformanceProfiles (0.00s)
FAIL
"""


def summarize(tmp_path: Path, log: str, *extra: str) -> tuple[str, str, Path]:
    (tmp_path / "go-test.log").write_text(log)
    junit = tmp_path / "junit.xml"
    subprocess.run([sys.executable, str(SUMMARY), "--go-test", "network-policy-api",
                    str(tmp_path / "go-test.log"), str(junit), *extra], check=True)
    line = subprocess.run([sys.executable, str(SUMMARY), "network-policy-api", str(junit)],
                          check=True, capture_output=True, text=True).stdout.strip()
    failures = subprocess.run([sys.executable, str(SUMMARY), "--failures", str(junit)],
                              check=True, capture_output=True, text=True).stdout
    return line, failures, junit


def test_one_test_is_one_subtest_of_TestConformance(tmp_path):
    line, failures, _ = summarize(
        tmp_path, LOG, "--skipped", "CNPAdminTierEgressSCTP=the kernel has no SCTP")
    # EgressTCP's own cases are not counted; TestConformanceProfiles is another test.
    assert line == "network-policy-api: 1 passed, 2 failed, 2 skipped"
    assert "FAILED: CNPAdminTierEgressTCP (1 case(s) failed: Should deny | failed probes: tcp)" \
        in failures
    assert "FAILED: CNPAdminTierGress (failed probes: sctp)" in failures


def test_tests_without_a_result_failed_and_a_failed_setup_is_one_failure(tmp_path):
    # Go prints the subtests' results when TestConformance ends: a binary that stopped
    # before (its -test.timeout) left every test that started without one.
    cut = LOG[:LOG.index("--- FAIL: TestConformance (")]
    line, failures, _ = summarize(tmp_path, cut + "panic: test timed out after 3h0m0s\n")
    assert line == "network-policy-api: 0 passed, 4 failed, 0 skipped"
    assert "FAILED: CNPAdminTierPriorityField (no result: the test binary stopped" in failures
    setup = ("=== RUN   TestConformance\n    suite.go:170: error waiting for namespaces\n"
             "--- FAIL: TestConformance (300.00s)\nFAIL\n")
    line, failures, junit = summarize(tmp_path, setup)
    assert line == "network-policy-api: 0 passed, 1 failed, 0 skipped"
    assert "FAILED: TestConformance (setup) (suite.go:170: error waiting for namespaces)" \
        in failures
    line, _, _ = summarize(tmp_path, "")  # the binary did not run
    assert line == "network-policy-api: 0 passed, 1 failed, 0 skipped"


def strip_sctp(manifest: str, tmp_path: Path) -> str:
    src = tmp_path / "manifests.yaml"
    src.write_text(manifest)
    script = ("eval \"$(sed -n '/^strip_sctp_containers() {/,/^}/p' \"$1\")\"; "
              "strip_sctp_containers \"$2\"")
    return subprocess.run(["bash", "-c", script, "bash", str(BUILD), str(src)], check=True,
                          capture_output=True, text=True).stdout


def test_the_base_manifests_lose_only_their_sctp_servers(tmp_path):
    manifest = """\
apiVersion: apps/v1
kind: StatefulSet
spec:
  template:
    spec:
      containers:
        - name: a-client
          image: agnhost
        - name: a-80
          command: ["/agnhost", "serve-hostname"]
          ports:
            - containerPort: 80
        - name: a-9003
          command: ["/bin/bash", "-c", "/agnhost porter"]
          env:
          - name: SERVE_SCTP_PORT_9003
            value: "foo"
        - name: a-53
          command: ["/agnhost"]
---
kind: Pod
spec:
  containers:
  - name: b-9005
    env:
    - name: SERVE_SCTP_PORT_9005
  - name: b-80
"""
    out = strip_sctp(manifest, tmp_path)
    assert "SCTP" not in out and "a-9003" not in out and "b-9005" not in out
    kept = manifest.replace("""\
        - name: a-9003
          command: ["/bin/bash", "-c", "/agnhost porter"]
          env:
          - name: SERVE_SCTP_PORT_9003
            value: "foo"
""", "").replace("""\
  - name: b-9005
    env:
    - name: SERVE_SCTP_PORT_9005
""", "")
    assert out == kept


def _module_dir() -> Path:
    env = {k: v for k, v in (line.split("=", 1) for line in
           (BUILD.parent / "suites.env").read_text().splitlines()
           if line.strip() and not line.startswith("#"))}
    cache = Path(os.environ.get("CILIA_CACHE", "/var/cache/cilia"))
    mod = Path(os.environ.get("GOMODCACHE") or cache / "go-mod")
    return mod / f"sigs.k8s.io/network-policy-api@{env['NETWORK_POLICY_API_VERSION']}"


def test_agnhost_is_also_the_tag_the_conformance_pods_ask_for(tmp_path):
    pins = upstream.pins()
    specs = {s.name: s for s in images.cluster_images(tmp_path, pins)}
    agnhost = specs[f"{images.E2E_REGISTRY}/agnhost:{pins['AGNHOST_VERSION']}"]
    tag = f"{images.E2E_REGISTRY}/agnhost:{images.NETWORK_POLICY_API_AGNHOST_TAG}"
    assert agnhost.also == (tag,)
    # The pinned module's manifests ask for exactly that, where it is in the module cache
    # (after `packaging/upstream/build.sh network-policy-api.test`), and, less the SCTP
    # servers, still do.
    base = _module_dir() / "conformance/base/manifests.yaml"
    if base.is_file():
        text = base.read_text()
        assert {x.split("image:", 1)[1].strip() for x in text.splitlines()
                if "image:" in x} == {tag}
        stripped = strip_sctp(text, tmp_path)
        assert "SERVE_SCTP_PORT_" not in stripped and f"image: {tag}" in stripped
        assert text.count("- name: ") - stripped.count("- name: ") == \
            2 * text.count("SERVE_SCTP_PORT_")  # the container and its env entry


def test_an_image_with_more_names_is_imported_under_each(tmp_path):
    exe = tmp_path / "x"
    exe.write_bytes(b"#!/bin/sh\n")
    spec = images.ImageSpec("example.org/x:1", {"/x": exe}, ["/x"],
                            also=("example.org/x:2", "other.org/y:3"))
    archive = images.build_archive(spec, tmp_path / "x.tar")
    with tarfile.open(archive) as tar:
        index = json.load(tar.extractfile("index.json"))
    names = [(m["annotations"]["io.containerd.image.name"],
              m["annotations"]["org.opencontainers.image.ref.name"]) for m in index["manifests"]]
    assert names == [("example.org/x:1", "1"), ("example.org/x:2", "2"), ("other.org/y:3", "3")]
    assert len({m["digest"] for m in index["manifests"]}) == 1


def test_the_mixed_protocol_tests_skip_only_their_sctp_probes(tmp_path):
    """The variant's PokeServer returns at once for SCTP, saying so, and probes TCP and
    UDP as upstream does (the module's own helper.go, edited as build.sh edits it)."""
    mod = Path(subprocess.run(
        ["bash", "-c", "cd / && go env GOMODCACHE"], capture_output=True, text=True).stdout
        .strip() or "/root/go/pkg/mod")
    src = next((p for p in (mod, Path("/root/go/pkg/mod"), Path("/var/cache/cilia/go-mod"))
                if (p / "sigs.k8s.io" / f"network-policy-api@{version()}").exists()), None)
    if src is None:
        import pytest

        pytest.skip("the network-policy-api module is not in the Go module cache")
    helper = tmp_path / "helper.go"
    helper.write_text((src / "sigs.k8s.io" / f"network-policy-api@{version()}" / "conformance"
                       / "utils" / "kubernetes" / "helper.go").read_text())
    script = ("eval \"$(sed -n '/^skip_sctp_probes() {/,/^}/p' \"$1\")\"; "
              "skip_sctp_probes \"$2\"")
    subprocess.run(["bash", "-c", script, "-", str(BUILD), str(helper)], check=True)
    text = helper.read_text()
    body = text[text.index("func PokeServer("):text.index("func doPokeServer(")]
    assert 'if protocol == "sctp" {' in body and "SKIPPED SCTP probe" in body
    assert body.index("return") < body.index("require.Eventually(")
    assert text.count("SKIPPED SCTP probe") == 1


def version() -> str:
    env = (REPO / "packaging" / "upstream" / "suites.env").read_text()
    return next(line.split("=", 1)[1].strip() for line in env.splitlines()
                if line.startswith("NETWORK_POLICY_API_VERSION="))
