"""The serving engine: a loaded model, its tokenizer and the continuous-batching Scheduler."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from ..drafters import make_drafter
from ..drafters.registry import drafter_spec, fork
from ..engine.costs import CostService
from ..engine.pipeline import encode_prompt
from ..engine.scheduler import Scheduler, ServePolicy
from ..models.loader import LoadedModel, load_model
from ..models.runner import TargetRunner


class ServeEngine:
    def __init__(self, lm: LoadedModel, drafter: str = "ngram", budget: int = 32, max_batch: int = 16,
                 max_queue: int = 64, max_model_len: int = 2048, policy: str = "adaptive",
                 cost_model: str | Path | None = None, request_timeout: float = 600.0,
                 served_model_name: str | None = None, prefill_chunk: int = 64,
                 drafter_options: dict | None = None):
        if max_batch < 1 or max_queue < 0 or budget < 1:
            raise ValueError("need max_batch >= 1, max_queue >= 0, budget >= 1")
        self.lm = lm
        self.model_name = served_model_name or lm.name
        self.drafter_name = drafter
        opts = dict(drafter_options or {})
        if drafter == "draft-model":  # its own KV cache per sequence, as long as the target's
            opts["max_len"] = int(max_model_len) + 1
        costs = CostService(lm, calibrate_if_missing=False)
        # unknown names, missing heads or draft models, tokenizer mismatches fail here, at startup
        proto = make_drafter(drafter, lm, cost=costs.verify_curve(), **opts)
        # each sequence gets its own drafter as its family declares: a copy sharing the loaded weights, or fresh
        factory = fork(drafter_spec(drafter), proto,
                       lambda: make_drafter(drafter, lm, cost=costs.verify_curve(), **opts))
        self.max_model_len = min(int(max_model_len), lm.config.max_position)
        if self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
        self.request_timeout = request_timeout
        self.created = int(time.time())
        # one extra slot per row: batch padding writes there (TargetRunner.verify_batch)
        runner = TargetRunner(lm.model, max_len=self.max_model_len + 1, batch_size=max_batch)
        # Touch the whole preallocated cache now so resident memory does not creep up under load.
        runner.k.fill_(0)
        runner.v.fill_(0)
        t0 = time.perf_counter()
        cost, self.cost_source = costs.batched_curve(runner, cost_model, budget, max_batch)
        self.cost_seconds = time.perf_counter() - t0
        self.policy = ServePolicy(cost, budget, max_batch, mode=policy)
        self._tok_lock = threading.Lock()
        self.scheduler = Scheduler(
            runner, drafter_factory=factory, eos_ids=lm.eos_ids, decode=self.decode,
            budget=budget, policy=self.policy, max_queue=max_queue, prefill_chunk=prefill_chunk,
            max_model_len=self.max_model_len,
        )

    @classmethod
    def load(cls, model: str | None = None, dtype: str = "auto", **kw) -> "ServeEngine":
        return cls(load_model(model, dtype), **kw)

    # tokenizer access is serialised: HF fast tokenizers are not safe to mutate and use concurrently
    def decode(self, ids: list[int]) -> str:
        with self._tok_lock:
            return self.lm.tokenizer.decode(ids, skip_special_tokens=True)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        with self._tok_lock:
            return encode_prompt(self.lm.tokenizer, messages, chat=True)

    def encode_text(self, text: str) -> list[int]:
        with self._tok_lock:
            return encode_prompt(self.lm.tokenizer, text, chat=False)

    @property
    def vocab_size(self) -> int:
        return self.lm.config.vocab_size

    def start(self) -> "ServeEngine":
        self.scheduler.start()
        return self

    def stop(self) -> None:
        self.scheduler.stop()

    def info(self) -> dict:
        return {"model": self.model_name, "drafter": self.drafter_name, "policy": self.policy.mode,
                "switch_batch": self.policy.switch_batch, "max_batch": self.scheduler.max_batch,
                "max_model_len": self.max_model_len, "dtype": str(next(self.lm.model.parameters()).dtype),
                "threads": torch.get_num_threads(), "cost_model": self.cost_source,
                "cost_points_ms": [(n, round(1e3 * sec, 1)) for n, sec in self.policy.cost.points],
                "cost_seconds": round(self.cost_seconds, 3)}
