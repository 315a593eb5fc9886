"""A real uvicorn server over an in-process ServeEngine, for tests that need this process's state
(a family registered from the test file, a model already loaded) behind real HTTP."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


@contextlib.contextmanager
def serving(engine, timeout: float = 60.0):
    """Start `engine` and serve it on a free 127.0.0.1 port; yields the base URL; stops both."""
    import uvicorn

    from paratree.serve.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine.start()
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    try:
        deadline = time.time() + timeout
        while not server.started:
            if time.time() > deadline or not th.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        th.join(10)
        engine.stop()
