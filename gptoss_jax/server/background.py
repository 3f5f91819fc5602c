"""Listening sockets and an in-process server thread (tests, benchmarks, notebooks)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from gptoss_jax.server.scheduler import Scheduler


def bind_socket(host: str, port: int):
    """A listening TCP socket on ``host:port`` (port 0: a free one; read it from ``getsockname``)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class BackgroundServer:
    """uvicorn serving ``app`` from a thread (tests, benchmarks, notebooks).

    ``BackgroundServer(app).start()`` returns once the server accepts connections and the
    scheduler has finished warming up; ``url`` is ``http://host:port``; ``stop()`` shuts down.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.sock = bind_socket(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_keep_alive=30))
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self.scheduler: Scheduler = app.state.gptoss.scheduler
        self.thread = None

    def start(self, timeout: float = 600.0) -> BackgroundServer:
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="gptoss-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.time() + timeout
        while not (self.server.started and self.scheduler.ready.is_set()):
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(30)
        self.sock.close()
