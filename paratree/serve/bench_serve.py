"""Serving benchmark: aggregate and per-user tokens/s at several concurrency levels, in one run.

Modes (each its own `paratree serve` subprocess on 127.0.0.1, all up for the whole run, same
model, same prompts; at each concurrency level the modes run back to back):
  adaptive  speculation on, adaptive latency/throughput policy
  latency   speculation on, latency mode only (every sequence gets the full tree budget)
  off       plain batched decoding (drafter "plain": one token per sequence per forward)

Clients are asyncio streaming clients. At each level, `c` clients send requests back to
back for `--duration` seconds (a request in flight when time is up runs to its end);
aggregate tok/s = completion tokens of all requests / wall time until the last one ends,
per-user tok/s = mean over requests of completion tokens / request latency (TTFT included).

    python -m paratree.serve.bench_serve --levels 1,4,8,16 --duration 30 --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from ..data import load_prompts

MODES = {  # server arguments per mode; "{drafter}" is the bench's --drafter
    "adaptive": ["--drafter", "{drafter}", "--policy", "adaptive"],
    "latency": ["--drafter", "{drafter}", "--policy", "latency"],
    "off": ["--drafter", "plain", "--policy", "latency"],
}


def mode_args(mode: str, drafter: str) -> list[str]:
    """`paratree serve` arguments of one mode: the speculative modes run `drafter`, `off` runs plain."""
    return [a.format(drafter=drafter) for a in MODES[mode]]


def bench_prompts(limit: int) -> list[str]:
    out = []
    sets = []
    for name in ("gsm8k", "humaneval"):
        try:
            sets.append(load_prompts(name, limit=limit))
        except ValueError:
            pass
    for row in zip(*sets):  # interleave the sets
        out.extend(row)
    return out[:limit] if out else ["Write a short story about a robot who learns to paint."]


class ServerProcess:
    """A `python -m paratree serve` subprocess on a free port (the server prints the port it bound)."""

    def __init__(self, args: list[str], key: str | None = None):
        self.key = key
        cmd = [sys.executable, "-m", "paratree", "serve", "--host", "127.0.0.1", "--port", "0", *args]
        if key:
            cmd += ["--api-key", key]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.port: int | None = None
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                self._ready.set()
        self._ready.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def wait(self, timeout: float = 600.0) -> str:
        import httpx

        deadline = time.monotonic() + timeout
        self._ready.wait(timeout)
        if self.port is None:
            raise RuntimeError("server failed to start:\n" + "".join(self.lines[-30:]))
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", headers=self.headers, timeout=5).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + "".join(self.lines[-30:]))
            time.sleep(0.3)
        raise RuntimeError("server not healthy in time")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


async def _one_request(client, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens, spec = None, 0, None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise RuntimeError(str(ev["error"]))
            if ev.get("choices") and ev["choices"][0]["delta"].get("content") and ttft is None:
                ttft = time.perf_counter() - t0
            if ev.get("choices") and ev["choices"][0].get("finish_reason"):
                spec = ev.get("speculative")
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
    dt = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": dt, "ttft": ttft if ttft is not None else dt, "spec": spec}


async def run_level(url: str, model: str, prompts: list[str], clients: int, duration: float, max_tokens: int,
                    offset: int = 0) -> dict:
    import httpx

    stop_at = time.perf_counter() + duration
    results: list[dict] = []
    errors: list[str] = []

    async def client_loop(k: int, client):
        i = 0
        while time.perf_counter() < stop_at:
            prompt = prompts[(offset + k + i * clients) % len(prompts)]
            try:
                results.append(await _one_request(client, url, model, prompt, max_tokens))
            except Exception as e:  # recorded, reported
                errors.append(f"{type(e).__name__}: {e}")
            i += 1

    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        await asyncio.gather(*(client_loop(k, client) for k in range(clients)))
    wall = time.perf_counter() - t0
    toks = sum(r["tokens"] for r in results)
    taus = [r["spec"]["tau"] for r in results if r.get("spec")]
    return {
        "clients": clients, "requests": len(results), "errors": len(errors), "tokens": toks, "wall_s": wall,
        "agg_tok_s": toks / wall if wall > 0 else 0.0,
        "user_tok_s": statistics.mean(r["tokens"] / r["seconds"] for r in results) if results else 0.0,
        "ttft_s": statistics.median(r["ttft"] for r in results) if results else 0.0,
        "tau": statistics.mean(taus) if taus else 0.0, "error_samples": errors[:3],
    }


def run(args) -> dict:
    import httpx

    prompts = bench_prompts(args.prompts)
    levels = [int(x) for x in args.levels.split(",")]
    t_start = time.time()
    out: dict = {"levels": levels, "modes": {}, "max_tokens": args.max_tokens, "duration_s": args.duration,
                 "loadavg_start": os.getloadavg()[0], "started": time.strftime("%Y-%m-%d %H:%M"),
                 "threads": args.threads, "drafter": args.drafter}
    modes = args.modes.split(",")
    servers: dict[str, ServerProcess] = {}
    urls: dict[str, str] = {}
    try:
        for mode in modes:  # started one after another (startup is CPU-heavy), all kept up
            srv_args = mode_args(mode, args.drafter) + ["--dtype", args.dtype, "--max-batch", str(max(levels)), "--max-queue", "256",
                                      "--budget", str(args.budget), "--max-model-len", str(args.max_model_len)]
            if args.model:
                srv_args += ["--model", args.model]
            if args.threads:
                srv_args += ["--threads", str(args.threads)]
            servers[mode] = ServerProcess(srv_args)
            urls[mode] = servers[mode].wait()
            info = [ln for ln in servers[mode].lines if "paratree serve:" in ln]
            out.setdefault("server_info", {})[mode] = info[0].strip() if info else ""
            out["modes"][mode] = []
        model = httpx.get(urls[modes[0]] + "/v1/models").json()["data"][0]["id"]
        for mode in modes:
            asyncio.run(run_level(urls[mode], model, prompts, 1, 0.0, 8))  # warm-up
        # levels outermost, modes interleaved: the modes of one level run minutes apart, not a whole
        # mode sweep apart, so drifting load from other processes hits them alike
        for c in levels:
            for mode in modes:
                url = urls[mode]
                row = asyncio.run(run_level(url, model, prompts, c, args.duration, args.max_tokens))
                metrics = httpx.get(url + "/metrics").text
                sw = re.search(r"^paratree_policy_switch_batch (\S+)", metrics, re.M)
                row["switch_batch"] = int(float(sw.group(1))) if sw else None
                used = dict(re.findall(r'^paratree_policy_rounds_total\{mode="(\w+)"\} (\S+)', metrics, re.M))
                row["policy_rounds"] = {k: int(float(v)) for k, v in used.items()}
                row["loadavg"] = os.getloadavg()[0]
                out["modes"][mode].append(row)
                print(f"{mode:9s} c={c:2d}  agg {row['agg_tok_s']:7.2f} tok/s  per-user {row['user_tok_s']:6.2f} "
                      f"tok/s  TTFT {row['ttft_s']:.2f}s  tau {row['tau']:.2f}  requests {row['requests']}  "
                      f"errors {row['errors']}  load {row['loadavg']:.1f}", file=sys.stderr, flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
    out["loadavg_end"] = os.getloadavg()[0]
    out["minutes"] = round((time.time() - t_start) / 60, 1)
    return out


def markdown(res: dict, command: str) -> str:
    levels = res["levels"]
    modes = list(res["modes"])
    lines = ["## Serving", "",
             "Continuous batching with batched tree verification (`paratree serve`), measured through HTTP with "
             f"streaming clients on 127.0.0.1. `adaptive` = `{res.get('drafter', 'ngram')}` tree drafting with the adaptive "
             "latency/throughput policy; `latency` = the drafter's full tree budget for every sequence; `off` = "
             "plain batched decoding (one token per sequence per forward). Greedy, chat template, prompts "
             "interleaved from GSM8K and HumanEval. Aggregate tok/s = all completion tokens / wall time; "
             "per-user tok/s = mean over requests of completion tokens / request latency (TTFT included).", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
             f"({res.get('threads') or torch.get_num_threads()} thread(s) per server); max_tokens {res['max_tokens']}, {res['duration_s']:.0f} s of "
             f"client load per level; run {res['started']} ({res['minutes']} min). 1-min load average "
             f"{res['loadavg_start']:.1f} before the run and {res['loadavg_end']:.1f} at its end (the servers' own "
             f"load); " + ("other jobs shared the cores, so absolute figures are low and noisy; compare columns."
                           if res["loadavg_start"] > 0.5 * (os.cpu_count() or 1) else
                           "no other job ran. Compare columns: this VM's speed drifts between runs."), "",
             "Command:", "", "```bash", command, "```", ""]
    head = "| clients | " + " | ".join(f"{m} agg tok/s | {m} per-user tok/s" for m in modes) + " |"
    lines += [head, "|" + "---|" * (1 + 2 * len(modes))]
    for i, c in enumerate(levels):
        cells = []
        for m in modes:
            r = res["modes"][m][i]
            cells += [f"{r['agg_tok_s']:.1f}", f"{r['user_tok_s']:.2f}"]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    if "off" in modes:
        others = [m for m in modes if m != "off"]
        lines += ["", "| clients | " + " | ".join(f"{m} / off agg | {m} / off per-user" for m in others) + " |",
                  "|" + "---|" * (1 + 2 * len(others))]
        for i, c in enumerate(levels):
            off = res["modes"]["off"][i]
            cells = []
            for m in others:
                r = res["modes"][m][i]
                cells += [f"{r['agg_tok_s'] / max(off['agg_tok_s'], 1e-9):.2f}x",
                          f"{r['user_tok_s'] / max(off['user_tok_s'], 1e-9):.2f}x"]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += ["", "| clients | " + " | ".join(f"{m} τ | {m} TTFT s | {m} requests (errors)" for m in modes) + " |",
              "|" + "---|" * (1 + 3 * len(modes))]
    for i, c in enumerate(levels):
        cells = []
        for m in modes:
            r = res["modes"][m][i]
            cells += [f"{r['tau']:.2f}", f"{r['ttft_s']:.2f}", f"{r['requests']} ({r['errors']})"]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    if "adaptive" in res["modes"]:
        rows = res["modes"]["adaptive"]
        sw = rows[-1].get("switch_batch")
        curve = res.get("server_info", {}).get("adaptive", "")
        m = re.search(r"verify cost curve \(nodes, ms\) (\[.*?\]): (.*)$", curve)
        lines += ["", f"Adaptive policy: switch point {sw} (latency mode while the batch has at most that many "
                      "sequences, throughput mode above), derived from the verify cost curve"
                  + (f" {m.group(1)} (nodes, ms; {m.group(2)})" if m else "")
                  + ". Verify rounds per mode, cumulative after each level (warm-up included): "
                  + "; ".join(f"{r['clients']} clients: {r['policy_rounds']}" for r in rows) + "."]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace this file's '## Serving' section (up to the next '## ' heading) or append it; others untouched."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    m = re.search(r"^## Serving\s*$", text, re.M)
    if m:
        nxt = re.search(r"^## ", text[m.end():], re.M)
        end = m.end() + nxt.start() if nxt else len(text)
        text = text[: m.start()] + section + ("\n" if nxt else "") + text[end:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--levels", default="1,4,8,16", help="concurrent clients per level, comma-separated")
    p.add_argument("--modes", default="adaptive,off,latency", help=f"subset of {','.join(MODES)}")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of client load per level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--budget", type=int, default=32)
    p.add_argument("--drafter", default="ngram", help="drafter of the speculative modes (adaptive, latency)")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch threads of each server (default: torch's)")
    p.add_argument("--json", default=None, metavar="OUT")
    p.add_argument("--write", default=None, metavar="MD", help="write/replace the '## Serving' section of this file")


def run_cli(args: argparse.Namespace, command: str) -> int:
    for m in args.modes.split(","):
        if m not in MODES:
            raise ValueError(f"unknown mode {m}: choose from {', '.join(MODES)}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    res = run(args)
    res["command"] = command
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    md = markdown(res, command)
    print(md)
    if args.write:
        write_section(Path(args.write), md)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m paratree.serve.bench_serve", description=__doc__.split("\n\n")[0])
    add_bench_args(p)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    return run_cli(args, "python -m paratree.serve.bench_serve " + " ".join(shlex.quote(a) for a in argv))


if __name__ == "__main__":
    sys.exit(main())
