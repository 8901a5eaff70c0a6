"""Real servers for the tests that talk to a served model: `transformers serve` on the tiny Gemma 3 in
a subprocess on the CPU (its log kept), and a TCP relay that keeps every byte a client sends."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import free_port

HOOKS = Path(__file__).resolve().parent / "serve_hooks"


class Server:
    """`transformers serve FOLDER` in a subprocess on a free port, its output in ``log``."""

    def __init__(self, folder: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = log
        # One thread: the tiny model gains nothing from more, and the CPU is shared.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HOOKS), "OMP_NUM_THREADS": "1"}
        command = [str(Path(sys.executable).with_name("transformers")), "serve", str(folder),
                   "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu"]
        self._out = open(log, "wb")
        self.process = subprocess.Popen(command, stdout=self._out, stderr=subprocess.STDOUT, env=env)
        self._wait_until_healthy(timeout=180)

    def _wait_until_healthy(self, timeout: float) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"transformers serve exited ({self.process.returncode}):\n{self.log_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise AssertionError(f"transformers serve not healthy after {timeout} s:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self._out.close()


def _read_request(client: socket.socket) -> bytes:
    """One whole HTTP request from ``client``: its head, then as many body bytes as Content-Length says."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = client.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    size = int(length.group(1)) if length else 0
    while len(body) < size:
        chunk = client.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


class Proxy:
    """A TCP relay in front of a server that keeps every byte the client sent, each connection's
    bytes apart (so that requests sent side by side are not interleaved in ``sent``). ``port``: the
    port to listen on (0: a free one); ``cut()`` drops the open connections, as a server that dies;
    the first ``drop_first`` connections are closed once a request arrives on them, unanswered, as a
    server closes a kept-alive connection that a client is reusing."""

    def __init__(self, upstream_port: int, port: int = 0, drop_first: int = 0):
        self.upstream_port = upstream_port
        self._drops_left = drop_first
        self._connections: list[bytearray] = []
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", port))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/v1"
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def sent(self) -> bytes:
        """Everything clients sent, one connection after the other."""
        with self._lock:
            return b"".join(bytes(connection) for connection in self._connections)

    def requests(self) -> list[tuple[bytes, bytes]]:
        """Each HTTP request clients sent: its head (request line and headers) and its body."""
        with self._lock:
            streams = [bytes(connection) for connection in self._connections]
        found = []
        for stream in streams:
            while stream:
                head, _, rest = stream.partition(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                size = int(length.group(1)) if length else 0
                found.append((head, rest[:size]))
                stream = rest[size:]
        return found

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._drops_left > 0:
                self._drops_left -= 1
                _read_request(client)  # all of it: a socket closed with unread bytes resets (RST) instead
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            record = bytearray()
            with self._lock:
                self._connections.append(record)
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, record), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, None), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, record: bytearray | None) -> None:
        try:
            while data := source.recv(65536):
                if record is not None:
                    with self._lock:
                        record.extend(data)
                target.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, target):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        """Drop every open connection at once (new ones are still relayed)."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._listener.close()
