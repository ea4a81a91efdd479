"""A TCP proxy that passes the server's bytes to the client slowly: a caller that reads a large answer at
a few hundred kB/s, as one on a slow link or a busy machine does. Calls go through `address`."""

from __future__ import annotations

import socket
import threading
import time


class SlowReaderProxy:
    def __init__(self, upstream_port: int, bytes_per_second: float) -> None:
        self.rate = bytes_per_second
        self.upstream_port = upstream_port
        self.resets = 0  # connections the server reset while the proxy was still reading them
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._listener.getsockname()[1]}"

    def __enter__(self) -> SlowReaderProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        for s in self._sockets:
            s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.socket()
            server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)  # back-pressure reaches the server
            server.connect(("127.0.0.1", self.upstream_port))
            self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, 0.0), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, self.rate), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, rate: float) -> None:
        try:
            while chunk := src.recv(16 * 1024):
                dst.sendall(chunk)
                if rate:
                    time.sleep(len(chunk) / rate)
        except ConnectionResetError:
            self.resets += 1
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
