"""A private `redis-server` for tests and benchmarks: a free loopback port, append-only
persistence in a temporary folder, stopped (and its files removed) at the end.

    with RedisServer() as r:
        engine = Engine(store=r.url)
        r.stop(); ...; r.start()    # a Redis outage: same port, same data
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """One redis-server process. Raises RuntimeError when redis-server is not installed
    or does not answer within `timeout_s`."""

    def __init__(self, port: int | None = None, appendfsync: str = "everysec",
                 timeout_s: float = 20.0):
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self.timeout_s = timeout_s
        self.dir = Path(tempfile.mkdtemp(prefix="agentos-redis-"))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Starts the server (again, after stop: it reloads its append-only file)."""
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
               "--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "",
               "--protected-mode", "no", "--daemonize", "no", "--logfile", "redis.log"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see "
                                   f"{self.dir / 'redis.log'}")
            if self._ping():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        """Stops the server (SIGTERM: it flushes its append-only file first)."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
