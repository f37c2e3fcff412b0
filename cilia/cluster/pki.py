"""The cluster's certificates, keys and kubeconfigs, made with the openssl command.

One CA signs everything: the API server's serving certificate, a client certificate per
component (the user name is the CN, the groups are the O fields, as the API server's
x509 authenticator reads them), and the kubelets' serving certificates. The service
account signing key pair is separate, as upstream requires.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

DAYS = "3650"


class PkiError(RuntimeError):
    pass


def _openssl(*args: str, stdin: str | None = None) -> None:
    res = subprocess.run(["openssl", *args], input=stdin, capture_output=True, text=True)
    if res.returncode != 0:
        raise PkiError(f"openssl {args[0]} failed: {res.stderr.strip()}")


@dataclass(frozen=True)
class Cert:
    cert: Path
    key: Path


class Pki:
    def __init__(self, directory: Path):
        self.dir = directory
        self.ca = Cert(directory / "ca.crt", directory / "ca.key")

    def init(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.ca.cert.exists():
            _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out",
                     str(self.ca.key))
            _openssl("req", "-x509", "-new", "-key", str(self.ca.key), "-days", DAYS,
                     "-subj", "/CN=cilia-cluster-ca", "-out", str(self.ca.cert),
                     "-addext", "basicConstraints=critical,CA:TRUE",
                     "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature")
        sa = self.dir / "sa.key"
        if not sa.exists():
            _openssl("genrsa", "-out", str(sa), "2048")
            _openssl("rsa", "-in", str(sa), "-pubout", "-out", str(self.dir / "sa.pub"))

    def issue(self, name: str, cn: str, groups: tuple[str, ...] = (),
              ips: tuple[str, ...] = (), dns: tuple[str, ...] = (), server: bool = False) -> Cert:
        """A key and a certificate signed by the CA; reused when already made."""
        out = Cert(self.dir / f"{name}.crt", self.dir / f"{name}.key")
        if out.cert.exists() and out.key.exists():
            return out
        subject = "".join(f"/O={g}" for g in groups) + f"/CN={cn}"
        csr = self.dir / f"{name}.csr"
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(out.key))
        _openssl("req", "-new", "-key", str(out.key), "-subj", subject, "-out", str(csr))
        ext = ["basicConstraints=critical,CA:FALSE",
               "keyUsage=critical,digitalSignature,keyEncipherment",
               f"extendedKeyUsage={'serverAuth,clientAuth' if server else 'clientAuth'}"]
        sans = [f"IP:{i}" for i in ips] + [f"DNS:{d}" for d in dns]
        if sans:
            ext.append("subjectAltName=" + ",".join(sans))
        extfile = self.dir / f"{name}.ext"
        extfile.write_text("\n".join(ext) + "\n")
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(self.ca.cert), "-CAkey",
                 str(self.ca.key), "-CAcreateserial", "-days", DAYS, "-extfile", str(extfile),
                 "-out", str(out.cert))
        csr.unlink()
        extfile.unlink()
        out.key.chmod(0o600)
        return out

    def kubeconfig(self, path: Path, server: str, user: str, cert: Cert) -> Path:
        config = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "cilia", "cluster": {
                "server": server, "certificate-authority": str(self.ca.cert)}}],
            "users": [{"name": user, "user": {
                "client-certificate": str(cert.cert), "client-key": str(cert.key)}}],
            "contexts": [{"name": "cilia", "context": {"cluster": "cilia", "user": user}}],
            "current-context": "cilia",
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)
        return path
