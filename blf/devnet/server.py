"""What every devnet service shares: a FastAPI app on a loopback socket, either on a
background thread (tests, ``devnet up``) or in the foreground (``devnet icl``).

The socket is bound here rather than by uvicorn, so port 0 resolves to a real port before
``start`` returns and the listening socket accepts connections from the first moment.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any, Self

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

__all__ = ["DevnetError", "LocalServer", "bind", "install_error_handler", "serve", "url_of"]


class DevnetError(Exception):
    """A request a devnet service refuses; becomes ``{"detail": ...}`` with this status."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


async def _devnet_error_response(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DevnetError)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status)


def install_error_handler(app: FastAPI) -> None:
    app.add_exception_handler(DevnetError, _devnet_error_response)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family)
    # Accepted connections inherit this on Linux. Without it a response written in two
    # parts waits for the client's delayed ACK: about 40 ms added to every request.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class LocalServer:
    """An app served on a background thread: ``with LocalServer(app) as s: s.url``.

    ``port=0`` picks a free port, readable as ``port`` once started.
    """

    name = "devnet service"

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return url_of(self.host, self.port)

    def start(self, timeout_s: float = 10.0) -> Self:
        if self._server is not None:
            raise RuntimeError(f"{self.name} already started")
        sock = bind(self.host, self.port)
        self.port = sock.getsockname()[1]
        # log_config=None leaves the host process's logging alone (the node has its own).
        config = uvicorn.Config(
            self.app, log_level="warning", log_config=None, access_log=False, lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name=self.name, daemon=True
        )
        self._thread.start()
        self._wait_started(timeout_s)
        return self

    def _wait_started(self, timeout_s: float) -> None:
        assert self._server is not None and self._thread is not None
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"{self.name} failed to start on {self.url}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not start on {self.url} in {timeout_s} s")
            time.sleep(0.005)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout_s)
        self._server = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serve(app: FastAPI, host: str, port: int, *, banner: str, log_level: str = "info") -> Any:
    """Run ``app`` in the foreground until interrupted; prints ``banner`` with its URL."""
    sock = bind(host, port)
    print(f"{banner} listening on {url_of(host, sock.getsockname()[1])}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
