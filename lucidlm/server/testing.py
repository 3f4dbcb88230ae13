"""`serve_in_thread(app)`: a real uvicorn server on a free loopback port, for tests.

    with serve_in_thread(create_app(model)) as base_url:   # "http://127.0.0.1:PORT"
        httpx.get(base_url + "/health")

The socket is bound before uvicorn starts (port 0: the system picks a free one), so there
is no race for the port; leaving the block stops the server and runs the app's shutdown.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Iterator

import uvicorn


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", startup_timeout: float = 30.0) -> Iterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    # timeout_graceful_shutdown: streams still open at exit are closed after this many seconds.
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
