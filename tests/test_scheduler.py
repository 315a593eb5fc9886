"""Continuous batching engine without HTTP: batched verification is exact, requests join/leave freely."""

import time

import pytest
import torch

from paratree.drafters import NGramDrafter, NoDrafter
from paratree.engine.generate import Generator
from paratree.engine.costs import measure_verify_cost
from paratree.engine.sizing import AcceptanceModel, RateGate
from paratree.engine.scheduler import (
    EngineRequest,
    QueueFullError,
    Scheduler,
    ServePolicy,
)
from paratree.models.loader import load_model
from paratree.models.runner import ContextOverflowError, TargetRunner
from paratree.tree.cost import VerifyCostModel
from paratree.tree.draft_tree import DraftTree
from paratree.verify.warp import SamplingParams
from test_engine import ScriptedDrafter  # the same scripted tree drafter the single-stream tests use

FLAT = VerifyCostModel([(1, 1.0), (4096, 1.0)])  # free verify tokens: the adaptive policy stays in latency mode
STEEP = VerifyCostModel([(1, 0.010), (8, 0.012), (64, 0.060), (512, 0.50)])


@pytest.fixture(scope="module")
def models(tiny_ckpts):
    return {a: load_model(str(tiny_ckpts[a]), "fp64", tokenizer=False) for a in ("llama", "qwen3")}


def _random_tree(n, vocab, g):
    toks, par, dep = [int(torch.randint(0, vocab, (1,), generator=g))], [-1], [0]
    for i in range(1, n):
        p = int(torch.randint(0, i, (1,), generator=g))
        toks.append(int(torch.randint(0, vocab, (1,), generator=g)))
        par.append(p)
        dep.append(dep[p] + 1)
    return DraftTree(torch.tensor(toks), torch.tensor(par), torch.tensor(dep))


def test_verify_batch_matches_single_verify_fp64(models):
    lm = models["qwen3"]
    V = lm.config.vocab_size
    g = torch.Generator().manual_seed(0)
    single = TargetRunner(lm.model, max_len=128)
    batched = TargetRunner(lm.model, max_len=129, batch_size=5)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (5, 23, 9, 1, 40)]
    for s, p in enumerate(prompts):
        batched.prefill(p, seq=s)
    # row 3 holds a verified-but-uncommitted tree: verify_batch must not clobber it
    pending = _random_tree(4, V, g)
    batched.verify(pending, seq=3)
    trees = {0: _random_tree(7, V, g), 1: _random_tree(1, V, g), 2: _random_tree(12, V, g), 4: DraftTree.chain([3, 4])}
    seqs = [2, 0, 4, 1]  # any order; row 3 lies inside the span but is not verified
    out = batched.verify_batch([trees[s] for s in seqs], seqs)
    for j, s in enumerate(seqs):
        single.reset()
        single.prefill(prompts[s])
        ref = single.verify(trees[s]).logits
        assert torch.allclose(out.logits[j, : trees[s].num_nodes], ref, atol=1e-10, rtol=0)
        assert out.sizes[j] == trees[s].num_nodes
    batched.commit_batch([[0, 1], [0]], [4, 1])
    batched.commit([0, 2], seq=3)  # the pending tree survived the batched forward
    single.reset()
    single.prefill(prompts[3])
    ref = single.verify(pending).logits
    single.commit([0, 2])
    probe = DraftTree.chain([7, 8, 9])
    single_out = single.verify(probe).logits
    assert torch.allclose(batched.verify_batch([probe], [3]).logits[0], single_out, atol=1e-10, rtol=0)
    # moving a sequence to another row keeps its state
    batched._last_tree_size[3] = 0
    batched.move_seq(3, 1)
    assert batched.lengths[1] == len(prompts[3]) + 2 and batched.lengths[3] == 0
    assert torch.allclose(batched.verify_batch([probe], [1]).logits[0], single_out, atol=1e-10, rtol=0)


def test_verify_batch_needs_a_padding_slot(models):
    lm = models["llama"]
    r = TargetRunner(lm.model, max_len=16, batch_size=2)
    r.prefill(list(range(12)), seq=0)
    r.prefill(list(range(3)), seq=1)
    with pytest.raises(ContextOverflowError):  # row 0: 12 + 4 nodes = 16 leaves no slot for padding
        r.verify_batch([DraftTree.chain([1, 2, 3, 4]), DraftTree.chain([1, 2, 3, 4, 5])], [0, 1])
    r.verify_batch([DraftTree.chain([1, 2, 3]), DraftTree.chain([1, 2, 3, 4, 5])], [0, 1])


def _plain(lm, prompt, n, eos=(), params=None):
    runner = TargetRunner(lm.model, max_len=256)
    return Generator(runner, NoDrafter(), eos_ids=set(eos)).generate(prompt, n, params).token_ids


@pytest.mark.parametrize("arch,policy", [("llama", "latency"), ("qwen3", "throughput"), ("llama", "adaptive")])
def test_batched_greedy_equals_single_stream_with_joins_and_leaves(models, arch, policy):
    lm = models[arch]
    V = lm.config.vocab_size
    g = torch.Generator().manual_seed(1)
    specs = []
    for i in range(7):
        base = torch.randint(0, V, (3 + 5 * i % 17,), generator=g).tolist()
        prompt = base + base if i % 2 else base  # repetitive prompts give the n-gram drafter matches
        n_new = [40, 12, 30, 7, 25, 33, 18][i]
        specs.append((prompt, n_new))
    truths = [_plain(lm, p, n) for p, n in specs]
    cost = STEEP if policy != "latency" else FLAT
    sched = Scheduler(TargetRunner(lm.model, max_len=161, batch_size=4), drafter_factory=NGramDrafter, budget=12,
                      policy=policy, cost=cost, prefill_chunk=8, max_queue=16)
    handles = {}
    join_at = {0: [0, 1], 3: [2], 4: [3, 4], 9: [5], 15: [6]}  # round -> requests joining then
    for rnd in range(400):
        for i in join_at.get(rnd, []):
            prompt, n_new = specs[i]
            drafter = ScriptedDrafter(prompt, truths[i], V, seed=i) if i % 3 == 0 else None
            handles[i] = sched.submit(EngineRequest(prompt, n_new, drafter=drafter))
        sched.step()
        if len(handles) == len(specs) and all(h.done for h in handles.values()):
            break
    for i, h in handles.items():
        assert h.done, i
        assert h.result.token_ids == truths[i], (i, policy)
        assert h.result.finish_reason == "length"
    scripted = [handles[i].result for i in (0, 3, 6)]
    assert max(r.tau for r in scripted) > 1.5  # trees really were used
    assert sched.n_active == 0 and all(r is None for r in sched.rows) and sched.queue_depth == 0
    assert sched.metrics.rounds > 0 and sched.metrics.mode_rounds


def test_batched_eos_and_sampling_match_single_stream(models):
    lm = models["llama"]
    V = lm.config.vocab_size
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, V, (9,), generator=g).tolist() for _ in range(4)]
    # EOS: pick a token the plain continuation emits, so truncation at EOS happens mid-tree
    ref0 = _plain(lm, prompts[0], 30)
    eos = {ref0[11]}
    greedy_ref = [_plain(lm, p, 30, eos) for p in prompts]
    sp = [SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i) for i in range(4)]
    sample_ref = [_plain(lm, p, 25, (), sp[i]) for i, p in enumerate(prompts)]
    sched = Scheduler(TargetRunner(lm.model, max_len=129, batch_size=8), drafter_factory=NGramDrafter, eos_ids=eos,
                      budget=8, policy="throughput", cost=STEEP)
    hs = [sched.submit(EngineRequest(p, 30)) for p in prompts]
    hs += [sched.submit(EngineRequest(p + p, 25, params=SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i)))
           for i, p in enumerate(prompts)]
    sched.run_until_idle(1000)
    for i in range(4):
        assert hs[i].result.token_ids == greedy_ref[i]
    assert hs[0].result.finish_reason == "stop" and hs[0].result.token_ids[-1] in eos
    # target-sample matching draws one token per emitted token: with the same seed the speculative
    # batched output is exactly the plain sampled output
    sched2 = Scheduler(TargetRunner(lm.model, max_len=129, batch_size=8), drafter_factory=NGramDrafter,
                       budget=8, policy="latency", cost=FLAT)
    hs2 = [sched2.submit(EngineRequest(p, 25, params=sp[i])) for i, p in enumerate(prompts)]
    sched2.run_until_idle(1000)
    assert [h.result.token_ids for h in hs2] == sample_ref


def test_cancel_timeout_queue_bound_and_events(models):
    lm = models["llama"]
    events = []
    sched = Scheduler(TargetRunner(lm.model, max_len=129, batch_size=2), drafter_factory=NGramDrafter,
                      budget=8, policy="latency", cost=FLAT, max_queue=2)
    a = sched.submit(EngineRequest([1, 2, 3, 1, 2], 100, on_event=events.append))
    b = sched.submit(EngineRequest([4, 5, 6], 100))
    queued = [sched.submit(EngineRequest([7], 5)) for _ in range(2)]  # 2 free rows + max_queue 2
    with pytest.raises(QueueFullError):
        sched.submit(EngineRequest([7], 5))
    for h in queued:
        h.cancel()
    for _ in range(3):
        sched.step()
    assert sched.n_active == 2 and sched.queue_depth == 0
    assert all(h.done and h.result.finish_reason == "cancelled" for h in queued)
    c = sched.submit(EngineRequest([9, 9, 9], 100, timeout_s=0.0))
    sched.cancel(a)
    sched.step()
    assert a.done and a.result.finish_reason == "cancelled" and 0 < len(a.result.token_ids) < 100
    assert [e.kind for e in events][-1] == "done" and all(e.kind == "tokens" for e in events[:-1])
    assert sum(len(e.token_ids) for e in events) == len(a.result.token_ids)
    sched.step()
    assert c.done and c.result.finish_reason == "timeout"
    b.cancel()
    sched.step()
    assert sched.n_active == 0 and b.result.finish_reason == "cancelled"
    with pytest.raises(ValueError):
        sched.submit(EngineRequest([1] * 120, 20))  # does not fit the context window


def test_background_thread_serves_concurrent_submitters(models):
    lm = models["qwen3"]
    V = lm.config.vocab_size
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, V, (6 + i,), generator=g).tolist() for i in range(6)]
    refs = [_plain(lm, p, 20) for p in prompts]
    sched = Scheduler(TargetRunner(lm.model, max_len=129, batch_size=3), drafter_factory=NGramDrafter, budget=6,
                      policy="adaptive", cost=STEEP).start()
    try:
        hs = [sched.submit(EngineRequest(p, 20)) for p in prompts]
        outs = [h.wait(60) for h in hs]
    finally:
        sched.stop()
    assert [o.token_ids for o in outs] == refs


def test_policy_sizing_is_prefix_and_cost_aware():
    cost = VerifyCostModel([(1, 0.01), (16, 0.011), (64, 0.05), (256, 0.2)])
    pol = ServePolicy(cost, budget=8, max_batch=16)
    assert pol.flat_tokens >= 16 and pol.switch_batch == pol.flat_tokens // 8
    assert pol.choose_mode(1) == "latency" and pol.choose_mode(16) == "throughput"
    est = AcceptanceModel()
    pol.estimator = est
    g = torch.Generator().manual_seed(0)
    trees = [_random_tree(8, 50, g) for _ in range(16)]
    plan = pol.plan(trees)
    assert plan.mode == "throughput"
    total = sum(t.num_nodes for t in plan.trees)
    assert len(trees) <= total < sum(t.num_nodes for t in trees)
    width = max(t.num_nodes for t in plan.trees)  # one forward width W: every tree keeps min(W, n) nodes
    assert all(t.num_nodes == min(width, s.num_nodes) for t, s in zip(plan.trees, plan.sources))
    assert ServePolicy(cost, 8, 16).switch_batch >= 1
    steep = ServePolicy(STEEP, 8, 16)
    assert steep.switch_batch == 0 and steep.choose_mode(1) == "throughput"  # not even one full tree is free
    for t, src, perm in zip(plan.trees, plan.sources, plan.perms):
        t.validate()
        assert torch.equal(t.tokens, src.tokens[: t.num_nodes])
        if perm is not None:  # reordered nodes are the drafted ones
            assert sorted(perm.tolist()) == list(range(src.num_nodes))
    # a flat curve never prunes; a latency-only policy never prunes
    assert ServePolicy(FLAT, 8, 16).plan(trees).trees == trees
    assert ServePolicy(cost, 8, 16, mode="latency").plan(trees).trees == trees


def test_measure_verify_cost_runs_and_restores(models):
    lm = models["llama"]
    r = TargetRunner(lm.model, max_len=65, batch_size=4)
    r.prefill([1, 2, 3], seq=1)
    cost = measure_verify_cost(r, sizes=(1, 4, 8), repeats=1)
    assert [n for n, _ in cost.points] == [1, 4, 8]
    assert r.lengths == [0, 3, 0, 0]


def test_cost_model_is_measured_once_then_loaded(models, tmp_path):
    from paratree.engine.costs import load_or_measure_cost

    r = TargetRunner(models["llama"].model, max_len=65, batch_size=2)
    path = tmp_path / "cost.json"
    cost, measured = load_or_measure_cost(r, path, sizes=(1, 2, 4), repeats=1)
    assert measured and path.is_file()
    again, measured2 = load_or_measure_cost(r, path, sizes=(1, 2, 4), repeats=1)
    assert not measured2 and again.points == cost.points


def test_throughput_budget_follows_calibrated_draft_probabilities():
    """The server's shared verify budget uses the same online-calibrated acceptance model as
    `--budget auto`: a head that under-states its taken chain gets that chain kept first."""
    from paratree.tree.builders import build_best_first

    rows = torch.full((4, 40), -9.0)
    rows[:, :3] = torch.tensor([0.0, -1.0, -2.0])  # token 2 (p ~ 0.09) is the one the target always takes
    t = build_best_first(3, rows, budget=40, max_depth=3, width=3, keep_q=False)  # the full 3-ary tree
    kids = t.children()
    chain, node = [0], 0
    while (c := [k for k in kids[node] if int(t.tokens[k]) == 2]):
        node = c[0]
        chain.append(node)
    assert len(chain) == 4
    from paratree.engine.sizing import AutoSizer

    pol = ServePolicy(STEEP, budget=40, max_batch=4)
    sizer = AutoSizer(STEEP)
    before = pol.estimator.node_probs(t)
    for _ in range(80):
        taken = [int(t.tokens[c]) for c in chain[1:]] + [39]
        pol.estimator.observe(t, chain, taken)
        sizer(t)
        sizer.observe(t, chain, taken)
    after = pol.estimator.node_probs(t)
    assert after[chain[2]] > 0.8 > 0.01 > before[chain[2]]
    assert torch.equal(after, sizer.node_accept_prob(t))  # one acceptance model for server and single stream
    plan = pol.plan([t, t, t, t])  # throughput mode on a steep curve: every tree is cut to one width
    kept = plan.trees[0].num_nodes
    assert kept < t.num_nodes
    order = plan.perms[0] if plan.perms[0] is not None else torch.arange(t.num_nodes)
    assert set(chain[: min(kept, len(chain))]) <= set(order[:kept].tolist())  # the learnt chain survives the cut


class _SlowUselessDrafter:
    """Drafts a chain of (almost surely) wrong tokens and sleeps 30 ms doing it: speculation that never pays."""

    name = "slow-useless"
    tap_layers = ()

    def __init__(self, vocab):
        self.vocab = vocab

    def begin(self, prompt_ids, prompt_taps):
        pass

    def update(self, new_tokens, new_taps):
        pass

    def propose(self, tokens, budget):
        time.sleep(0.03)
        return DraftTree.chain([tokens[-1]] + [(tokens[-1] + 1 + k) % self.vocab for k in range(min(budget, 6) - 1)])


@pytest.mark.parametrize("policy", ["adaptive", "latency"])
def test_payoff_gate_stops_drafting_that_does_not_pay(models, policy):
    """The adaptive policy measures drafted rounds slower than plain ones and stops drafting (probing
    now and then); latency mode, the baseline, drafts every round. Output is the target's either way."""
    lm = models["llama"]
    V = lm.config.vocab_size
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, V, (6 + i,), generator=g).tolist() for i in range(3)]
    truths = [_plain(lm, p, 80) for p in prompts]
    sched = Scheduler(TargetRunner(lm.model, max_len=128, batch_size=3), drafter_factory=lambda: _SlowUselessDrafter(V),
                      budget=6, policy=policy, cost=FLAT)
    handles = [sched.submit(EngineRequest(p, 80)) for p in prompts]
    sched.run_until_idle()
    assert [h.result.token_ids for h in handles] == truths
    rounds = sched.metrics.mode_rounds
    if policy == "latency":
        assert rounds["plain"] == 0 and rounds["latency"] > 0
    else:
        assert rounds["plain"] > 0.5 * sum(rounds.values()), rounds
        assert rounds["latency"] >= 1 and rounds["throughput"] >= 1, rounds  # it did try both drafted modes


class _FreeUselessDrafter(_SlowUselessDrafter):
    """Wrong chains at no cost: a throughput round that keeps only the roots earns what a plain one does."""

    def __init__(self, vocab):
        super().__init__(vocab)
        self.proposals = 0

    def propose(self, tokens, budget):
        self.proposals += 1
        return DraftTree.chain([tokens[-1]] + [(tokens[-1] + 1 + k) % self.vocab for k in range(min(budget, 6) - 1)])


def test_roots_only_throughput_rounds_turn_the_prior_to_plain(models):
    """Once the throughput planner keeps only the roots for a few rounds, the batch stops drafting
    (no draft pass wasted within the gate's margin), probing throughput now and then."""
    lm = models["llama"]
    V = lm.config.vocab_size
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, V, (6 + i,), generator=g).tolist() for i in range(3)]
    truths = [_plain(lm, p, 100) for p in prompts]
    drafters = []

    def factory():
        drafters.append(_FreeUselessDrafter(V))
        return drafters[-1]

    sched = Scheduler(TargetRunner(lm.model, max_len=160, batch_size=3), drafter_factory=factory,
                      budget=6, policy="throughput", cost=STEEP)
    sched._gates.default_factory = lambda: RateGate(("throughput", "plain"), margin=1.0)  # measured rates never overrule the prior: only the plan can
    handles = [sched.submit(EngineRequest(p, 100)) for p in prompts]
    sched.run_until_idle()
    assert [h.result.token_ids for h in handles] == truths
    rounds = sched.metrics.mode_rounds
    assert rounds["plain"] > 0.6 * sum(rounds.values()), rounds
    assert 0 < rounds["throughput"], rounds  # still probed
    assert max(d.proposals for d in drafters) < 0.4 * max(h.result.rounds for h in handles)


def test_rate_gate_runs_the_fastest_measured_arm_and_bounds_probe_time():
    """The cost curve's preferred mode runs until another arm measures faster; slow arms are
    probed less often in proportion, so probes cost ~1/probe_every of the time."""
    from paratree.engine.sizing import RateGate

    speed = {"latency": (4, 0.10), "throughput": (3, 0.05), "plain": (1, 0.04)}  # tokens, seconds
    g = RateGate(("latency", "throughput", "plain"), probe_every=8)
    picks = []
    for _ in range(400):
        a = g.choose("latency")  # the prior says latency; throughput earns 60 tok/s against 40
        picks.append(a)
        g.observe(a, *speed[a])
    late = picks[200:]
    assert late.count("throughput") > 0.8 * len(late)
    assert 0 < late.count("latency") and 0 < late.count("plain")  # both still probed
    secs = {a: sum(speed[a][1] for p in late if p == a) for a in speed}
    assert secs["latency"] <= 1.5 * sum(secs.values()) / 8  # a 2x slower arm is probed half as often
    g = RateGate(("latency", "throughput", "plain"), probe_every=8, margin=0.05)
    for _ in range(100):
        a = g.choose("latency")
        g.observe(a, *{"latency": (3, 0.05), "throughput": (2.9, 0.05), "plain": (1, 0.05)}[a])
    assert g.leader("latency") == "latency"  # within the margin the prior keeps the lead
    with pytest.raises(ValueError, match="unknown arm"):
        g.choose("fast")


def test_rate_gate_does_not_judge_a_rarely_probed_arm_by_its_first_round():
    """A probed arm's first round can be unlucky (a latency tree rejected at the root); its rate
    must be the mean of its rounds so far, so the gate finds the faster arm after a few probes."""
    from paratree.engine.sizing import RateGate

    g = RateGate(("throughput", "latency"), probe_every=8)
    first = {"latency": True}
    picks = []
    for _ in range(200):
        a = g.choose("throughput")
        picks.append(a)
        if a == "latency":  # 2 tokens / 0.05 s = 40 tok/s against throughput's 30, but starts unlucky
            g.observe(a, 0 if first["latency"] else 2, 0.05)
            first["latency"] = False
        else:
            g.observe(a, 3, 0.1)
    assert g.leader("throughput") == "latency"
    assert picks[100:].count("latency") > 80, picks
    g = RateGate(("a", "b"), alpha=0.05)
    for tokens in (0, 2, 4):
        g.observe("a", tokens, 0.1)
    assert g.rate("a") == pytest.approx(20.0)  # the mean of 3 rounds: (0 + 2 + 4) / 3 / 0.1
