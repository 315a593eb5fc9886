"""`paratree serve`: an OpenAI-compatible HTTP server with continuous batching and batched tree verification.

    paratree serve [--model M] [--drafter ngram] [--dtype bf16] [--host 127.0.0.1] [--port 8000]
                   [--max-batch 16] [--max-queue 64] [--max-model-len 2048] [--api-key KEY]
                   [--budget 32] [--policy adaptive|latency|throughput] [--request-timeout 600]
                   [--cost-model PATH] [--threads N]

Endpoints: POST /v1/chat/completions, POST /v1/completions (stream via SSE), GET /v1/models,
GET /health, GET /metrics (Prometheus text). Responses follow the OpenAI schema plus a
"speculative" block (rounds, tau, accepted draft tokens, mean tree size, drafter, policy).

Pieces: `protocol` (pydantic request models, error object), `app` (FastAPI app, auth and
body-limit middleware, SSE), `backend` (model + tokenizer + `paratree.engine.scheduler.Scheduler`),
`server` (uvicorn), `bench_serve` (the serving benchmark).
"""
