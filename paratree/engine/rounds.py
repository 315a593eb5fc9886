"""One speculative round, for one sequence or a batch: the only copy of the round logic.

draft budget -> (the caller drafts and sizes) -> ONE target forward over every tree ->
acceptance by the target's own distribution -> commit -> drafter update -> emission rules
(EOS, length, stop strings). `Generator` (one sequence, `generate`) and `Scheduler` (the
server's continuous batch) both call these, so every improvement reaches both.

A sequence is any object with `tokens` (committed ids, prompt included), `new` (generated
ids), `drafter`, `row` (its KV-cache row), `params`, `gen` (its torch.Generator),
`max_new_tokens` and `finish`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..models.runner import TargetRunner
from ..tree.draft_tree import DraftTree
from ..verify.accept import accept, accept_batch, stack_trees
from ..verify.stopping import StopStrings, truncate_emitted
from ..verify.warp import SamplingParams


def draft_budget(budget: int, room: int, remaining: int) -> int:
    """Nodes a tree may have: the budget, no more than the cache has room for, and no more than
    the tokens still wanted (+1: the root); the root always fits."""
    return max(1, min(budget, room, remaining + 1))


def verify_round(runner: TargetRunner, seqs: Sequence, trees: list[DraftTree], method: str = "auto",
                 taps: tuple[int, ...] = ()) -> list[tuple[list[int], list[int]]]:
    """Verify `trees[i]` for `seqs[i]` in one forward, accept, commit and update each drafter.

    Returns (accepted node path, emitted tokens incl. the bonus) per sequence.
    """
    return accept_and_commit(runner, seqs, trees, verify_trees(runner, seqs, trees, taps), method)


def verify_trees(runner: TargetRunner, seqs: Sequence, trees: list[DraftTree], taps: tuple[int, ...] = ()):
    """The one target forward of a round. A lone sequence on a one-row runner takes `runner.verify`
    (the compiled single-sequence graph where there is one); a batch takes `verify_batch`."""
    if len(seqs) == 1 and runner.batch_size == 1:
        return runner.verify(trees[0], taps=taps, seq=seqs[0].row)
    return runner.verify_batch(trees, [s.row for s in seqs], taps=taps)


def accept_and_commit(runner: TargetRunner, seqs: Sequence, trees: list[DraftTree], out, method: str = "auto"
                      ) -> list[tuple[list[int], list[int]]]:
    """Acceptance by the target's own distribution (every greedy row of a batch in one batched walk),
    then commit and drafter update, for the forward `out` of `verify_trees`."""
    if len(seqs) == 1 and runner.batch_size == 1:
        s, tree = seqs[0], trees[0]
        acc = accept(tree, out.logits, s.params, s.gen, method=method)
        results = [(acc.path, acc.tokens)]
        tap_rows = [None if out.taps is None else out.taps[acc.path]]
    else:
        results = [([], [])] * len(seqs)
        greedy = [i for i, s in enumerate(seqs) if s.params.is_greedy and method in ("auto", "greedy")]
        if greedy:
            tok, par, _ = stack_trees([trees[i] for i in greedy])
            logits = out.logits if len(greedy) == len(seqs) else out.logits[greedy]
            res = accept_batch(tok, par, logits[:, : tok.shape[1]], SamplingParams(), None, "greedy")
            for j, i in enumerate(greedy):
                n = int(res.lengths[j])
                results[i] = (res.paths[j, :n].tolist(), res.tokens[j, :n].tolist())
        gset = set(greedy)
        for i, s in enumerate(seqs):
            if i not in gset:
                a = accept(trees[i], out.logits[i, : trees[i].num_nodes], s.params, s.gen, method=method)
                results[i] = (a.path, a.tokens)
        tap_rows = [None if out.taps is None else out.taps[i, results[i][0]] for i in range(len(seqs))]
    for s, tree, (path, _), rows in zip(seqs, trees, results, tap_rows):
        runner.commit(path, seq=s.row)
        s.drafter.update(tree.tokens[path].tolist(), rows)
    return results


def stop_cut(stopper: StopStrings, decode: Callable[[list[int]], str], ids: list[int]) -> int | None:
    """The shortest token prefix of `ids` whose text reaches a stop string (None: no stop string)."""
    at = stopper.find(decode(ids))
    if at is None:
        return None
    return next(k for k in range(1, len(ids) + 1) if len(decode(ids[:k])) > at)


def emit(seq, accepted: list[int], eos_ids: set[int],
         stop_check: Callable[[list[int]], int | None] | None = None) -> tuple[list[int], bool]:
    """Apply one round's accepted tokens to `seq`: cut at EOS, at max_new_tokens and at a stop
    string (`stop_check(all new ids)` -> cut length); extend `seq.new` and `seq.tokens`; set
    `seq.finish` to "stop" when EOS or a stop string ended it. Returns (emitted, finished)."""
    remaining = seq.max_new_tokens - len(seq.new)
    emitted, finished = truncate_emitted(accepted, eos_ids, remaining)
    if finished and emitted and emitted[-1] in eos_ids:
        seq.finish = "stop"
    if stop_check is not None:
        total = seq.new + emitted
        cut = stop_check(total)
        if cut is not None:
            emitted = total[:cut][len(seq.new):]
            del seq.new[cut:]
            finished, seq.finish = True, "stop"
    seq.new.extend(emitted)
    seq.tokens.extend(emitted)
    return emitted, finished or len(seq.new) >= seq.max_new_tokens
