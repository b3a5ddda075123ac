"""A TCP relay in the test process: the S3 test server binds 127.0.0.1, which a Slurm node's
network namespace cannot reach (its loopback is its own), so the nodes reach it through an
address on the cluster's bridge."""
from __future__ import annotations

import contextlib
import socket
import threading


class TcpRelay:
    """Listen on (host, a free port); relay every connection to ``target``."""

    def __init__(self, host: str, target: tuple[str, int]):
        self.target = target
        self.sock = socket.create_server((host, 0))
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        threading.Thread(target=self._accept, name="tcp-relay", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:  # closed
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            done = threading.Semaphore(0)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst, done), daemon=True).start()
            threading.Thread(target=self._close_after, args=(client, upstream, done), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, done: threading.Semaphore) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)  # pass the end on; the other direction may still be sending
            done.release()

    @staticmethod
    def _close_after(a: socket.socket, b: socket.socket, done: threading.Semaphore) -> None:
        done.acquire()
        done.acquire()
        a.close()
        b.close()

    def close(self) -> None:
        self.sock.close()
