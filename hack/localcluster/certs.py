"""Certificates and keys for the local control plane, made with the openssl command line."""

from __future__ import annotations

import dataclasses
import pathlib
import subprocess

# The Services' ClusterIP range and the first address in it, the ``kubernetes`` Service's, which
# in-cluster clients dial (KUBERNETES_SERVICE_HOST): the serving certificate must name it.
SERVICE_RANGE = "10.0.0.0/24"
SERVICE_IP = "10.0.0.1"


@dataclasses.dataclass(frozen=True)
class Pki:
    """Paths of the files the control plane needs; all live in one folder."""

    folder: pathlib.Path

    @property
    def ca_cert(self) -> pathlib.Path:
        return self.folder / "ca.crt"

    @property
    def ca_key(self) -> pathlib.Path:
        return self.folder / "ca.key"

    @property
    def server_cert(self) -> pathlib.Path:
        return self.folder / "apiserver.crt"

    @property
    def server_key(self) -> pathlib.Path:
        return self.folder / "apiserver.key"

    @property
    def kubelet_client_cert(self) -> pathlib.Path:
        return self.folder / "apiserver-kubelet-client.crt"

    @property
    def kubelet_client_key(self) -> pathlib.Path:
        return self.folder / "apiserver-kubelet-client.key"

    @property
    def sa_key(self) -> pathlib.Path:
        return self.folder / "sa.key"

    @property
    def sa_pub(self) -> pathlib.Path:
        return self.folder / "sa.pub"


def _openssl(*args: str, cwd: pathlib.Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def ensure_pki(folder: pathlib.Path, server_ips: tuple[str, ...] = ("127.0.0.1", SERVICE_IP)) -> Pki:
    """Create a CA, an API server certificate for ``server_ips``, and the service-account key pair.

    Existing files are kept, so a restarted cluster keeps trusting the tokens it issued (a cluster
    folder is made for one kind of cluster: with or without a real node).
    """
    folder.mkdir(parents=True, exist_ok=True)
    pki = Pki(folder)
    if not pki.ca_cert.exists():
        # Key usage and key identifiers as a real cluster's CA has them: Python 3.13's ssl verifies
        # strictly (VERIFY_X509_STRICT) and refuses a CA without keyUsage, which the quantizer
        # image's in-cluster client (Python 3.13 on Debian 13) met on the real node.
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
                 "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=kquant-local-ca",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                 "-addext", "subjectKeyIdentifier=hash", cwd=folder)
    if not pki.server_cert.exists():
        ext = folder / "apiserver.ext"
        ips = ",".join(f"IP:{ip}" for ip in dict.fromkeys(server_ips))
        ext.write_text(
            f"subjectAltName={ips},DNS:localhost,DNS:kubernetes,"
            "DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
            "extendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
        )
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "apiserver.key",
                 "-out", "apiserver.csr", "-subj", "/CN=kube-apiserver", cwd=folder)
        _openssl("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "3650", "-extfile", "apiserver.ext",
                 "-out", "apiserver.crt", cwd=folder)
    if not pki.kubelet_client_cert.exists():
        # The API server's identity towards kubelets (logs, exec): a client certificate in
        # system:masters, which a real node's kubelet authorises through SubjectAccessReview.
        (folder / "kubelet-client.ext").write_text(
            "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            "authorityKeyIdentifier=keyid\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "apiserver-kubelet-client.key",
                 "-out", "apiserver-kubelet-client.csr",
                 "-subj", "/O=system:masters/CN=kube-apiserver-kubelet-client", cwd=folder)
        _openssl("x509", "-req", "-in", "apiserver-kubelet-client.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "3650", "-extfile", "kubelet-client.ext",
                 "-out", "apiserver-kubelet-client.crt", cwd=folder)
    if not pki.sa_key.exists():
        _openssl("genrsa", "-out", "sa.key", "2048", cwd=folder)
        _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=folder)
    return pki
