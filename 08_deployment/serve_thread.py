"""Run the server on a free loopback port: in a background thread (tests) or a subprocess (bench_server.py).

with ServerThread(state) as url:          # url = "http://127.0.0.1:PORT"
    httpx.get(url + "/health")
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import uvicorn

from ch08.api import create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    def __init__(self, state, host: str = "127.0.0.1", port: int | None = None, startup_timeout: float = 60.0):
        self.state, self.host, self.port = state, host, port or free_port()
        config = uvicorn.Config(
            create_app(state),
            host=host,
            port=self.port,
            log_level="warning",
            timeout_graceful_shutdown=int(state.shutdown_timeout),
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.startup_timeout = startup_timeout

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=self.state.shutdown_timeout + 10)


class ServerProcess:
    """``python 08_deployment/server.py ARGS --port P`` in a subprocess (own interpreter, so load-generating clients
    do not share the server's GIL); waits for ``health_path``, stops with SIGINT (uvicorn's graceful shutdown)."""

    health_path = "/health"

    def __init__(
        self, args: list[str], host: str = "127.0.0.1", startup_timeout: float = 300.0, env: dict | None = None
    ):
        self.host, self.port, self.env = host, free_port(), env  # env: variables added to this process's
        self.cmd = [
            sys.executable,
            str(Path(__file__).with_name("server.py")),
            *args,
            "--host",
            host,
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> str:
        import httpx

        self.proc = subprocess.Popen(self.cmd, env={**os.environ, **(self.env or {})})
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode}: {' '.join(self.cmd)}")
            try:
                if httpx.get(self.url + self.health_path, timeout=2).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"server did not answer {self.health_path} within {self.startup_timeout:.0f} s")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
