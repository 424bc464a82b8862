"""A kubelet's container-log endpoint for the simulated nodes, so that pods/log works on them.

The API server serves ``kubectl logs`` (and the operator's plan check) by proxying to
``https://<node InternalIP>:<kubeletEndpoint port>/containerLogs/<namespace>/<pod>/<container>``
with its kubelet client certificate. It refuses loopback node addresses, so the endpoint listens
on this machine's own non-loopback address; it serves only clients whose certificate the
cluster's CA signed (the API server's), and only the log files of pods this agent runs.
``limitBytes`` (from the start) and ``tailLines`` are honoured, as the kubelet does.
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import pathlib
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable

from localcluster import certs

log = logging.getLogger("localcluster.logs")
LogPath = Callable[[str, str, str], pathlib.Path | None]
"""(namespace, pod, container) -> the container's log file, None for a pod this agent does not run."""


def host_address() -> str | None:
    """This machine's own non-loopback IPv4 address (the one a default route would use), or None.
    A UDP connect sends nothing; it only asks the kernel which source address it would pick."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("10.254.254.254", 1))
        address = str(s.getsockname()[0])
        if not address.startswith("127.") and address != "0.0.0.0":
            return address
    return None


def serving_certificate(pki: pathlib.Path, address: str) -> tuple[pathlib.Path, pathlib.Path]:
    """A serving certificate for ``address``, signed by the cluster's CA (made once per address)."""
    cert, key = pki / f"agent-logs-{address}.crt", pki / f"agent-logs-{address}.key"
    if not cert.exists():
        (pki / "agent-logs.ext").write_text(f"subjectAltName=IP:{address}\nextendedKeyUsage=serverAuth\n")
        certs._openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key.name, "-out", "agent-logs.csr",
                       "-subj", "/CN=kquant-local-agent", cwd=pki)
        certs._openssl("x509", "-req", "-in", "agent-logs.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                       "-CAcreateserial", "-days", "3650", "-extfile", "agent-logs.ext", "-out", cert.name, cwd=pki)
    return cert, key


def read_log(path: pathlib.Path, limit_bytes: int | None, tail_lines: int | None) -> bytes:
    data = path.read_bytes()
    if tail_lines is not None:
        lines = data.splitlines(keepends=True)
        data = b"".join(lines[-tail_lines:]) if tail_lines > 0 else b""
    if limit_bytes is not None:
        data = data[:limit_bytes]
    return data


class LogServer:
    """The endpoint: ``start`` binds ``address`` on a free port and serves in a daemon thread."""

    def __init__(self, address: str, pki: pathlib.Path, log_path: LogPath) -> None:
        self.address = address
        self.log_path = log_path
        cert, key = serving_certificate(pki, address)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.context.verify_mode = ssl.CERT_REQUIRED  # only the API server's kubelet client certificate
        self.context.load_verify_locations(pki / "ca.crt")
        self.server: http.server.ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        return int(self.server.server_address[1]) if self.server else 0

    def start(self) -> None:
        log_path = self.log_path

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                parts = url.path.strip("/").split("/")
                query = urllib.parse.parse_qs(url.query)
                if len(parts) != 4 or parts[0] != "containerLogs":
                    self.send_error(404, "only /containerLogs/<namespace>/<pod>/<container> is served here")
                    return
                path = log_path(parts[1], parts[2], parts[3])
                if path is None or not path.exists():
                    self.send_error(404, f"no log for {parts[1]}/{parts[2]}/{parts[3]} on this agent")
                    return

                def number(name: str) -> int | None:
                    values = query.get(name)
                    return int(values[0]) if values and values[0].lstrip("-").isdigit() else None

                body = read_log(path, number("limitBytes"), number("tailLines"))
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("log endpoint: " + format, *args)

        server = http.server.ThreadingHTTPServer((self.address, 0), Handler)
        server.daemon_threads = True
        server.socket = self.context.wrap_socket(server.socket, server_side=True)
        self.server = server
        threading.Thread(target=server.serve_forever, daemon=True, name="kubelet-logs").start()
        log.info("container logs served at https://%s:%d", self.address, self.port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
