"""Statistical losslessness of every acceptance rule, on toy models, through the library.

A toy target and draft have fixed random logits keyed by the last 3 tokens of the
prefix (exact for the prefixes that decide the first 3 tokens). Each run drafts a
tree from the draft model, verifies it with `paratree.verify.accept_batch` (the
code path `accept()` uses), cuts at EOS / length with `truncate_emitted_batch`, and
repeats until 3 tokens (or EOS) are out. Runs are batched in torch, so each
configuration does 1e5 runs in about a second. The empirical joint of the
first 3 emitted tokens is G-tested against the exact target distribution obtained
by enumeration with the same `warp_probs` plain sampling uses.
"""

from __future__ import annotations

import importlib
import zlib
from dataclasses import dataclass, field

import pytest
import torch
from scipy.stats import chi2

from paratree.tree import DraftTree, build_best_first, top2gap_caps
from paratree.verify import (
    SamplingParams,
    accept,
    accept_batch,
    choose_method,
    resolve_rule,
    stack_trees,
    truncate_emitted_batch,
    warp_probs,
)
from paratree.verify.accept import BatchAcceptResult

accept_mod = importlib.import_module("paratree.verify.accept")  # the package re-exports a function `accept`

RUNS = 100_000
OUT_LEN = 3
BOS = 0


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small batched ops: intra-op threading only adds contention on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- toy models
class ToyLM:
    """Target/draft logit tables keyed by a code of the last 3 tokens (code 0 = empty prefix)."""

    def __init__(self, V: int, seed: int, kind: str = "noisy", mask: tuple[int, ...] = (), depth_rows: int = 4):
        g = torch.Generator().manual_seed(seed)
        self.V, self.M = V, (V + 1) ** 3
        self.target = 1.5 * torch.randn(self.M, V, generator=g)
        noise = 1.5 * torch.randn(self.M, V, generator=g)
        if kind == "same":  # p == q
            self.draft = self.target.clone()
        elif kind == "anti":  # draft favours what the target dislikes: most children get rejected
            self.draft = -self.target
        else:
            self.draft = 0.6 * self.target + 0.8 * noise
        if mask:  # q(x) = 0 < p(x)
            self.draft[:, list(mask)] = float("-inf")
        # per-depth rows for parallel-head style (path-independent) drafting
        self.heads = 0.6 * self.target[:, None, :] + 0.8 * torch.randn(self.M, depth_rows, V, generator=g)

    def next_code(self, code: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        return (code * (self.V + 1) + tok + 1) % self.M

    def exact_first_tokens(self, params: SamplingParams, eos: tuple[int, ...]) -> torch.Tensor:
        """P(first 3 tokens), sequences ending at EOS, indexed by `encode`."""
        P = warp_probs(self.target.double(), params)
        out = torch.zeros((self.V + 1) ** OUT_LEN, dtype=torch.float64)

        def rec(code: int, prefix: list[int], prob: float):
            if len(prefix) == OUT_LEN or (prefix and prefix[-1] in eos):
                out[encode_list(prefix, self.V)] += prob
                return
            for x in range(self.V):
                px = float(P[code, x])
                if px > 0:
                    rec(int(self.next_code(torch.tensor(code), torch.tensor(x))), prefix + [x], prob * px)

        rec(0, [], 1.0)
        return out


def encode_list(seq: list[int], V: int) -> int:
    return sum((t + 1) * (V + 1) ** j for j, t in enumerate(seq))


def encode(out: torch.Tensor, V: int) -> torch.Tensor:
    w = (V + 1) ** torch.arange(out.shape[1])
    return ((out + 1) * w).sum(1)


# ---------------------------------------------------------------- batched drafters
def draft_fixed_shape(lm: ToyLM, ctx, root, shape, mode, gen, draft_params: SamplingParams | None = None):
    """A tree with `shape[d]` children per depth-d node, children drawn per `mode` from q."""
    b, V = ctx.shape[0], lm.V
    toks, pars, codes = [root], [-1], [ctx]
    q_rows: dict[int, torch.Tensor] = {}
    frontier = [0]
    for k in shape:
        fcodes = torch.stack([codes[u] for u in frontier], 1)
        logits = lm.draft[fcodes]
        qf = warp_probs(logits, draft_params) if draft_params else torch.softmax(logits, -1)
        flat = qf.reshape(-1, V)
        if mode == "topk":
            ch = torch.sort(flat, dim=-1, descending=True, stable=True).indices[:, :k]
        else:
            ch = torch.multinomial(flat, k, replacement=(mode == "sample"), generator=gen)
        ch = ch.reshape(b, len(frontier), k)
        nxt = []
        for fi, u in enumerate(frontier):
            q_rows[u] = qf[:, fi]
            for j in range(k):
                t = ch[:, fi, j]
                nxt.append(len(toks))
                toks.append(t)
                pars.append(u)
                codes.append(lm.next_code(codes[u], t))
        frontier = nxt
    N = len(toks)
    q = torch.zeros(b, N, V)
    for u, row in q_rows.items():
        q[:, u] = row
    parents = torch.tensor(pars).expand(b, N)
    return torch.stack(toks, 1), parents, q, torch.stack(codes, 1)


def draft_cached(lm: ToyLM, ctx, build):
    """Deterministic (top-k) trees depend only on the context: build one per distinct context."""
    uniq, inv = torch.unique(ctx, return_inverse=True)
    trees, node_codes = [], []
    for c in uniq.tolist():
        root = BOS if c == 0 else c % (lm.V + 1) - 1
        tree = build(lm, c, root).validate()
        trees.append(tree)
        codes = [c]
        for i in range(1, tree.num_nodes):
            codes.append(int(lm.next_code(torch.tensor(codes[int(tree.parents[i])]), tree.tokens[i])))
        node_codes.append(torch.tensor(codes))
    tokens, parents, q = stack_trees(trees)
    codes = torch.zeros_like(tokens)
    for i, c in enumerate(node_codes):
        codes[i, : c.numel()] = c
    return tokens[inv], parents[inv], None if q is None else q[inv], codes[inv], trees[0]


def best_first_path(lm: ToyLM, code: int, root: int):
    def path_dist(path):
        c = torch.tensor(code)
        for t in path:
            c = lm.next_code(c, torch.tensor(t))
        return lm.draft[c]

    return build_best_first(root, None, budget=9, max_depth=3, width=3, path_dist=path_dist)


def best_first_heads_top2gap(lm: ToyLM, code: int, root: int):
    rows = lm.heads[code, :3]
    return build_best_first(root, rows, budget=10, max_depth=3, width=3,
                            fanout_caps=top2gap_caps(rows, 3, beta=2.0, g0=0.5))


# ---------------------------------------------------------------- simulation
@dataclass
class Cfg:
    name: str
    params: SamplingParams
    V: int = 6
    shape: tuple[int, ...] | None = (2, 2, 1)
    mode: str = "sample"
    method: str = "auto"
    expect: str | None = None  # the rule "auto" must resolve to
    kind: str = "noisy"
    mask: tuple[int, ...] = ()
    eos: tuple[int, ...] = ()
    builder: object = None
    warp_draft: bool = False
    seed: int = 0
    lm: ToyLM = field(init=False, repr=False)

    def __post_init__(self):
        self.lm = ToyLM(self.V, 1000 + self.seed, self.kind, self.mask)


def verify_lossy_accept_all(tokens, parents, logits, params, gen, rule, q):
    """Deliberately lossy: accept every chain token, bonus from p at the leaf."""
    b, N = tokens.shape
    bonus = torch.multinomial(warp_probs(logits[:, -1], params), 1, generator=gen)
    out = torch.cat([tokens[:, 1:], bonus], 1)
    return BatchAcceptResult(torch.arange(N).expand(b, N), out, torch.full((b,), N))


def simulate(cfg: Cfg, runs: int, seed: int, verify=accept_batch) -> tuple[torch.Tensor, dict]:
    lm, gen = cfg.lm, torch.Generator().manual_seed(seed)
    out = torch.full((runs, OUT_LEN), -1, dtype=torch.long)
    n_out = torch.zeros(runs, dtype=torch.long)
    ctx = torch.zeros(runs, dtype=torch.long)
    root = torch.full((runs,), BOS, dtype=torch.long)
    active = torch.ones(runs, dtype=torch.bool)
    stats = {"rounds": 0, "accepted": 0, "rules": set()}
    draft_params = cfg.params if cfg.warp_draft else None
    while bool(active.any()):
        idx = active.nonzero()[:, 0]
        if cfg.builder is None:
            tokens, parents, q, codes = draft_fixed_shape(
                lm, ctx[idx], root[idx], cfg.shape, cfg.mode, gen, draft_params
            )
            sample_tree = DraftTree(tokens[0], parents[0], torch.zeros_like(tokens[0]), q=q[0], child_mode=cfg.mode)
        else:
            tokens, parents, q, codes, sample_tree = draft_cached(lm, ctx[idx], cfg.builder)
        rule = resolve_rule(sample_tree, cfg.params, cfg.method)
        stats["rules"].add(rule)
        res = verify(tokens, parents, lm.target[codes], cfg.params, gen, rule, q)
        keep, fin = truncate_emitted_batch(res.tokens, set(cfg.eos), OUT_LEN - n_out[idx])
        stats["rounds"] += idx.numel()
        stats["accepted"] += int((res.lengths - 1).sum())
        for j in range(res.tokens.shape[1]):
            m = j < keep
            rows, t = idx[m], res.tokens[m, j]
            out[rows, n_out[rows]] = t
            n_out[rows] += 1
            ctx[rows] = lm.next_code(ctx[rows], t)
            root[rows] = t
        active[idx] = ~fin
    return encode(out, cfg.V), stats


def g_test(codes: torch.Tensor, expected_p: torch.Tensor) -> float:
    """G-test p-value; cells with expected count < 5 are pooled. Impossible outcomes give 0."""
    obs = torch.bincount(codes, minlength=expected_p.numel()).double()
    exp = expected_p * codes.numel()
    if bool(((exp == 0) & (obs > 0)).any()):
        return 0.0
    small = exp < 5
    o, e = obs[~small], exp[~small]
    if bool(small.any()) and float(exp[small].sum()) > 0:
        o = torch.cat([o, obs[small].sum()[None]])
        e = torch.cat([e, exp[small].sum()[None]])
    if e.numel() > 1 and float(e[-1]) < 5:  # pooled cell still tiny: merge with the smallest cell
        j = int(torch.argmin(e[:-1]))
        o[j] += o[-1]
        e[j] += e[-1]
        o, e = o[:-1], e[:-1]
    if e.numel() < 2:
        return 1.0
    nz = o > 0
    G = 2.0 * float((o[nz] * torch.log(o[nz] / e[nz])).sum())
    return float(chi2.sf(G, e.numel() - 1))


# ---------------------------------------------------------------- configurations
T1 = SamplingParams(temperature=1.0)
CONFIGS = [
    # chain rejection sampling (sampled chain -> "chain" -> specinfer rule with one child)
    Cfg("chain T1", T1, shape=(1, 1, 1), expect="specinfer"),
    Cfg("chain T0.5", SamplingParams(temperature=0.5), shape=(1, 1, 1, 1), expect="specinfer"),
    Cfg("chain T1.5 top-k3", SamplingParams(temperature=1.5, top_k=3), shape=(1, 1, 1), expect="specinfer"),
    Cfg("chain top-p0.8", SamplingParams(temperature=1.0, top_p=0.8), shape=(1, 1, 1), expect="specinfer"),
    Cfg("chain min-p0.15 warped draft", SamplingParams(temperature=1.0, min_p=0.15), shape=(1, 1, 1),
        warp_draft=True, expect="specinfer"),
    # SpecInfer multi-draft, i.i.d. children (duplicates happen)
    Cfg("specinfer T1", T1, expect="specinfer"),
    Cfg("specinfer T0.5 top-p0.9", SamplingParams(temperature=0.5, top_p=0.9), expect="specinfer"),
    Cfg("specinfer dup-heavy V4 3x", T1, V=4, shape=(3, 2, 1), expect="specinfer", seed=1),
    Cfg("specinfer T1.5 top-k4 min-p", SamplingParams(temperature=1.5, top_k=4, min_p=0.05), expect="specinfer"),
    # recursive rejection sampling, children without replacement
    Cfg("recursive T1", T1, mode="sample_wor", expect="recursive"),
    Cfg("recursive T1.5 top-k4", SamplingParams(temperature=1.5, top_k=4), mode="sample_wor", expect="recursive"),
    Cfg("recursive V4 3 of 4", SamplingParams(temperature=0.7, top_p=0.95), V=4, shape=(3, 2, 1),
        mode="sample_wor", expect="recursive", seed=2),
    # deterministic top-k children: point-mass rule
    Cfg("pointmass T1", T1, shape=(3, 2, 1), mode="topk", expect="pointmass"),
    Cfg("pointmass T0.5 top-k2", SamplingParams(temperature=0.5, top_k=2), shape=(3, 2, 1), mode="topk",
        expect="pointmass"),
    Cfg("best-first path-conditioned", T1, shape=None, builder=best_first_path, expect="pointmass"),
    Cfg("best-first heads top2gap T1.5 top-p", SamplingParams(temperature=1.5, top_p=0.9), shape=None,
        builder=best_first_heads_top2gap, expect="pointmass"),
    # target-sample matching (explicit method, any tree)
    Cfg("target-sample on iid tree", SamplingParams(temperature=0.8), method="target_sample",
        expect="target_sample"),
    Cfg("target-sample on topk tree min-p", SamplingParams(temperature=1.0, min_p=0.1), shape=(3, 1, 1),
        mode="topk", method="target_sample", expect="target_sample"),
    # edge cases
    Cfg("q(x)=0<p(x) specinfer", T1, mask=(0, 1), expect="specinfer"),
    Cfg("q(x)=0<p(x) recursive", T1, mask=(0, 1), mode="sample_wor", expect="recursive"),
    Cfg("p=q specinfer", T1, kind="same", expect="specinfer"),
    Cfg("p=q recursive", T1, kind="same", mode="sample_wor", expect="recursive"),
    Cfg("all rejected (anti draft, top-k2)", SamplingParams(temperature=1.0, top_k=2), kind="anti",
        expect="specinfer"),
    Cfg("all rejected pointmass", SamplingParams(temperature=1.0, top_k=2), kind="anti", shape=(2, 1, 1),
        mode="topk", expect="pointmass"),
    # EOS inside the tree: emitted sequences stop at EOS
    Cfg("EOS chain", T1, shape=(1, 1, 1), eos=(2,), expect="specinfer", seed=3),
    Cfg("EOS specinfer", T1, eos=(2,), expect="specinfer", seed=3),
    Cfg("EOS recursive top-p", SamplingParams(temperature=1.0, top_p=0.9), mode="sample_wor", eos=(2,),
        expect="recursive", seed=3),
    Cfg("EOS best-first", T1, shape=None, builder=best_first_path, eos=(2,), expect="pointmass", seed=3),
]
ALPHA = 1e-3 / len(CONFIGS)  # Bonferroni over the family


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.name for c in CONFIGS])
def test_first_tokens_match_target(cfg: Cfg):
    codes, stats = simulate(cfg, RUNS, seed=zlib.crc32(cfg.name.encode()))
    assert stats["rules"] == {cfg.expect}
    assert stats["accepted"] > 0.05 * stats["rounds"] or cfg.kind == "anti"  # the drafts do get used
    pval = g_test(codes, cfg.lm.exact_first_tokens(cfg.params, cfg.eos))
    assert pval > ALPHA, f"{cfg.name}: p={pval:.2e}"


def test_edge_configs_exercise_their_edge():
    # anti draft: most rounds accept nothing; EOS config: EOS shows up inside accepted paths
    _, stats = simulate(CONFIGS[[c.name for c in CONFIGS].index("all rejected (anti draft, top-k2)")], 20_000, 1)
    assert stats["accepted"] < 0.3 * stats["rounds"]
    cfg = CONFIGS[[c.name for c in CONFIGS].index("EOS specinfer")]
    codes, _ = simulate(cfg, 20_000, 1)
    first = codes % (cfg.V + 1) - 1
    assert float((first == 2).double().mean()) > 0.05


# ---------------------------------------------------------------- the test can fail
def test_detects_unconditional_acceptance():
    cfg = Cfg("lossy chain", T1, shape=(1, 1, 1))
    codes, _ = simulate(cfg, RUNS, seed=7, verify=verify_lossy_accept_all)
    assert g_test(codes, cfg.lm.exact_first_tokens(cfg.params, ())) < 1e-12


def test_detects_naive_resampling_after_rejection(monkeypatch):
    # resampling from p (not the residual) after a rejection is a classic subtle bug
    monkeypatch.setattr(accept_mod, "_residual", lambda p, q: p)
    cfg = Cfg("specinfer naive residual", T1)
    codes, _ = simulate(cfg, RUNS, seed=8)
    assert g_test(codes, cfg.lm.exact_first_tokens(cfg.params, ())) < 1e-6


# ---------------------------------------------------------------- greedy
@pytest.mark.parametrize("shape,mode", [((1, 1, 1), "topk"), ((2, 2, 1), "sample"), (None, "topk")])
def test_greedy_reproduces_argmax_decoding(shape, mode):
    cfg = Cfg("greedy", SamplingParams(), shape=shape, mode=mode, builder=None if shape else best_first_path)
    codes, stats = simulate(cfg, 2_000, seed=3)
    assert stats["rules"] == {"greedy"}
    exact = cfg.lm.exact_first_tokens(cfg.params, ())
    assert torch.all(codes == int(torch.argmax(exact)))
    assert float(exact.max()) == 1.0


# ---------------------------------------------------------------- chain acceptance length
def test_chain_mean_accepted_length_matches_analytic():
    """Path-independent per-depth p_d, q_d: E[accepted] = sum_k prod_{j<=k} alpha_j, alpha = sum min(p, q)."""
    g = torch.Generator().manual_seed(11)
    V, D, B = 6, 4, 400_000
    params = SamplingParams(temperature=1.0)
    tgt = 1.5 * torch.randn(D + 1, V, generator=g)
    q = torch.softmax(0.6 * tgt[:D] + 0.8 * torch.randn(D, V, generator=g), -1)
    p = warp_probs(tgt.double(), params)
    alpha = torch.minimum(p[:D], q.double()).sum(-1)
    analytic = float(torch.cumprod(alpha, 0).sum())
    draws = torch.stack([torch.multinomial(q[d], B, replacement=True, generator=g) for d in range(D)], 1)
    tokens = torch.cat([torch.zeros(B, 1, dtype=torch.long), draws], 1)
    parents = torch.arange(-1, D).expand(B, D + 1)
    qq = torch.cat([q, torch.zeros(1, V)]).expand(B, D + 1, V)
    tree = DraftTree(tokens[0], parents[0], torch.arange(D + 1), q=qq[0], child_mode="sample")
    rule = resolve_rule(tree, params, choose_method(tree, params))
    res = accept_batch(tokens, parents, tgt.expand(B, D + 1, V), params, g, rule, qq)
    mean = float((res.lengths - 1).double().mean())
    assert abs(mean - analytic) < 0.01 * analytic, (mean, analytic)


# ---------------------------------------------------------------- the single-tree API, run per call
def test_accept_api_per_call_first_token_is_target():
    """accept() itself (python per call) on fresh sampled trees: first emitted token ~ p."""
    lm = ToyLM(5, 77)
    params = SamplingParams(temperature=1.0, top_p=0.95)
    gen = torch.Generator().manual_seed(5)
    firsts = []
    for _ in range(4_000):
        tokens, parents, q, codes = draft_fixed_shape(lm, torch.zeros(1, dtype=torch.long),
                                                      torch.zeros(1, dtype=torch.long), (3, 1), "sample", gen)
        tree = DraftTree(tokens[0], parents[0], torch.tensor([0, 1, 1, 1, 2, 2, 2]), q=q[0], child_mode="sample")
        res = accept(tree, lm.target[codes[0]], params, gen)
        assert res.path[0] == 0 and len(res.tokens) == len(res.path)
        firsts.append(res.tokens[0])
    p0 = warp_probs(lm.target[0].double(), params)
    assert g_test(torch.tensor(firsts), p0) > 1e-3


# ---------------------------------------------------------------- DSpark non-anticipation
def _dspark_first_tokens(admit: torch.Tensor, gen) -> torch.Tensor:
    """Vocab {A=0, B=1}, p_t = (.7, .3), p_d = (.5, .5); x1 ~ p_d is verified only where admit."""
    B = admit.numel()
    q = torch.tensor([0.5, 0.5])
    x1 = torch.multinomial(q, B, replacement=True, generator=gen)
    tokens = torch.stack([torch.zeros(B, dtype=torch.long), torch.where(admit, x1, -1)], 1)
    parents = torch.tensor([-1, 0]).expand(B, 2).clone()
    parents[~admit, 1] = -1  # not admitted: a padding node, the root has no child
    logits = torch.log(torch.tensor([0.7, 0.3])).expand(B, 2, 2)
    res = accept_batch(tokens, parents, logits, SamplingParams(temperature=1.0), gen, "specinfer",
                       torch.stack([q, torch.zeros(2)]).expand(B, 2, 2))
    return res.tokens[:, 0]


def test_dspark_anticipating_scheduler_is_detected():
    gen = torch.Generator().manual_seed(21)
    B = 100_000
    q = torch.tensor([0.5, 0.5])
    x1 = torch.multinomial(q, B, replacement=True, generator=gen)
    # the scheduler peeks at x1: admit only when x1 == A
    tokens = torch.stack([torch.zeros(B, dtype=torch.long), torch.where(x1 == 0, x1, -1)], 1)
    parents = torch.where(tokens >= 0, torch.tensor([-1, 0]), -1)
    logits = torch.log(torch.tensor([0.7, 0.3])).expand(B, 2, 2)
    res = accept_batch(tokens, parents, logits, SamplingParams(temperature=1.0), gen, "specinfer",
                       torch.stack([q, torch.zeros(2)]).expand(B, 2, 2))
    first = res.tokens[:, 0]
    assert abs(float((first == 0).double().mean()) - 0.85) < 0.01
    assert g_test(first, torch.tensor([0.7, 0.3], dtype=torch.float64)) < 1e-12


def test_non_anticipating_gate_is_lossless():
    from paratree.tree import VerifyCostModel
    from paratree.verify import prefix_length_from_confidence

    gen = torch.Generator().manual_seed(22)
    B = 100_000
    # confidences known before x1 is drawn (vary per run, independent of the token)
    conf = torch.rand(B, 1, generator=gen)
    for n in (prefix_length_from_confidence(conf, threshold=0.5),
              prefix_length_from_confidence(conf, VerifyCostModel([(1, 1.0), (2, 1.5)]))):
        admit = n >= 1
        assert 0.3 < float(admit.double().mean()) < 0.7
        first = _dspark_first_tokens(admit, gen)
        assert g_test(first, torch.tensor([0.7, 0.3], dtype=torch.float64)) > 1e-3
