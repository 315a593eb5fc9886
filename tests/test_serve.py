"""`paratree serve` end to end: live uvicorn servers on 127.0.0.1 driven by the official openai client.

Two server subprocesses, started once per module and in parallel:
- fp32 on a tiny random Llama that carries the default model's tokenizer and chat template
  (vocab 49152): outputs compared token-for-token with the single-stream Pipeline on the same
  checkpoint, sequential and 8 concurrent, plus streaming, stop strings, seeds, bad input,
  disconnects and the queue bound. Tiny keeps this fast on 2 cores.
- the real default model in its default dtype (`auto`: bf16 where the CPU has native bf16, else fp32)
  with bearer auth: auth, and a bounded 16-client streaming
  load test with an RSS drift check.
Set PARATREE_SERVE_REAL_FP32=1 to also compare an fp32 real-model server with the Pipeline.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from paratree.serve.bench_serve import ServerProcess

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

MODEL = "tiny-smollm-tokenizer"  # the fp32 server's model (directory name of the tiny checkpoint)
REAL = "smollm2-135m"
API_KEY = "test-key-123"
# A steep synthetic verify cost curve: the adaptive policy serves one sequence in latency mode
# and several in throughput mode (trees pruned to a shared verify budget), so both paths run.
STEEP_COST = {"points": [[1, 0.02], [8, 0.03], [64, 0.2], [256, 0.8]]}
# A GPU-like curve (flat up to a few dozen nodes): throughput mode still speculates at batch 16,
# so the load test can check that drafts are accepted under batching whatever the machine's speed.
# (With STEEP_COST a full batch of 16 correctly stops drafting, and tau is exactly 1.)
FLAT_COST = {"points": [[1, 0.02], [64, 0.022], [256, 0.06]]}

PROMPTS = [
    "Repeat this sentence exactly three times: the quick brown fox jumps over the lazy dog.",
    "What is 12 times 11? Answer briefly.",
    "Write the numbers from one to ten in words, separated by commas.",
    "Name three primary colors.",
    "Copy this list: apple, banana, cherry, apple, banana, cherry.",
    "Say hello in French.",
    "Complete: def add(a, b):\n    return",
    "What is the capital of Italy?",
]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Server(ServerProcess):
    """The package's own server subprocess, plus an OpenAI client and parsed /metrics."""

    def __init__(self, *args: str, key: str | None = None):
        super().__init__(list(args), key=key)

    def wait_ready(self, timeout: float = 240.0) -> "Server":
        try:
            self.wait(timeout)
        except RuntimeError as e:
            raise AssertionError(str(e)) from None
        return self

    def client(self, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.key or "unused", max_retries=0,
                             timeout=kw.pop("timeout", 120), **kw)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out


def make_tiny_with_default_tokenizer(out: Path) -> Path:
    """A random 3-layer Llama with the default model's vocab (49152), tokenizer and chat template."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from paratree.models.loader import checkpoint_dir

    src = checkpoint_dir(None)[1]
    cfg = AutoConfig.for_model(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=128,
                               intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=49152, max_position_embeddings=4096,
                               rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1,
                               eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
            else:
                p.uniform_(0.8, 1.2)
    model.save_pretrained(out)
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors", "paratree_source.json") and f.is_file():
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_with_default_tokenizer(tmp_path_factory.mktemp("serve") / MODEL)


@pytest.fixture(scope="module")
def servers(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("cost")
    cost = d / "cost.json"
    cost.write_text(json.dumps(STEEP_COST))
    flat = d / "flat.json"
    flat.write_text(json.dumps(FLAT_COST))
    # one thread: a tiny model gains nothing from two, and loses a lot when the cores are shared
    fp32 = Server("--model", str(tiny_dir), "--dtype", "fp32", "--max-batch", "8", "--max-queue", "8",
                  "--max-model-len", "2048", "--cost-model", str(cost), "--threads", "1")
    bf16 = Server("--dtype", "auto", "--max-batch", "16", "--max-queue", "64", "--max-model-len", "1024",
                  "--cost-model", str(flat), key=API_KEY)
    try:
        yield {"fp32": fp32, "bf16": bf16}
    finally:
        fp32.stop()
        bf16.stop()
        assert fp32.proc.returncode is not None and bf16.proc.returncode is not None


@pytest.fixture(scope="module")
def fp32(servers):
    return servers["fp32"].wait_ready()


@pytest.fixture(scope="module")
def bf16(servers):
    return servers["bf16"].wait_ready()


@pytest.fixture(scope="module")
def pipe(servers, tiny_dir):  # loads while the servers start
    import torch

    from paratree.engine.pipeline import Pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield Pipeline.load(str(tiny_dir), "fp32", drafter="ngram", max_len=2048)
    finally:
        torch.set_num_threads(threads)


def _chat(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def _reference(pipe, prompt, n, **kw):
    from paratree.verify.warp import SamplingParams

    params = kw.pop("params", None) or SamplingParams()
    return pipe.generate(_chat(prompt), n, params, **kw)


# -- functional -----------------------------------------------------------------------------
def test_models_health_and_metrics(fp32):
    c = fp32.client()
    assert [m.id for m in c.models.list().data] == [MODEL]
    assert httpx.get(f"{fp32.url}/health").json() == {"status": "ok"}
    m = fp32.metrics()
    for name in ("paratree_requests_running", "paratree_queue_depth", "paratree_batch_size", "paratree_tau",
                 "paratree_tokens_per_second", "paratree_draft_seconds_total", "paratree_verify_seconds_total",
                 "paratree_policy_switch_batch"):
        assert name in m, name
    assert any(k.startswith("paratree_policy_info{policy=\"adaptive\"") for k in m)


def test_chat_and_completion_greedy_equal_single_stream(fp32, pipe):
    c = fp32.client()
    prompt = PROMPTS[1]
    text, res = _reference(pipe, prompt, 48)
    r = c.chat.completions.create(model=MODEL, messages=_chat(prompt), max_tokens=48, temperature=0)
    assert r.choices[0].message.content == text and r.object == "chat.completion"
    assert r.usage.completion_tokens == res.num_new_tokens
    assert r.usage.prompt_tokens == len(pipe.encode(_chat(prompt)))
    assert r.choices[0].finish_reason == ("stop" if res.finish_reason == "stop" else "length")
    spec = r.model_extra["speculative"]
    assert spec["rounds"] >= 1 and spec["tau"] >= 1.0
    prompt = "The three largest cities in Germany are"
    ref_text, _ = pipe.generate(prompt, 32, chat=False)
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0)
    assert r.choices[0].text == ref_text and r.object == "text_completion"
    r2 = c.completions.create(model=MODEL, prompt=pipe.tokenizer.encode(prompt), max_tokens=32, temperature=0)
    assert r2.choices[0].text == ref_text


def test_streaming_and_stop_strings_match_single_stream(fp32, pipe):
    c = fp32.client()
    prompt = PROMPTS[0]
    ref_text, ref = _reference(pipe, prompt, 48)
    chunks = list(c.chat.completions.create(model=MODEL, messages=_chat(prompt), max_tokens=48, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == ref_text
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].model_extra["speculative"]["rounds"] >= 1
    assert chunks[-1].usage.completion_tokens == ref.num_new_tokens and not chunks[-1].choices
    # stop strings: cut exactly where the single-stream pipeline cuts, streamed and not
    assert len(ref_text) >= 20, ref_text
    stop = ref_text[len(ref_text) // 2 : len(ref_text) // 2 + 3]
    cut_text, cut = _reference(pipe, prompt, 48, stop=[stop])
    assert stop not in cut_text and cut.finish_reason == "stop"
    r = c.chat.completions.create(model=MODEL, messages=_chat(prompt), max_tokens=48, temperature=0, stop=[stop])
    assert r.choices[0].message.content == cut_text
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == cut.num_new_tokens
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=MODEL, prompt=pipe.encode(_chat(prompt)), max_tokens=48, temperature=0, stop=stop, stream=True))
    assert streamed == cut_text


def test_seeded_sampling_is_reproducible(fp32, pipe):
    from paratree.verify.warp import SamplingParams

    c = fp32.client()
    prompt = "Tell me a one-line story about a cat."
    kw = dict(model=MODEL, messages=_chat(prompt), max_tokens=32, temperature=0.9, top_p=0.95, seed=1234)
    a = c.chat.completions.create(**kw).choices[0].message.content
    b = c.chat.completions.create(**kw).choices[0].message.content
    assert a == b
    # target-sample verification draws one token per emitted token: same seed, same text as single-stream
    ref, _ = _reference(pipe, prompt, 32, params=SamplingParams(temperature=0.9, top_p=0.95, seed=1234))
    assert a == ref


def test_eight_concurrent_greedy_requests_equal_single_stream(fp32, pipe):
    refs = [_reference(pipe, p, 48)[0] for p in PROMPTS]
    c = fp32.client()
    before = fp32.metrics()

    def one(p):
        return c.chat.completions.create(model=MODEL, messages=_chat(p), max_tokens=48, temperature=0)

    with ThreadPoolExecutor(8) as ex:
        outs = list(ex.map(one, PROMPTS))
    assert [o.choices[0].message.content for o in outs] == refs
    after = fp32.metrics()
    # the requests really shared verify forwards, and throughput mode pruned trees
    rounds = after["paratree_verify_rounds_total"] - before["paratree_verify_rounds_total"]
    assert rounds < sum(o.usage.completion_tokens for o in outs)
    key = 'paratree_policy_rounds_total{mode="throughput"}'
    assert after.get(key, 0) > before.get(key, 0)


def _drafting_server_serves_concurrent_greedy_losslessly(tiny_dir, tmp_path, pipe, *drafter_args) -> dict:
    """Four concurrent greedy chats on a tiny-model server with this drafter == single-stream decoding;
    returns the server's metrics."""
    cost = tmp_path / "cost.json"
    cost.write_text(json.dumps(FLAT_COST))
    srv = Server("--model", str(tiny_dir), "--dtype", "fp32", "--max-batch", "4", "--max-model-len", "512",
                 "--cost-model", str(cost), "--threads", "1", *drafter_args)
    try:
        srv.wait_ready()
        refs = [_reference(pipe, p, 32)[0] for p in PROMPTS[:4]]
        c = srv.client()
        with ThreadPoolExecutor(4) as ex:
            outs = list(ex.map(lambda p: c.chat.completions.create(
                model=MODEL, messages=_chat(p), max_tokens=32, temperature=0), PROMPTS[:4]))
        assert [o.choices[0].message.content for o in outs] == refs
        return srv.metrics()
    finally:
        srv.stop()


def test_draft_model_drafter_serves_concurrent_requests_losslessly(tiny_dir, tmp_path, pipe):
    """`serve --drafter draft-model`: one draft KV cache per sequence; the target as its own draft
    model drafts perfectly, so nearly every round accepts its whole chain."""
    metrics = _drafting_server_serves_concurrent_greedy_losslessly(
        tiny_dir, tmp_path, pipe, "--drafter", "draft-model", "--draft-model", str(tiny_dir), "--draft-depth", "4",
        "--draft-min-prob", "0")
    assert metrics["paratree_tau_mean"] > 3.0


def test_head_plus_lookup_drafter_serves_concurrent_requests_losslessly(tiny_dir, tmp_path, pipe):
    """`serve --drafter jetspec+ngram --head DIR`: every sequence drafts from its own copy of the head's
    context state and lookup hit rates (the server copies one prototype), and greedy outputs under
    concurrency equal single-stream decoding."""
    import torch

    from paratree.models.loader import load_model
    from random_heads import random_block_head

    random_block_head(load_model(str(tiny_dir), "fp32", tokenizer=False)).save(tmp_path / "head", dtype=torch.float32)
    metrics = _drafting_server_serves_concurrent_greedy_losslessly(
        tiny_dir, tmp_path, pipe, "--drafter", "jetspec+ngram", "--head", str(tmp_path / "head"))
    assert metrics["paratree_tau_mean"] >= 1.0


def test_bench_serve_runs_its_drafter_in_the_speculative_modes_only():
    from paratree.serve.bench_serve import MODES, mode_args

    for mode in MODES:
        args = mode_args(mode, "jetspec+ngram")
        drafter = args[args.index("--drafter") + 1]
        assert drafter == ("plain" if mode == "off" else "jetspec+ngram")


def test_disconnect_frees_the_sequence_and_queue_bound_gives_429(fp32):
    m0 = fp32.metrics()
    cancelled0 = m0.get('paratree_requests_finished_total{reason="cancelled"}', 0)
    body = {"model": MODEL, "messages": _chat("Count from 1 to 1000."), "max_tokens": 1900, "temperature": 0,
            "stream": True}
    clients, streams, responses = [], [], []
    try:
        for _ in range(16):  # 8 rows busy + 8 queued = max_queue
            cl = httpx.Client(timeout=60)
            clients.append(cl)
            s = cl.stream("POST", f"{fp32.url}/v1/chat/completions", json=body)
            streams.append(s)
            responses.append(s.__enter__())
            assert responses[-1].status_code == 200
            if len(streams) == 8:  # wait until the first 8 hold rows
                deadline = time.monotonic() + 60
                while fp32.metrics()["paratree_requests_running"] < 8 and time.monotonic() < deadline:
                    time.sleep(0.2)
        deadline = time.monotonic() + 30
        while fp32.metrics()["paratree_queue_depth"] < 8 and time.monotonic() < deadline:
            time.sleep(0.2)
        r = httpx.post(f"{fp32.url}/v1/chat/completions", json={**body, "stream": False}, timeout=30)
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        lines = []
        for line in responses[0].iter_lines():  # a running stream really streams
            if line.startswith("data: "):
                lines.append(line)
            if len(lines) >= 3:
                break
    finally:
        for s in streams:
            s.__exit__(None, None, None)
        for cl in clients:
            cl.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = fp32.metrics()
        if m["paratree_requests_running"] == 0 and m["paratree_queue_depth"] == 0:
            break
        time.sleep(0.3)
    assert m["paratree_requests_running"] == 0 and m["paratree_queue_depth"] == 0
    assert m.get('paratree_requests_finished_total{reason="cancelled"}', 0) - cancelled0 == 16
    # per-request timeout (paratree extension field, capped by --request-timeout): 504, stream: error event
    r = httpx.post(f"{fp32.url}/v1/chat/completions", json={**body, "stream": False, "timeout": 0.3}, timeout=60)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    with httpx.stream("POST", f"{fp32.url}/v1/chat/completions", json={**body, "timeout": 0.3}, timeout=60) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert '"timeout"' in events[-2] and events[-1] == "data: [DONE]"


BAD = [
    (b'{"model": ', 400), (b"[1, 2]", 400), (b'{"model": "\xff\xfe"}', 400), (b"", 400), (b'"x"', 400),
    ({"model": MODEL, "messages": "hi"}, 400),
    ({"model": MODEL, "messages": []}, 400),
    ({"model": MODEL}, 400),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**30}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "10"}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2.5}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": -0.1}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400),
    (b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_k": -7}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": [""]}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 40}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "seed": "x"}, 400),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ({"model": 5, "messages": [{"role": "user", "content": "hi"}]}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hello " * 3000}]}, 400),
]
BAD_COMPLETIONS = [
    ({"model": MODEL, "prompt": []}, 400), ({"model": MODEL, "prompt": [-1]}, 400),
    ({"model": MODEL, "prompt": [10**9]}, 400), ({"model": MODEL, "prompt": ["a", "b"]}, 400),
    ({"model": MODEL, "prompt": ""}, 400), ({"model": MODEL, "prompt": "hi", "echo": True}, 400),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 2048}, 400), ({"model": MODEL, "prompt": None}, 400),
]


def test_bad_inputs_get_openai_errors_and_the_server_stays_up(fp32):
    big = b'{"model": "' + b"x" * (1 << 20) + b'"}'
    cases = [("/v1/chat/completions", b, s) for b, s in BAD] + \
            [("/v1/completions", b, s) for b, s in BAD_COMPLETIONS] + [("/v1/chat/completions", big, 413)]
    t0 = time.monotonic()
    with httpx.Client(base_url=fp32.url, timeout=30) as cl:
        for i in range(300):
            if time.monotonic() - t0 > 60:
                break
            path, body, status = cases[i % len(cases)]
            if isinstance(body, dict):
                r = cl.post(path, json=body)
            else:
                r = cl.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == status, (i, body if len(str(body)) < 300 else "big", r.text[:300])
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert i >= len(cases)
        assert cl.get("/v1/chat/completions").status_code == 405
        assert cl.get("/nope").json()["error"]["type"]
    r = fp32.client().chat.completions.create(model=MODEL, messages=_chat("Say yes."), max_tokens=4, temperature=0)
    assert r.choices[0].message.content and r.usage.completion_tokens <= 4


@pytest.mark.skipif(os.environ.get("PARATREE_SERVE_REAL_FP32") != "1", reason="slow on 2 cores: opt in")
def test_real_model_fp32_concurrent_greedy_equal_single_stream(tmp_path):
    from paratree.engine.pipeline import Pipeline

    cost = tmp_path / "cost.json"
    cost.write_text(json.dumps(STEEP_COST))
    srv = Server("--dtype", "fp32", "--max-batch", "8", "--max-model-len", "1024", "--cost-model", str(cost))
    try:
        real = Pipeline.load(None, "fp32", drafter="ngram", max_len=1024)
        refs = [_reference(real, p, 24)[0] for p in PROMPTS]
        c = srv.wait_ready().client()
        with ThreadPoolExecutor(8) as ex:
            outs = list(ex.map(lambda p: c.chat.completions.create(model=REAL, messages=_chat(p), max_tokens=24,
                                                                    temperature=0), PROMPTS))
        assert [o.choices[0].message.content for o in outs] == refs
    finally:
        srv.stop()


# -- auth and load (bf16 server) --------------------------------------------------------------
def test_bearer_auth_reveals_nothing(bf16):
    for path, method, body in (("/v1/chat/completions", "POST", b"{bad"), ("/v1/models", "GET", None),
                               ("/metrics", "GET", None), ("/health", "GET", None), ("/nope", "GET", None)):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            r = httpx.request(method, bf16.url + path, content=body, headers=headers, timeout=10)
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{bf16.url}/v1", api_key="nope", max_retries=0).models.list()
    assert [m.id for m in bf16.client().models.list().data] == [REAL]


def test_load_sixteen_streaming_clients_no_errors_stable_rss(bf16):
    warmup_s, measure_s = 10.0, 20.0
    stop_at = time.monotonic() + warmup_s + measure_s
    errors: list[str] = []
    done = [0] * 16

    def client_loop(k: int):
        c = bf16.client(timeout=60)
        i = 0
        while time.monotonic() < stop_at and i < 200:
            prompt = PROMPTS[(k + i) % len(PROMPTS)]
            try:
                stream = c.chat.completions.create(model=REAL, messages=_chat(prompt), max_tokens=16 + (k % 3) * 8,
                                                   temperature=0 if k % 2 else 0.8, seed=k, stream=True)
                text, finish = "", None
                for ch in stream:
                    if ch.choices:
                        text += ch.choices[0].delta.content or ""
                        finish = ch.choices[0].finish_reason or finish
                if finish not in ("stop", "length"):
                    errors.append(f"client {k}: finish {finish}")
                done[k] += 1
            except Exception as e:  # any error fails the test
                errors.append(f"client {k}: {type(e).__name__}: {e}")
            i += 1

    threads = [threading.Thread(target=client_loop, args=(k,), daemon=True) for k in range(16)]
    for t in threads:
        t.start()
    time.sleep(warmup_s)
    rss_warm = _rss_kib(bf16.proc.pid)
    peak_batch = 0
    while time.monotonic() < stop_at:
        time.sleep(1.0)
        peak_batch = max(peak_batch, bf16.metrics()["paratree_batch_size"])
    for t in threads:
        t.join(90)
    rss_end = _rss_kib(bf16.proc.pid)
    m = bf16.metrics()
    print(f"\nload: {sum(done)} requests, peak batch {peak_batch}, tau {m['paratree_tau_mean']}, "
          f"RSS {rss_warm / 1024:.0f} -> {rss_end / 1024:.0f} MiB")
    assert not errors, errors[:5]
    assert all(n >= 1 for n in done), done
    assert peak_batch >= 8  # requests really were batched
    assert rss_end <= rss_warm * 1.05, (rss_warm, rss_end)
    assert m["paratree_tau_mean"] > 1.0  # n-gram drafts were accepted under batching
    assert m["paratree_requests_running"] == 0 and m["paratree_queue_depth"] == 0
