"""Run the server in a background thread on a free loopback port (tests and bench_server.py use it).

with ServerThread(state) as url:          # url = "http://127.0.0.1:PORT"
    httpx.get(url + "/health")
"""

from __future__ import annotations

import socket
import threading
import time

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
