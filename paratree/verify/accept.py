"""Lossless acceptance of a draft tree against the target's logits.

Every rule walks from the root. At the current node it either descends into one
child (the child's token is emitted) or stops and emits one token from a residual
distribution. The per-node outcome distribution is computed *exactly* by
`child_accept_probs` (P(descend into child c), residual) and then sampled once;
this is distributionally identical to the usual sequential coin flips, and lets
tests check the acceptance probabilities analytically.

Rules (p = warped target distribution at the node, q = tree.q at the node):
- "greedy": descend into a child carrying argmax(logits); else emit the argmax.
- "target_sample": draw y ~ p; descend into the first child with token y, else
  emit y. Lossless for any tree (q unused).
- "pointmass": EAGLE rule for deterministic (top-k) children: try children in
  order, accept x w.p. p(x) under the current residual, else zero p(x) and
  renormalise. Same distribution as "target_sample".
- "specinfer": children i.i.d. from q; accept x w.p. min(1, p(x)/q(x)); on
  rejection p <- norm(max(0, p - q)). With one child this is Leviathan chain
  rejection sampling.
- "recursive": children drawn from q without replacement, in draw order (RRS,
  arXiv 2402.14160): as "specinfer", and after each rejection also q(x) <- 0 and
  renormalise q.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paratree.tree.draft_tree import DraftTree
from paratree.verify.warp import SamplingParams, sample, warp_probs

RULES = ("greedy", "target_sample", "pointmass", "specinfer", "recursive")
METHODS = RULES + ("chain",)


@dataclass
class AcceptResult:
    path: list[int]  # node indices from the root (0) to the last accepted node
    tokens: list[int]  # accepted draft tokens after the root, then one bonus/correction token

    @property
    def num_accepted(self) -> int:
        return len(self.path) - 1


@dataclass
class BatchAcceptResult:
    paths: torch.Tensor  # (B, L) node indices, -1 padded; paths[:, 0] == 0
    tokens: torch.Tensor  # (B, L) emitted tokens, -1 padded
    lengths: torch.Tensor  # (B,) emitted tokens per row = accepted + 1


def _normalise(r: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """r / sum(r); rows with (numerically) no mass fall back to `fallback`.

    Zero mass only happens on branches of probability ~0 (e.g. rejecting when p == q
    up to rounding), so the fallback choice does not affect the distribution.
    """
    s = r.sum(-1, keepdim=True)
    ok = s > 64 * torch.finfo(r.dtype).eps
    return torch.where(ok, r / s.clamp_min(torch.finfo(r.dtype).tiny), fallback)


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Rejection residual norm(max(0, p - q))."""
    return _normalise((p - q).clamp_min(0.0), p)


def child_accept_probs(
    p: torch.Tensor, q: torch.Tensor | None, child_tokens: torch.Tensor, rule: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact outcome distribution of one node, batched.

    p: (B, V) target probs; q: (B, V) draft probs (needed by specinfer/recursive);
    child_tokens: (B, C) in trial order, -1 = no child.
    Returns acc (B, C) = P(descend into child c) and resid (B, V) = distribution of
    the emitted token given that no child was accepted.
    """
    valid = child_tokens >= 0
    tok = child_tokens.clamp_min(0)
    B, C = child_tokens.shape
    if rule in ("greedy", "target_sample", "pointmass"):
        # P(child c) = p(x_c) for the first occurrence of each token; residual = p off the children.
        same = (tok[:, :, None] == tok[:, None, :]) & valid[:, :, None] & valid[:, None, :]
        earlier = torch.ones(C, C, dtype=torch.bool, device=p.device).tril(-1)
        first = valid & ~(same & earlier).any(-1)
        acc = torch.where(first, p.gather(1, tok), torch.zeros((), dtype=p.dtype, device=p.device))
        covered = torch.zeros_like(p).scatter_add_(1, tok, valid.to(p.dtype)) > 0
        return acc, _normalise(p.masked_fill(covered, 0.0), p)
    if rule not in ("specinfer", "recursive"):
        raise ValueError(f"unknown rule {rule!r}; expected one of {RULES}")
    if q is None:
        raise ValueError(f"rule {rule!r} needs the draft distribution q")
    r, qq = p, q.to(p.dtype)
    reach = torch.ones(B, dtype=p.dtype, device=p.device)
    acc = torch.zeros(B, C, dtype=p.dtype, device=p.device)
    for c in range(C):
        x, v = tok[:, c : c + 1], valid[:, c]
        px, qx = r.gather(1, x)[:, 0], qq.gather(1, x)[:, 0]
        # q(x) = 0 cannot be drafted; if it is anyway, accept iff the target allows x.
        a = torch.where(qx > 0, (px / qx.clamp_min(torch.finfo(p.dtype).tiny)).clamp(max=1.0), (px > 0).to(p.dtype))
        a = torch.where(v, a, torch.zeros_like(a))
        acc[:, c] = reach * a
        reach = reach * (1.0 - a)
        vv = v[:, None]
        r_next = _residual(r, qq)
        if rule == "recursive":
            qq = torch.where(vv, _normalise(qq.scatter(1, x, 0.0), qq), qq)
        r = torch.where(vv, r_next, r)
    return acc, r


def accept_batch(
    tokens: torch.Tensor,
    parents: torch.Tensor,
    target_logits: torch.Tensor,
    params: SamplingParams,
    gen: torch.Generator | None,
    rule: str,
    q: torch.Tensor | None = None,
) -> BatchAcceptResult:
    """Verify B trees at once.

    tokens, parents: (B, N); padding nodes have token -1 and parent -1. Children are
    tried in node-index order. target_logits: (B, N, V), row i = target's next-token
    logits after the root-to-i path. q: (B, N, V) draft probs (specinfer/recursive).
    Only the rows on the walked paths are warped.
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {RULES}")
    if rule in ("specinfer", "recursive") and q is None:
        raise ValueError(f"rule {rule!r} needs the draft distribution q")
    dev = target_logits.device
    tokens, parents = tokens.to(dev), parents.to(dev)
    B, N = tokens.shape
    rows = torch.arange(B, device=dev)
    node_idx = torch.arange(N, device=dev)
    cur = torch.zeros(B, dtype=torch.long, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    path_cols, tok_cols = [cur.clone()], []
    for _ in range(N):
        logits = target_logits[rows, cur]
        kids = (parents == cur[:, None]) & active[:, None]
        C = int(kids.sum(1).max())
        order = torch.where(kids, node_idx, N).sort(dim=1).values[:, :C]
        has = order < N
        kid_nodes = torch.where(has, order, 0)
        kid_tok = torch.where(has, tokens.gather(1, kid_nodes), -1)
        if rule in ("greedy", "target_sample"):
            y = logits.argmax(-1) if rule == "greedy" else sample(warp_probs(logits, params), gen)
            match = kid_tok == y[:, None]
            hit = match.any(1)
            pick = match.to(torch.int8).argmax(1) if C else torch.zeros_like(cur)
            emit = y
        else:
            p = warp_probs(logits, params)
            qn = None if q is None else q.to(dev)[rows, cur]
            acc, resid = child_accept_probs(p, qn, kid_tok, rule)
            stay = (1.0 - acc.sum(1, keepdim=True)).clamp_min(0.0)
            choice = torch.multinomial(torch.cat([acc, stay], 1), 1, generator=gen)[:, 0]
            hit = choice < C
            pick = choice.clamp(max=max(C - 1, 0))
            emit = sample(resid, gen)
        desc = hit & active
        if C:
            child_tok = kid_tok.gather(1, pick[:, None])[:, 0]
            cur = torch.where(desc, kid_nodes.gather(1, pick[:, None])[:, 0], cur)
            emit = torch.where(desc, child_tok, emit)
        tok_cols.append(torch.where(active, emit, -1))
        path_cols.append(torch.where(desc, cur, -1))
        active = desc
        if not bool(active.any()):
            break
    toks = torch.stack(tok_cols, 1)
    paths = torch.stack(path_cols[: len(tok_cols)], 1)
    return BatchAcceptResult(paths=paths, tokens=toks, lengths=(toks >= 0).sum(1))


def _check(tree: DraftTree, target_logits: torch.Tensor) -> None:
    if target_logits.dim() != 2 or target_logits.shape[0] != tree.num_nodes:
        raise ValueError(
            f"target_logits must be (num_nodes={tree.num_nodes}, V), got {tuple(target_logits.shape)}"
        )


def _run(tree: DraftTree, target_logits: torch.Tensor, params: SamplingParams, gen, rule: str) -> AcceptResult:
    _check(tree, target_logits)
    q = tree.q[None] if rule in ("specinfer", "recursive") else None
    res = accept_batch(tree.tokens[None], tree.parents[None], target_logits[None], params, gen, rule, q)
    n = int(res.lengths[0])
    return AcceptResult(path=res.paths[0, :n].tolist(), tokens=res.tokens[0, :n].tolist())


def accept_greedy(tree: DraftTree, target_logits: torch.Tensor) -> AcceptResult:
    """Follow the target argmax while a child carries it; bonus = argmax at the last node."""
    return _run(tree, target_logits, SamplingParams(), None, "greedy")


def accept_target_sample(
    tree: DraftTree, target_logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None
) -> AcceptResult:
    """Draw y ~ p at each node; descend if y is a child. Lossless for any tree."""
    return _run(tree, target_logits, params, gen, "target_sample")


def _specinfer_rule(tree: DraftTree, without_replacement: bool | None) -> str:
    if tree.child_mode == "topk":
        return "pointmass"
    if tree.child_mode not in ("sample", "sample_wor"):
        raise ValueError(f"unknown child_mode {tree.child_mode!r}")
    if tree.q is None:
        raise ValueError(f"child_mode {tree.child_mode!r} needs tree.q for rejection sampling")
    if without_replacement is None:
        without_replacement = tree.child_mode == "sample_wor"
    return "recursive" if without_replacement else "specinfer"


def accept_specinfer(
    tree: DraftTree,
    target_logits: torch.Tensor,
    params: SamplingParams,
    gen: torch.Generator | None,
    without_replacement: bool | None = None,
) -> AcceptResult:
    """Multi-draft rejection sampling with tree.q.

    topk children use the point-mass rule; sampled children use SpecInfer (with
    replacement) or recursive rejection sampling (without; default follows child_mode).
    """
    return _run(tree, target_logits, params, gen, _specinfer_rule(tree, without_replacement))


def _is_chain(tree: DraftTree) -> bool:
    par = tree.parents[1:]
    return par.numel() == 0 or int(torch.bincount(par).max()) <= 1


def accept_chain_rejection(
    tree: DraftTree, target_logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None
) -> AcceptResult:
    """Leviathan et al. chain rejection sampling (a topk chain uses the point-mass q)."""
    return _run(tree, target_logits, params, gen, resolve_rule(tree, params, "chain"))


def choose_method(tree: DraftTree, params: SamplingParams) -> str:
    """The best lossless rule for this tree: one of METHODS."""
    if params.is_greedy:
        return "greedy"
    if tree.q is None:
        return "target_sample"
    if tree.child_mode == "topk":
        return "pointmass"
    if _is_chain(tree):
        return "chain"
    return _specinfer_rule(tree, None)


def resolve_rule(tree: DraftTree, params: SamplingParams, method: str = "auto") -> str:
    """The `accept_batch` rule that `accept(tree, ..., method)` runs (validates the method)."""
    if method == "auto":
        method = choose_method(tree, params)
    if method in ("greedy", "target_sample", "pointmass"):
        return method
    if method == "chain":
        if not _is_chain(tree):
            raise ValueError("method 'chain' needs a chain (every node has at most one child)")
        return _specinfer_rule(tree, False)
    if method in ("specinfer", "recursive"):
        if tree.q is None:
            raise ValueError(f"method {method!r} needs tree.q")
        return method
    raise ValueError(f"unknown method {method!r}; expected 'auto' or one of {METHODS}")


def accept(
    tree: DraftTree,
    target_logits: torch.Tensor,
    params: SamplingParams,
    gen: torch.Generator | None = None,
    method: str = "auto",
) -> AcceptResult:
    """Verify one tree with `method` ("auto" = `choose_method`)."""
    return _run(tree, target_logits, params, gen, resolve_rule(tree, params, method))


def stack_trees(trees: list[DraftTree]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Pad trees to (B, N_max) tokens/parents (pads: token -1, parent -1) and q to (B, N_max, V)."""
    n = max(t.num_nodes for t in trees)
    B = len(trees)
    tokens = torch.full((B, n), -1, dtype=torch.long)
    parents = torch.full((B, n), -1, dtype=torch.long)
    for b, t in enumerate(trees):
        tokens[b, : t.num_nodes] = t.tokens
        parents[b, : t.num_nodes] = t.parents
    q = None
    if all(t.q is not None for t in trees):
        V = trees[0].q.shape[-1]
        q = torch.zeros(B, n, V, dtype=trees[0].q.dtype)
        for b, t in enumerate(trees):
            q[b, : t.num_nodes] = t.q
    return tokens, parents, q
