"""Waits until every pod of a DaemonSet runs its current template and is Ready.

Run by the chart's hook Jobs with the Job's service account: after install and upgrade
(every agent Ready: `helm install --wait` alone counts a DaemonSet ready with
maxUnavailable pods still missing) and after uninstall (every node cleaned: each pod ran
its init container to the end). Needs only the standard library. Exits 0 when done, 1 on
timeout. Usage: wait-daemonset.py NAME TIMEOUT
"""

import json
import os
import ssl
import sys
import time
import urllib.request

SA = "/var/run/secrets/kubernetes.io/serviceaccount"


def main() -> int:
    name, timeout = sys.argv[1], float(sys.argv[2])
    namespace = open(f"{SA}/namespace").read().strip()
    token = open(f"{SA}/token").read().strip()
    host = os.environ["KUBERNETES_SERVICE_HOST"]
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if ":" in host:
        host = f"[{host}]"
    url = f"https://{host}:{port}/apis/apps/v1/namespaces/{namespace}/daemonsets/{name}"
    ctx = ssl.create_default_context(cafile=f"{SA}/ca.crt")
    deadline = time.monotonic() + timeout
    status: dict = {}
    obj: dict = {"metadata": {}}
    while time.monotonic() < deadline:
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
                obj = json.load(resp)
                status = obj.get("status", {})
        except OSError as err:
            print(f"waiting for daemonset {name}: {err}", flush=True)
            time.sleep(2)
            continue
        want = status.get("desiredNumberScheduled", 0)
        current = status.get("observedGeneration", 0) >= obj["metadata"].get("generation", 0)
        if (want and current and status.get("numberReady", 0) == want
                and status.get("updatedNumberScheduled", 0) == want):
            print(f"daemonset {name}: {want}/{want} pods ready", flush=True)
            return 0
        time.sleep(2)
    print(f"daemonset {name} not done after {timeout:.0f}s: {status}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
