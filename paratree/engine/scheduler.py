"""Continuous batching with batched tree verification: the engine behind `paratree serve`.

One thread owns the model. Each round it
1. admits queued requests into free KV rows of one batched TargetRunner cache
   (rows are kept compact: a finished sequence's row is refilled by the last row),
2. prefills new prompts in chunks (<= `prefill_chunk` tokens per round while other
   sequences are decoding, so running streams keep flowing),
3. drafts one tree per decoding sequence, sizes the trees with the serving policy,
   verifies ALL of them in ONE target forward (`TargetRunner.verify_batch`: per-row
   positions, write slots and tree masks), accepts per sequence with that request's
   SamplingParams and seeded generator, commits, and streams the new tokens.

Requests join and leave between rounds. Greedy output per request is the target's
greedy continuation, identical to the single-stream `Generator` (the batched forward
is the same computation up to float rounding).

Policy ("adaptive"): latency mode (every sequence gets the drafter's full tree budget)
while the whole batch's full trees fit in the flat part of the measured verify cost
curve; beyond that, throughput mode. That cost-curve switch point is only the prior: per
batch-size class (1, 2, 3-4, 5-8, ...), a `RateGate` measures the tokens/s rounds of each mode (and of plain, undrafted
rounds) actually earn and runs the fastest, probing the others. Throughput mode: the
verify forward's width (rows are padded to the
widest tree, so a forward of B rows x W nodes costs T(B*W)) is chosen to maximise
expected emitted tokens / (T(B*W) + round overhead), each tree keeping its W nodes of
highest estimated P(path accepted) (a (depth, rank) acceptance profile learned online
from past rounds). Every sizing decision is made before the target scores the round,
from past rounds only (non-anticipating), and pruned trees are parent-closed prefixes,
so acceptance stays lossless.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from ..drafters.base import Drafter, NoDrafter
from ..models.runner import TargetRunner
from ..tree.cost import VerifyCostModel, subtree_prefix
from ..tree.draft_tree import DraftTree
from ..verify.stopping import StopStrings
from ..verify.warp import SamplingParams
from .costs import measure_verify_cost
from .rounds import accept_and_commit, draft_budget, emit, stop_cut, verify_trees
from .sizing import AcceptanceModel, RateGate

POLICIES = ("adaptive", "latency", "throughput")


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later (HTTP 429)."""


# ---------------------------------------------------------------------------------------
# requests and events
# ---------------------------------------------------------------------------------------
@dataclass
class RequestResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled" | "timeout" | "error"
    prompt_tokens: int
    rounds: int
    accepted_per_round: list[int]
    tree_sizes: list[int]
    time_to_first_token: float | None
    time_total: float
    error: str | None = None

    @property
    def tau(self) -> float:
        return sum(self.accepted_per_round) / max(1, self.rounds)


@dataclass
class Event:
    kind: str  # "tokens" (new token ids + text delta) or "done" (result set)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    result: RequestResult | None = None


@dataclass
class EngineRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] | None = None
    timeout_s: float | None = None
    on_event: Callable[[Event], None] | None = None
    drafter: Drafter | None = None  # per-request drafter instance (default: the scheduler's factory)
    request_id: str | None = None


class RequestHandle:
    """What `submit` returns: cancel it, or wait for the result (threads)."""

    def __init__(self, req: EngineRequest, rid: str):
        self.request = req
        self.id = rid
        self.cancelled = False
        self.result: RequestResult | None = None
        self._done = threading.Event()
        self.t_submit = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled = True  # read by the engine at the next round

    def wait(self, timeout: float | None = None) -> RequestResult | None:
        self._done.wait(timeout)
        return self.result

    @property
    def done(self) -> bool:
        return self._done.is_set()


class _Seq:
    """Engine-side state of one admitted request."""

    __slots__ = ("h", "req", "row", "state", "prompt", "pos", "taps", "tokens", "new", "drafter", "gen", "t0",
                 "deadline", "ttft", "rounds", "accepted", "tree_sizes", "finish", "stopper", "sent", "order")

    def __init__(self, h: RequestHandle, drafter: Drafter, order: int, t0: float):
        req = h.request
        self.h, self.req, self.row, self.state = h, req, -1, "prefill"
        self.prompt = list(req.prompt_ids)
        self.pos = 0  # tokens of prompt[:-1] already in the cache
        self.taps: list[torch.Tensor] = []
        self.tokens = list(req.prompt_ids)
        self.new: list[int] = []
        self.drafter = drafter
        seed = req.params.seed
        self.gen = torch.Generator()
        if seed is None:
            self.gen.seed()
        else:
            self.gen.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
        self.t0 = t0
        self.deadline = None if req.timeout_s is None else t0 + req.timeout_s
        self.ttft: float | None = None
        self.rounds = 0
        self.accepted: list[int] = []
        self.tree_sizes: list[int] = []
        self.finish = "length"
        self.stopper = StopStrings(req.stop) if req.stop else None
        self.sent = 0  # characters of text already streamed
        self.order = order

    @property
    def params(self) -> SamplingParams:
        return self.req.params

    @property
    def max_new_tokens(self) -> int:
        return self.req.max_new_tokens


# ---------------------------------------------------------------------------------------
# policy
# ---------------------------------------------------------------------------------------
def _permute(tree: DraftTree, perm: torch.Tensor) -> DraftTree:
    """Reorder nodes by `perm` (new i = old perm[i]); parents must still precede children."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    par = tree.parents[perm]
    new_par = torch.where(par >= 0, inv[par.clamp_min(0)], par)
    return DraftTree(
        tokens=tree.tokens[perm], parents=new_par, depths=tree.depths[perm],
        cum_logp=None if tree.cum_logp is None else tree.cum_logp[perm],
        q=None if tree.q is None else tree.q[perm], child_mode=tree.child_mode, meta=dict(tree.meta),
    )


@dataclass
class Plan:
    mode: str
    trees: list[DraftTree]  # what is verified: a prefix of sources[b]
    sources: list[DraftTree]  # the drafted trees, nodes reordered by estimated acceptance
    perms: list[torch.Tensor | None]  # sources[b] node i = drafted node perms[b][i] (None: identity)


class ServePolicy:
    """Latency / throughput tree sizing for one batched verify forward."""

    def __init__(self, cost: VerifyCostModel, budget: int, max_batch: int, mode: str = "adaptive",
                 flat_tolerance: float = 0.10, estimator: AcceptanceModel | None = None):
        if mode not in POLICIES:
            raise ValueError(f"unknown policy '{mode}': choose from {', '.join(POLICIES)}")
        self.cost, self.budget, self.max_batch, self.mode = cost, budget, max_batch, mode
        self.estimator = estimator or AcceptanceModel()
        t1 = float(cost.seconds(1))
        ns = torch.arange(1, max(2, budget * max_batch) + 1)
        flat = cost.seconds(ns) <= (1.0 + flat_tolerance) * t1
        # Largest verify size still inside the flat (memory-bound) part of the curve. Latency mode
        # (full trees for everyone) runs while the whole batch's full trees fit in it; where not even
        # one full tree fits (typical on CPUs), every batch size is sized in throughput mode.
        self.flat_tokens = int(ns[flat].max()) if bool(flat.any()) else 1
        self.switch_batch = self.flat_tokens // max(1, budget)

    def choose_mode(self, n_seqs: int) -> str:
        """The cost curve's choice for a batch of `n_seqs` (the gate's prior in adaptive mode)."""
        if self.mode != "adaptive":
            return self.mode
        return "latency" if n_seqs <= self.switch_batch else "throughput"

    def arms(self) -> tuple[str, ...]:
        """What a round may do under this policy: latency mode always drafts full trees (it is the
        baseline the others must beat); the others may also fall back to plain, undrafted rounds."""
        return {"latency": (), "throughput": ("throughput", "plain"),
                "adaptive": ("latency", "throughput", "plain")}[self.mode]

    def plan(self, trees: list[DraftTree], overhead_s: float = 0.0, mode: str | None = None) -> Plan:
        """Latency mode: the drafted trees as they are. Throughput mode: a shared verify budget.

        The batched forward pads every row to the widest tree, so one forward over B rows
        of width W costs T(B * W) whatever the rows hold. For each width W the best use is
        every tree's first min(W, n_b) nodes after ordering nodes by estimated P(path
        accepted) (descending, which keeps parents first: a child's estimate never exceeds
        its parent's). W is chosen to maximise
            sum_b E_b(min(W, n_b)) / (T(B * W) + round overhead),
        E_b(k) = 1 + sum of the estimates of tree b's first k - 1 non-root nodes.
        """
        mode = mode or self.choose_mode(len(trees))
        if mode == "latency" or all(t.num_nodes == 1 for t in trees):
            return Plan(mode, trees, trees, [None] * len(trees))
        sources, perms, gains = [], [], []
        for t in trees:
            p = self.estimator.node_probs(t)
            perm = torch.sort(-p, stable=True).indices
            identity = bool((perm == torch.arange(perm.numel())).all())
            sources.append(t if identity else _permute(t, perm))
            perms.append(None if identity else perm)
            gains.append(torch.cumsum(p[perm], 0))  # gains[b][k-1] = E_b(k)
        B = len(trees)
        n = torch.tensor([t.num_nodes for t in trees])
        widths = torch.arange(1, int(n.max()) + 1)
        expected = torch.zeros(widths.numel(), dtype=torch.float64)
        for g in gains:
            expected += g[(widths.clamp(max=g.numel()) - 1)]
        secs = self.cost.seconds(B * widths) + overhead_s
        w = int(widths[int(torch.argmax(expected / secs.clamp_min(1e-12)))])
        out = []
        for b, src in enumerate(sources):
            k = min(w, src.num_nodes)
            t = src if k == src.num_nodes else subtree_prefix(src, k)
            if t.q is not None and t.child_mode != "topk" and (k < src.num_nodes or perms[b] is not None):
                t = replace(t, q=None)  # no longer q-distributed children: target-sample matching (lossless)
            out.append(t)
        return Plan(mode, out, sources, perms)


# ---------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------
class EngineMetrics:
    def __init__(self):
        self.rounds = 0
        self.seq_rounds = 0
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.draft_s = 0.0
        self.verify_s = 0.0
        self.prefill_s = 0.0
        self.verify_tokens = 0
        self.finished: collections.Counter[str] = collections.Counter()
        self.mode_rounds: collections.Counter[str] = collections.Counter()
        self.last_mode = "idle"
        self.last_batch = 0
        self.last_verify_tokens = 0
        self.window: collections.deque[tuple[float, int, int]] = collections.deque()  # (t, tokens, seq_rounds)

    def note_round(self, n_seq: int, tokens: int) -> None:
        now = time.monotonic()
        self.window.append((now, tokens, n_seq))
        while self.window and now - self.window[0][0] > 10.0:
            self.window.popleft()

    def recent(self) -> tuple[float, float]:
        """(tokens/s, tau) over the last 10 s of rounds."""
        if not self.window:
            return 0.0, 0.0
        now = time.monotonic()
        toks = sum(w[1] for w in self.window)
        sr = sum(w[2] for w in self.window)
        span = max(now - self.window[0][0], 1.0)
        return toks / span, toks / max(1, sr)


# ---------------------------------------------------------------------------------------
# the scheduler
# ---------------------------------------------------------------------------------------
class Scheduler:
    """Continuous-batching speculative decoder over one batched TargetRunner."""

    def __init__(
        self,
        runner: TargetRunner,
        drafter_factory: Callable[[], Drafter] | None = None,
        eos_ids: set[int] | None = None,
        decode: Callable[[list[int]], str] | None = None,
        budget: int = 32,
        policy: ServePolicy | str = "adaptive",
        cost: VerifyCostModel | None = None,
        max_queue: int = 64,
        prefill_chunk: int = 64,
        max_model_len: int | None = None,
        method: str = "auto",
    ):
        self.runner = runner
        self.max_batch = runner.batch_size
        # one slot per row stays free for batch padding (see TargetRunner.verify_batch)
        self.max_model_len = min(max_model_len or runner.max_len - 1, runner.max_len - 1)
        if self.max_model_len < 2:
            raise ValueError("the runner's cache is too small")
        self.drafter_factory = drafter_factory or NoDrafter
        self.eos_ids = set(eos_ids or ())
        self.decode = decode
        self.budget = budget
        self.method = method
        if isinstance(policy, str):
            if cost is None:
                cost = measure_verify_cost(runner)
            policy = ServePolicy(cost, budget, self.max_batch, mode=policy)
        self.policy = policy
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.metrics = EngineMetrics()
        self.rows: list[_Seq | None] = [None] * self.max_batch
        self.n_active = 0
        self.waiting: collections.deque[RequestHandle] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._ids = itertools.count()
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._running = False
        self._overhead_s = 0.0  # EMA of per-round time outside the verify forward
        # Rate gates, one per batch-size class 1, 2, 3-4, 5-8, 9-16, ... (a round's cost and gain depend
        # on the batch size; neighbouring sizes share a gate so each learns, and probes, from more rounds):
        # each round runs the policy's arm (latency / throughput / plain) that measured fastest there.
        arms = policy.arms()
        self._gates: collections.defaultdict[int, RateGate] | None = (
            collections.defaultdict(lambda: RateGate(arms)) if arms else None)
        # Consecutive throughput rounds per class whose plan kept only the roots: such a round is a
        # plain round plus a wasted draft pass, and within the gate's margin the prior keeps running
        # it. After `roots_only_rounds` of them the class's prior becomes plain (the gate still
        # probes throughput, whose plan resets the count once drafted nodes pay again).
        self._roots_only: collections.Counter[int] = collections.Counter()
        self.roots_only_rounds = 3
        self.last_error: str | None = None

    # -- submission (any thread) ---------------------------------------------------------
    def check(self, req: EngineRequest) -> None:
        """Raise ValueError if the request can never run here."""
        if not req.prompt_ids:
            raise ValueError("the prompt is empty")
        if req.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if len(req.prompt_ids) + req.max_new_tokens > self.max_model_len:
            raise ValueError(
                f"prompt of {len(req.prompt_ids)} tokens + max_new_tokens {req.max_new_tokens} exceeds the "
                f"context window of {self.max_model_len} tokens")
        if req.stop and self.decode is None:
            raise ValueError("stop strings need a tokenizer")
        req.params.validate()

    def submit(self, req: EngineRequest) -> RequestHandle:
        self.check(req)
        with self._lock:
            # free rows are taken at the start of the next round: they do not count against the queue bound
            if len(self.waiting) >= self.max_queue + (self.max_batch - self.n_active):
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting)")
            h = RequestHandle(req, req.request_id or f"req-{next(self._ids)}")
            self.waiting.append(h)
            self._wake.notify()
        return h

    def cancel(self, h: RequestHandle) -> None:
        h.cancel()
        with self._lock:
            self._wake.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return self.n_active

    # -- background thread ---------------------------------------------------------------
    def start(self) -> "Scheduler":
        if self._thread is not None:
            return self
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="paratree-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._running = False
        with self._lock:
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for s in list(self.rows[: self.n_active]):
            self._finish(s, "cancelled")
        while self.waiting:
            self._finish_unadmitted(self.waiting.popleft(), "cancelled")

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while self._running:
            try:
                busy = self.step()
            except Exception:  # never let the engine thread die: fail the running requests instead
                self.last_error = traceback.format_exc()
                for r in range(self.n_active):  # drop half-done rounds (uncommitted trees) before releasing
                    self.runner.reset(r)
                for s in list(self.rows[: self.n_active]):
                    self._finish(s, "error", error="internal engine error")
                busy = False
            if not busy:
                with self._lock:
                    if not self.waiting and self._running:
                        self._wake.wait(0.05)

    def run_until_idle(self, max_rounds: int = 100_000) -> int:
        """Run rounds in the calling thread until nothing is left (tests, benchmarks)."""
        n = 0
        while (self.waiting or self.n_active) and n < max_rounds:
            self.step()
            n += 1
        return n

    # -- one round -----------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> bool:
        self._admit()
        self._reap()
        did = self._prefill()
        did = self._decode_round() or did
        return did

    def _admit(self) -> None:
        with self._lock:
            while self.waiting and self.n_active < self.max_batch:
                h = self.waiting.popleft()
                if h.cancelled:
                    self._finish_unadmitted(h, "cancelled")
                    continue
                drafter = h.request.drafter or self.drafter_factory()
                s = _Seq(h, drafter, next(self._order), h.t_submit)
                s.row = self.n_active
                self.rows[s.row] = s
                self.runner.reset(s.row)
                self.n_active += 1
                self.metrics.prompt_tokens += len(s.prompt)

    def _reap(self) -> None:
        now = time.perf_counter()
        for s in list(self.rows[: self.n_active]):
            if s.h.cancelled:
                self._finish(s, "cancelled")
            elif s.deadline is not None and now > s.deadline:
                self._finish(s, "timeout")
        with self._lock:
            for h in [h for h in self.waiting if h.cancelled]:
                self.waiting.remove(h)
                self._finish_unadmitted(h, "cancelled")

    def _prefill(self) -> bool:
        pending = sorted((s for s in self.rows[: self.n_active] if s.state == "prefill"), key=lambda s: s.order)
        if not pending:
            return False
        decoding = any(s.state == "decode" for s in self.rows[: self.n_active])
        budget = self.prefill_chunk if decoding else max(self.prefill_chunk, 256)
        t0 = time.perf_counter()
        for s in pending:
            body = s.prompt[:-1]
            take = min(len(body) - s.pos, budget)
            if take > 0:
                out = self.runner.prefill(body[s.pos : s.pos + take], taps=s.drafter.tap_layers, chunk=take,
                                          seq=s.row)
                if out is not None:
                    s.taps.append(out)
                s.pos += take
                budget -= take
            if s.pos >= len(body):
                s.drafter.begin(list(s.prompt), torch.cat(s.taps) if s.taps else None)
                s.taps = []
                s.state = "decode"
            if budget <= 0:
                break
        self.metrics.prefill_s += time.perf_counter() - t0
        return True

    def _decode_round(self) -> bool:
        seqs = [s for s in self.rows[: self.n_active] if s.state == "decode"]
        if not seqs:
            return False
        runner = self.runner
        t0 = time.perf_counter()
        cls = (len(seqs) - 1).bit_length()
        gate = None if self._gates is None else self._gates[cls]
        prior = self.policy.choose_mode(len(seqs))
        if gate is not None and prior == "throughput" and self._roots_only[cls] >= self.roots_only_rounds:
            prior = "plain"
        arm = prior if gate is None else gate.choose(prior)
        if arm != "plain":
            drafted = [s.drafter.propose(s.tokens, draft_budget(self.budget, self.max_model_len - runner.lengths[s.row],
                                                                 s.req.max_new_tokens - len(s.new))) for s in seqs]
            plan = self.policy.plan(drafted, self._overhead_s, mode=arm)
            if arm == "throughput":
                roots_only = all(t.num_nodes == 1 for t in plan.trees)
                self._roots_only[cls] = self._roots_only[cls] + 1 if roots_only else 0
        else:  # plain rounds measured fastest at this batch size lately (or a probe): roots only
            drafted = [DraftTree.chain([s.tokens[-1]]) for s in seqs]
            plan = Plan("plain", drafted, drafted, [None] * len(seqs))
        trees = plan.trees
        taps = tuple(sorted({t for s in seqs for t in s.drafter.tap_layers}))
        t1 = time.perf_counter()
        out = verify_trees(runner, seqs, trees, taps)
        t2 = time.perf_counter()  # acceptance, commit and drafter updates count as round overhead
        # every row is committed here, before any row is released (releases move rows)
        results = accept_and_commit(runner, seqs, trees, out, self.method)
        est = self.policy.estimator
        for i, s in enumerate(seqs):
            if plan.sources[i].num_nodes > 1:  # learn from the whole drafted tree (path mapped back)
                path, toks = results[i]
                perm = plan.perms[i]
                est.observe(drafted[i], path if perm is None else perm[path].tolist(), toks)
        emitted_total = 0
        for i, s in enumerate(seqs):
            emitted_total += self._emit(s, results[i][1], trees[i].num_nodes)
        t3 = time.perf_counter()
        m = self.metrics
        m.rounds += 1
        m.seq_rounds += len(seqs)
        m.generated_tokens += emitted_total
        m.draft_s += t1 - t0
        m.verify_s += t3 - t1
        vt = sum(t.num_nodes for t in trees)
        m.verify_tokens += vt
        m.last_verify_tokens, m.last_batch, m.last_mode = vt, len(seqs), plan.mode
        m.mode_rounds[plan.mode] += 1
        m.note_round(len(seqs), emitted_total)
        other = (t1 - t0) + (t3 - t2)
        self._overhead_s = other if m.rounds == 1 else 0.9 * self._overhead_s + 0.1 * other
        if gate is not None:
            gate.observe(arm, emitted_total, t3 - t0)
        return True

    # -- per-sequence bookkeeping ------------------------------------------------------------
    def _emit(self, s: _Seq, acc_tokens: list[int], tree_size: int) -> int:
        """Apply one round's accepted tokens to `s` (EOS, length, stop strings), stream, maybe finish."""
        stop_check = None if s.stopper is None else (lambda ids: stop_cut(s.stopper, self.decode, ids))
        emitted, finished = emit(s, acc_tokens, self.eos_ids, stop_check)
        s.rounds += 1
        s.tree_sizes.append(tree_size)
        s.accepted.append(len(emitted))
        if emitted and s.ttft is None:
            s.ttft = time.perf_counter() - s.t0
        if finished:
            self._finish(s, s.finish)
        elif emitted:
            delta = self._text_delta(s, final=False)
            self._send(s, Event("tokens", token_ids=list(emitted), text=delta))
        return len(emitted)

    def _final_text(self, s: _Seq) -> str:
        if self.decode is None:
            return ""
        text = self.decode(s.new)
        if s.stopper is not None and (at := s.stopper.find(text)) is not None:
            text = text[:at]
        return text

    def _text_delta(self, s: _Seq, final: bool) -> str:
        if self.decode is None:
            return ""
        if final:
            text = self._final_text(s)
            safe = len(text)
        else:
            text = self.decode(s.new)
            if text.endswith("\ufffd"):  # incomplete UTF-8 sequence: wait for the rest
                text = text[: len(text) - 1]
            safe = s.stopper.safe_len(text) if s.stopper is not None else len(text)
        if safe <= s.sent:
            return ""
        delta = text[s.sent : safe]
        s.sent = safe
        return delta

    def _send(self, s: _Seq, ev: Event) -> None:
        cb = s.req.on_event
        if cb is None:
            return
        try:
            cb(ev)
        except Exception:  # a broken consumer cancels its own request only
            s.h.cancel()

    def _finish(self, s: _Seq, reason: str, error: str | None = None) -> None:
        if s.row < 0 or self.rows[s.row] is not s:
            return
        final_delta = self._text_delta(s, final=True) if reason not in ("error",) else ""
        text = self._final_text(s)
        res = RequestResult(
            token_ids=list(s.new), text=text, finish_reason=reason, prompt_tokens=len(s.prompt), rounds=s.rounds,
            accepted_per_round=list(s.accepted), tree_sizes=list(s.tree_sizes), time_to_first_token=s.ttft,
            time_total=time.perf_counter() - s.t0, error=error,
        )
        self._release(s)
        self.metrics.finished[reason] += 1
        s.h.result = res
        self._send(s, Event("done", token_ids=[], text=final_delta, result=res))
        s.h._done.set()

    def _finish_unadmitted(self, h: RequestHandle, reason: str) -> None:
        res = RequestResult([], "", reason, len(h.request.prompt_ids), 0, [], [], None,
                            time.perf_counter() - h.t_submit)
        h.result = res
        self.metrics.finished[reason] += 1
        cb = h.request.on_event
        if cb is not None:
            try:
                cb(Event("done", result=res))
            except Exception:
                pass
        h._done.set()

    def _release(self, s: _Seq) -> None:
        """Free the sequence's row; the last active row moves into the hole (rows stay compact)."""
        row, last = s.row, self.n_active - 1
        self.runner.reset(row)
        if row != last:
            moved = self.rows[last]
            self.runner.move_seq(last, row)
            self.rows[row] = moved
            moved.row = row
        self.rows[last] = None
        self.n_active -= 1
        s.row = -1
        s.drafter = None
        s.taps = []
