"""Run the OpenAI-compatible server with uvicorn (what `paratree serve` calls)."""

from __future__ import annotations

import os
import socket
import sys

import torch

from .backend import ServeEngine


def serve(model: str | None = None, dtype: str = "auto", host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_body_bytes: int = 1 << 20, log_level: str = "warning",
          threads: int | None = None, **engine_kw) -> int:
    import uvicorn

    if threads:
        torch.set_num_threads(threads)

    from .app import create_app  # FastAPI: the optional `serve` extra

    api_key = api_key or os.environ.get("PARATREE_API_KEY") or None
    engine = ServeEngine.load(model, dtype, **engine_kw)
    app = create_app(engine, api_key=api_key, max_body_bytes=max_body_bytes)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    info = engine.info()
    print(f"paratree serve: {info['model']} ({info['dtype']}), drafter {info['drafter']}, policy {info['policy']} "
          f"(cost curve: latency mode up to {info['switch_batch']} sequences, throughput above; per batch-size class "
          f"the fastest measured mode runs), max batch {info['max_batch']}, "
          f"context {info['max_model_len']}; verify cost curve (nodes, ms) {info['cost_points_ms']}: "
          f"{info['cost_model']}", file=sys.stderr, flush=True)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print("paratree serve: warning: listening beyond localhost without --api-key", file=sys.stderr, flush=True)
    print(f"paratree serve: listening on http://{host}:{bound}{' (bearer auth on)' if api_key else ''}",
          file=sys.stderr, flush=True)
    engine.start()
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5,
                            lifespan="off")
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()
    return 0
