"""`--budget auto`: size every draft tree against this machine's measured verify cost.

The curve comes from the calibration profile (`engine.costs`). `AutoSizer` prunes each proposed tree to the prefix that maximises
expected accepted tokens per second (`tree.cost.size_tree`). Acceptance per node
comes from the drafter's own probabilities when the tree carries them (`cum_logp`),
calibrated online against verify outcomes, else from a per-(depth, rank) acceptance
table learned online over the run.

Pruning keeps a prefix of the tree, which is itself a valid tree, so it never
changes what is generated, only how fast.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import torch

from ..tree.builders import AcceptanceProfile
from ..tree.cost import VerifyCostModel, path_accept_prob, path_product, size_tree, subtree_prefix
from ..tree.draft_tree import DraftTree


def profile_cost(profile: dict) -> VerifyCostModel:
    """The verify cost curve T(n) stored in a calibration profile."""
    return VerifyCostModel([(int(n), float(s)) for n, s in profile["verify_points"]])



# -- online sizing -----------------------------------------------------------------------
def parse_budget(text: str | int) -> int | str:
    """A tree budget: a positive node count (root included) or "auto"."""
    if isinstance(text, int):
        if text < 1:
            raise ValueError(f"budget must be >= 1, got {text}")
        return text
    t = str(text).strip().lower()
    if t == "auto":
        return "auto"
    try:
        b = int(t)
    except ValueError:
        raise ValueError(f"bad budget '{text}': use a positive integer or 'auto'") from None
    if b < 1:
        raise ValueError(f"budget must be >= 1, got {b}")
    return b



class ProbCalibration:
    """Online map from a draft node's own conditional probability to how often the target
    really picks it (given its parent was reached), per depth bucket and log-probability bin.

    Why: a CPU-trained head's probabilities are far from calibrated (measured: the tree's
    top depth-1 child is accepted ~70% of the time while the head gives it ~30%), and sizing
    on raw `exp(cum_logp)` then prunes the tree to 2-3 nodes. Each bin starts at the
    drafter's own probability (weight `prior_weight`) and moves to the observed hit rate.
    """

    EDGES = (-6.0, -4.0, -3.0, -2.3, -1.6, -1.2, -0.9, -0.6, -0.4, -0.2, -0.1)  # log p bin edges
    DEPTHS = 4  # buckets: depth 1, 2, 3, >= 4

    def __init__(self, prior_weight: float = 4.0):
        self.prior_weight = prior_weight
        nb = len(self.EDGES) + 1
        self.hits = torch.zeros(self.DEPTHS, nb, dtype=torch.float64)
        self.visits = torch.zeros(self.DEPTHS, nb, dtype=torch.float64)
        self._edges = torch.tensor(self.EDGES, dtype=torch.float64)

    def _cells(self, cond_logp: torch.Tensor, depths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (depths.clamp(1, self.DEPTHS) - 1), torch.bucketize(cond_logp.double(), self._edges)

    def observe(self, cond_logp: torch.Tensor, depths: torch.Tensor, hit: torch.Tensor) -> None:
        d, b = self._cells(cond_logp, depths)
        self.visits.index_put_((d, b), torch.ones_like(d, dtype=torch.float64), accumulate=True)
        self.hits.index_put_((d, b), hit.double(), accumulate=True)

    def __call__(self, cond_logp: torch.Tensor, depths: torch.Tensor) -> torch.Tensor:
        d, b = self._cells(cond_logp, depths)
        w = self.prior_weight
        return (self.hits[d, b] + w * cond_logp.double().exp()) / (self.visits[d, b] + w)


def conditional_logp(tree: DraftTree) -> torch.Tensor:
    """log P_draft(node | parent) from a tree's cumulative draft log-probs (root 0)."""
    c = tree.cum_logp.double()
    return c - c[tree.parents.clamp_min(0)] * (tree.parents >= 0)


class AcceptanceModel:
    """P(node accepted | parent accepted), learned online from verify outcomes.

    When a tree carries draft probabilities (`cum_logp`), each node's conditional
    probability is calibrated online (`ProbCalibration`) and multiplied along its path;
    else an empirical P(target picks the rank-r child | depth d) is used, smoothed towards
    an optimistic prior 0.5 * 0.5**r. One model serves single-stream sizing (`AutoSizer`)
    and the server's shared verify budget (`ServePolicy`), so both size trees alike.
    """

    def __init__(self, prior_weight: float = 2.0, max_depth: int = 64, width: int = 64):
        self.prior_weight = prior_weight
        self.profile = AcceptanceProfile(max_depth, width)
        self.calibration = ProbCalibration()

    def table(self, max_depth: int, width: int) -> list[list[float]]:
        hits = self.profile.hits.double()
        visits = self.profile.visits.double()
        w = self.prior_weight
        prior = [0.5 * 0.5**r for r in range(width)]
        rows = []
        for d in range(max_depth):
            if d < visits.numel():
                v = float(visits[d])
                rows.append([(float(hits[d, r]) + w * prior[r]) / (v + w) if r < hits.shape[1] else 0.0
                             for r in range(width)])
            else:
                rows.append(prior)
        return rows

    def node_probs(self, tree: DraftTree) -> torch.Tensor:
        """Estimated P(path to node accepted) for every node (root 1)."""
        if tree.cum_logp is not None:
            return path_product(tree, self.calibration(conditional_logp(tree), tree.depths).tolist())
        dep = int(tree.depths.max()) + 1
        width = int(torch.bincount(tree.parents[1:]).max()) if tree.num_nodes > 1 else 1
        return path_accept_prob(tree, self.table(dep, width))

    def observe(self, tree: DraftTree, path: list[int], tokens: list[int]) -> None:
        """Learn from one verify outcome; `tree` is the drafted (unpruned) tree, `path` its node ids."""
        if tree.num_nodes <= 1:
            return
        if tree.cum_logp is None:
            self.profile.observe_tree(tree, path, tokens)
            return
        # every child of a reached node was tested: a hit iff it is the target's choice
        kids = tree.children()
        tested = [(c, int(tree.tokens[c]) == tok) for node, tok in zip(path, tokens) for c in kids[node]]
        if tested:
            idx = torch.tensor([c for c, _ in tested])
            self.calibration.observe(conditional_logp(tree)[idx], tree.depths[idx],
                                     torch.tensor([h for _, h in tested]))


class RateGate:
    """Run whichever arm (a way to do the next round) has the best *measured* tokens per second.

    Why: a cost model and an acceptance estimate say what a round should earn; the gate checks
    what rounds did earn, on this machine, with this drafter, on this text. Each arm's rate is
    exponentially averaged tokens over averaged seconds (a ratio of averages, so bursts of long
    accepted runs count in full); an arm's first 1/alpha rounds are plainly averaged, so a rarely
    probed arm is not judged by its first, possibly unlucky, round. The caller names a `preferred`
    arm each round (its model's choice): it runs unless another arm measured more than `margin`
    faster. Every other arm is
    probed in turn, at most once per `probe_every` rounds and less often the costlier a probe
    is: in proportion to how much longer its rounds take than the leader's (so probes take
    ~1/probe_every of the time whatever an arm costs) and to how far its rate trails the
    leader's (an arm at half the rate rarely overtakes soon; capped at `max_gap`). Only past
    rounds decide (non-anticipating); every arm verifies a valid tree, so the output is the
    target's whichever runs.
    """

    def __init__(self, arms: Sequence[str], probe_every: int = 16, alpha: float = 0.05, margin: float = 0.05,
                 max_gap: float = 8.0):
        self.arms = tuple(arms)
        self.probe_every, self.alpha, self.margin, self.max_gap = probe_every, alpha, margin, max_gap
        self._avg: dict[str, list[float]] = {}  # arm -> [tokens, seconds] per round, averaged
        self._last: dict[str, int] = {}  # arm -> round it last ran
        self._seen: collections.Counter[str] = collections.Counter()  # arm -> rounds observed
        self.rounds = 0
        self.counts: collections.Counter[str] = collections.Counter()

    def rate(self, arm: str) -> float | None:
        avg = self._avg.get(arm)
        return None if avg is None else avg[0] / max(avg[1], 1e-12)

    def leader(self, preferred: str) -> str:
        best = max((a for a in self.arms if a in self._avg), key=lambda a: self.rate(a), default=preferred)
        pref = self.rate(preferred)
        return preferred if pref is None or pref >= (1.0 - self.margin) * self.rate(best) else best

    def choose(self, preferred: str) -> str:
        if preferred not in self.arms:
            raise ValueError(f"unknown arm '{preferred}': the gate has {', '.join(self.arms)}")
        self.rounds += 1
        lead = self.leader(preferred)
        lead_s, lead_r = (self._avg[lead][1], self.rate(lead)) if lead in self._avg else (None, None)
        due = []
        for a in self.arms:
            if a == lead:
                continue
            slow = 1.0
            if a in self._avg and lead_s:
                gap = min(self.max_gap, lead_r / max(self.rate(a), 1e-12))
                slow = max(1.0, self._avg[a][1] / max(lead_s, 1e-12)) * max(1.0, gap)
            waited = self.rounds - self._last.get(a, 0)
            if waited >= self.probe_every * slow:
                due.append((waited / slow, a))
        arm = max(due)[1] if due else lead
        self._last[arm] = self.rounds
        self.counts[arm] += 1
        return arm

    def observe(self, arm: str, tokens: int, seconds: float) -> None:
        # Step max(alpha, 1/n): the plain mean of the first 1/alpha rounds, an EMA after. (A fixed
        # alpha left an arm probed 12 times weighted 57% on its first round.)
        self._seen[arm] += 1
        avg = self._avg.setdefault(arm, [0.0, 0.0])
        a = max(self.alpha, 1.0 / self._seen[arm])
        avg[0] += a * (tokens - avg[0])
        avg[1] += a * (seconds - avg[1])


class PayoffGate(RateGate):
    """Skip the draft pass while drafted rounds measure slower than plain (root-only) rounds.

    Why: the sizer prunes a tree only after it was drafted, so a head whose drafts do not pay
    (a weak head on an unfamiliar domain) still costs its draft pass every round; and the cost
    curve the sizer trusts was measured once, on a machine whose speed drifts.
    """

    def __init__(self, probe_every: int = 16, alpha: float = 0.05, margin: float = 0.05):
        super().__init__(("draft", "plain"), probe_every, alpha, margin)

    @property
    def skipped(self) -> int:
        return self.counts["plain"]

    def draft_now(self) -> bool:
        return self.choose("draft") == "draft"

    def observe(self, drafted: bool, tokens: int, seconds: float) -> None:
        super().observe("draft" if drafted else "plain", tokens, seconds)


class AutoSizer:
    """sizer(tree) -> the prefix maximising E[accepted tokens] / (draft + overhead + T(n)).

    Acceptance estimates come from an `AcceptanceModel` updated from every verify outcome
    against the *unpruned* proposal, so pruned-away children are still scored whenever the
    target's bonus token lands on them (no lock-in on a low estimate).
    """

    def __init__(self, cost: VerifyCostModel, fixed_seconds: float = 0.0, max_nodes: int | None = None,
                 prior_weight: float = 2.0, max_depth: int = 64, width: int = 64):
        self.cost = cost
        self.fixed_seconds = fixed_seconds
        self.max_nodes = int(max_nodes or cost.points[-1][0])
        self.acceptance = AcceptanceModel(prior_weight, max_depth, width)
        self.gate = PayoffGate()  # the generator asks it whether to draft at all this round
        self.headroom, self.min_propose, self.recent = 2, 8, 8
        self._full: DraftTree | None = None
        self.proposed_nodes: list[int] = []
        self.kept_nodes: list[int] = []

    @classmethod
    def from_profile(cls, profile: dict, drafter: str | None = None, **kw) -> "AutoSizer":
        cost = profile_cost(profile)
        fixed = float(profile.get("round_overhead_s", 0.0))
        d = (profile.get("draft") or {}).get(drafter or "", {})
        # the draft pass at the calibrated 32 nodes: `propose_budget` asks for about what is kept (8-32
        # nodes), not the 256 of `seconds_max`, which would overstate the cost and grow the trees
        fixed += float(d.get("seconds", d.get("seconds_max", 0.0)))
        return cls(cost, fixed_seconds=fixed, **kw)

    def node_accept_prob(self, tree: DraftTree) -> torch.Tensor:
        return self.acceptance.node_probs(tree)

    def propose_budget(self, limit: int) -> int:
        """How many nodes to ask the drafter for: `headroom` x the largest tree kept over the last
        `recent` rounds (at least `min_propose`), capped at `limit` and at the cost curve's end.

        Why: drafting a 256-node tree to keep 5 of its nodes cost more than the verify it saved
        (measured on the gguf runtime: 129-node proposals, ~5 kept, drafted rounds at 50 tok/s
        against plain rounds' 67, so the payoff gate switched drafting off). A best-first drafter's
        smaller tree is the top of its larger one, so asking for what the sizer keeps loses nothing;
        the headroom lets the kept size grow again when acceptance rises.
        """
        kept = self.kept_nodes[-self.recent:]
        want = max(self.min_propose, self.headroom * max(kept)) if kept else 4 * self.min_propose
        return max(1, min(limit, self.max_nodes, want))

    def __call__(self, tree: DraftTree) -> DraftTree:
        self._full = tree
        self.proposed_nodes.append(tree.num_nodes)
        if tree.num_nodes <= 1:
            out = tree
        else:
            if tree.num_nodes > self.max_nodes:
                tree = subtree_prefix(tree, self.max_nodes)
            out = size_tree(tree, self.node_accept_prob(tree), self.cost, self.fixed_seconds)
        self.kept_nodes.append(out.num_nodes)
        return out

    def observe(self, tree: DraftTree, path: list[int], tokens: list[int]) -> None:
        full = self._full if self._full is not None else tree
        self._full = None
        self.acceptance.observe(full, path, tokens)
