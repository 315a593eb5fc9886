"""The single-stream speculative decoding loop.

draft -> verify (one target forward over the whole tree) -> accept -> commit.
Plain decoding is the same loop with a root-only tree, so plain and
speculative runs share warping, sampling, stopping and timing code.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..drafters.base import Drafter, NoDrafter
from ..models.runner import ContextOverflowError, TargetRunner
from ..tree.draft_tree import DraftTree
from ..verify.warp import SamplingParams
from .rounds import draft_budget, emit, verify_round


@dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    rounds: int
    time_prefill: float
    time_draft: float
    time_verify: float
    time_total: float
    accepted_per_round: list[int] = field(default_factory=list)  # tokens emitted per round, bonus included
    tree_sizes: list[int] = field(default_factory=list)
    accept_depths: list[int] = field(default_factory=list)  # per round: accepted draft nodes (bonus excluded)

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tau(self) -> float:
        """Mean tokens emitted per verify round (accepted drafts + the bonus token)."""
        return sum(self.accepted_per_round) / max(1, self.rounds)

    @property
    def tokens_per_s(self) -> float:
        return self.num_new_tokens / max(self.time_total, 1e-9)


@dataclass
class _Sequence:
    """The one sequence a Generator decodes (what `rounds` needs of a sequence)."""

    tokens: list[int]
    max_new_tokens: int
    drafter: Drafter
    params: SamplingParams
    gen: torch.Generator
    new: list[int] = field(default_factory=list)
    row: int = 0
    finish: str = "length"


class Generator:
    """Drives one target runner and one drafter over a single sequence at a time."""

    def __init__(self, runner: TargetRunner, drafter: Drafter | None = None, eos_ids: set[int] | None = None,
                 budget: int = 32, method: str = "auto", sizer=None):
        self.runner = runner
        self.drafter = drafter or NoDrafter()
        self.eos_ids = set(eos_ids or ())
        self.budget = budget
        self.method = method
        # Optional tree sizer (e.g. engine.sizing.AutoSizer): sizer(tree) -> a prefix of tree,
        # applied to every proposal before verify; sizer.observe(tree, path, tokens), if it
        # exists, sees each verify outcome. Pruning never changes the output, only speed.
        self.sizer = sizer

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        params: SamplingParams | None = None,
        on_tokens: Callable[[list[int]], bool | None] | None = None,
        stop_check: Callable[[list[int]], int | None] | None = None,
    ) -> GenerationResult:
        """Generate up to `max_new_tokens` after `prompt_ids`.

        `on_tokens(new_ids)` streams committed tokens; returning True cancels.
        `stop_check(all_new_ids)` may return a cut length (stop strings).
        """
        params = params or SamplingParams()
        params.validate()
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        runner = self.runner
        need = len(prompt_ids) + max_new_tokens
        if need > runner.max_len:
            raise ContextOverflowError(
                f"prompt of {len(prompt_ids)} tokens + max_new_tokens {max_new_tokens} = {need} "
                f"exceeds the context window of {runner.max_len} tokens"
            )
        drafter, taps = self.drafter, self.drafter.tap_layers
        seq = _Sequence(list(prompt_ids), max_new_tokens, drafter, params,
                        torch.Generator().manual_seed(params.seed if params.seed is not None else torch.seed()))
        gate = getattr(self.sizer, "gate", None)  # AutoSizer: draft only while drafting pays
        propose_budget = getattr(self.sizer, "propose_budget", None)  # AutoSizer: ask for what it may keep
        runner.warmup(tuple(taps))  # --compile: graphs are built here, not inside a timed round
        t0 = time.perf_counter()
        runner.reset()
        prompt_taps = runner.prefill(prompt_ids[:-1], taps=taps) if len(prompt_ids) > 1 else None
        drafter.begin(list(prompt_ids), prompt_taps)
        res = GenerationResult([], "length", 0, time.perf_counter() - t0, 0.0, 0.0, 0.0)
        finished = False
        while not finished:
            t1 = time.perf_counter()
            drafted = gate is None or gate.draft_now()
            if drafted:
                budget = draft_budget(self.budget, runner.max_len - runner.lengths[0], max_new_tokens - len(seq.new))
                tree = drafter.propose(seq.tokens, budget if propose_budget is None else propose_budget(budget))
                if self.sizer is not None:
                    tree = self.sizer(tree)
            else:  # the gate measured plain decoding faster lately: no draft pass this round
                tree = DraftTree.chain([seq.tokens[-1]])
            t2 = time.perf_counter()
            [(path, accepted)] = verify_round(runner, [seq], [tree], self.method, taps)
            if drafted and self.sizer is not None and hasattr(self.sizer, "observe"):
                self.sizer.observe(tree, path, accepted)
            t3 = time.perf_counter()
            res.time_draft += t2 - t1
            res.time_verify += t3 - t2
            res.rounds += 1
            res.tree_sizes.append(tree.num_nodes)
            res.accept_depths.append(len(path) - 1)
            emitted, finished = emit(seq, accepted, self.eos_ids, stop_check)
            res.accepted_per_round.append(len(emitted))
            if gate is not None:
                gate.observe(drafted, len(accepted), t3 - t1)
            if on_tokens is not None and emitted and on_tokens(emitted):
                finished, seq.finish = True, "cancelled"
        res.token_ids, res.finish_reason = seq.new, seq.finish
        res.time_total = time.perf_counter() - t0
        return res
