"""A TCP forwarder between the operator and kube-apiserver that can cut the connections through it.

Two real ways a connection dies: ``reset`` closes both ends at once with an RST (a proxy or the
server restarting), and ``blackhole`` keeps both sockets open but drops every byte from then on
(a NAT entry or a load balancer that forgot the flow: the client sees silence, not an error).
Connections opened after a cut pass as before. TLS passes through untouched: the client still
talks to kube-apiserver's own certificate, whose 127.0.0.1 address the forwarder shares.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import socket
import struct
import threading


class _Pair:
    def __init__(self, downstream: socket.socket, upstream: socket.socket) -> None:
        self.sockets = (downstream, upstream)
        self.blackholed = False

    def reset(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                # SO_LINGER with a zero timeout: the last close sends RST instead of FIN. A close
                # alone would not reach the kernel's socket while a pump thread is blocked in
                # recv() on it (the connection would go silent, a blackhole, not a reset), so
                # shutdown(SHUT_RD) first wakes that thread without sending anything.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RD)
            with contextlib.suppress(OSError):
                sock.close()


class Proxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.pairs: list[_Pair] = []
        self.holes: list[_Pair] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                downstream.close()
                continue
            pair = _Pair(downstream, upstream)
            with self.lock:
                self.pairs.append(pair)
            threading.Thread(target=self._pump, args=(pair, downstream, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(pair, upstream, downstream), daemon=True).start()

    def _pump(self, pair: _Pair, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if not pair.blackholed:
                    sink.sendall(data)
        except OSError:
            pass
        if not pair.blackholed:
            pair.reset()

    def cut(self, mode: str) -> int:
        """Cut every connection open now (``reset`` or ``blackhole``); returns how many."""
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            if mode == "blackhole":
                pair.blackholed = True
                self.holes.append(pair)
            else:
                pair.reset()
        return len(pairs)

    def close(self) -> None:
        self.listener.close()
        self.cut("reset")
        for pair in self.holes:
            pair.reset()

    def kubeconfig(self, original: pathlib.Path, path: pathlib.Path) -> pathlib.Path:
        """``original`` (a JSON kubeconfig) with its server replaced by this forwarder."""
        config = json.loads(original.read_text())
        config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{self.port}"
        path.write_text(json.dumps(config))
        return path


def target_of(kubeconfig: pathlib.Path) -> tuple[str, int]:
    server = json.loads(kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    host, port = server.removeprefix("https://").rsplit(":", 1)
    return host, int(port)
