"""Argument parsers of `paratree serve` and `paratree bench-serve` (registered by paratree.cli)."""

from __future__ import annotations

from ..drafters import drafters
from .bench_serve import add_bench_args


def add_serve_parsers(sub, add_model_args, add_drafter_args, cmd_serve, cmd_bench_serve) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    add_model_args(s)
    s.add_argument("--drafter", default="ngram", choices=drafters(),
                   help="ngram (default: training-free, cheap per sequence under batching), a head drafter "
                        "(--head DIR) or draft-model (--draft-model NAME)")
    add_drafter_args(s)
    s.add_argument("--budget", type=int, default=32, help="max tree nodes per sequence per verify, root included")
    s.add_argument("--policy", default="adaptive", choices=("adaptive", "latency", "throughput"))
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch", type=int, default=16, help="concurrent sequences (KV rows)")
    s.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or env PARATREE_API_KEY)")
    s.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    s.add_argument("--cost-model", default=None, help="verify cost curve JSON (measured and stored if missing)")
    s.add_argument("--served-model-name", default=None)
    s.add_argument("--max-body-bytes", type=int, default=1 << 20)
    s.add_argument("--log-level", default="warning")
    if "--threads" not in s._option_string_actions:  # shared model args may already carry it
        s.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    s.set_defaults(func=cmd_serve)

    bs = sub.add_parser("bench-serve", help="serving benchmark: tok/s at 1-16 clients, speculation adaptive vs off "
                                            "vs latency-only")
    add_bench_args(bs)
    bs.set_defaults(func=cmd_bench_serve)
