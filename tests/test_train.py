"""Training: loss goes down, resume after a kill is exact, 2-process DDP equals one process, heads refuse
the wrong target, and any head (trained or not) keeps decoding lossless."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paratree.drafters.block_drafter import BlockHeadDrafter
from paratree.drafters.heads.block import BlockDraftHead, HeadMismatchError
from paratree.drafters import NoDrafter
from paratree.engine.generate import Generator
from paratree.models.loader import load_model
from paratree.models.runner import TargetRunner
from paratree.train.trainer import Trainer, TrainConfig


def _sequences(lm, n=24, seed=0):
    """Self-distilled sequences from the tiny target: random prompt + its own greedy continuation."""
    g = torch.Generator().manual_seed(seed)
    runner = TargetRunner(lm.model, max_len=128)
    gen = Generator(runner, NoDrafter())
    out = []
    for _ in range(n):
        prompt = torch.randint(0, lm.config.vocab_size, (8,), generator=g).tolist()
        out.append({"ids": prompt + gen.generate(prompt, 40).token_ids, "prompt_len": 8})
    return out


def _cfg(tmp, **kw):
    base = dict(family="jetspec", num_layers=1, block_size=6, num_taps=2, lr=3e-3, warmup_steps=2, epochs=100,
                max_steps=6, seqs_per_step=4, anchors_per_seq=8, eval_every=0, checkpoint_every=3,
                output_dir=str(tmp), autocast_bf16=False, eval_seqs=4)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def tiny_lm(tiny_ckpts):
    return load_model(str(tiny_ckpts["llama"]), "fp32", tokenizer=False)


@pytest.fixture(scope="module")
def seqs(tiny_lm):
    return _sequences(tiny_lm)


def _state(head):
    return {k: v.clone() for k, v in head.state_dict().items()}


def test_loss_decreases(tiny_lm, seqs, tmp_path):
    tr = Trainer(_cfg(tmp_path, max_steps=40, checkpoint_every=0), lm=tiny_lm, sequences=seqs, progress=False)
    before = tr.evaluate()["eval_loss"]
    tr.fit()
    after = tr.evaluate()["eval_loss"]
    assert after < 0.8 * before
    assert (tmp_path / "head" / "head.safetensors").is_file()
    assert any("eval_loss" in json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines())


def test_feature_cache_stops_at_its_budget_and_training_is_unchanged(tiny_lm, seqs, tmp_path):
    """Ten times the data does not fit in RAM as cached target states: past `feature_cache_gb` the
    trainer recomputes them, and the head trains to the same weights either way."""
    runs = []
    for gb in (10.0, None):
        if gb is None:  # room for two and a half sequences' states
            gb = 2.5 * max(t.numel() * t.element_size() for t in tr._cache.values()) / 2**30
        tr = Trainer(_cfg(tmp_path / str(gb), checkpoint_every=0, feature_cache_gb=gb), lm=tiny_lm, sequences=seqs,
                     progress=False)
        tr.fit()
        runs.append((len(tr._cache), tr._cache_bytes, _state(tr.head)))
    (n_all, _, a), (n_few, used, b) = runs
    assert n_all > 4 and n_few == 2 and used <= gb * 2**30
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_kill_equals_uninterrupted(tiny_lm, seqs, tmp_path):
    full = Trainer(_cfg(tmp_path / "a"), lm=tiny_lm, sequences=seqs, progress=False)
    full.fit()
    part = Trainer(_cfg(tmp_path / "b"), lm=tiny_lm, sequences=seqs, progress=False)
    real_step = part.train_step

    def dies_at_step_5():
        if part.step == 4:
            raise KeyboardInterrupt  # killed mid-run: step 4 is lost, the step-3 checkpoint survives
        return real_step()

    part.train_step = dies_at_step_5
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    resumed = Trainer(_cfg(tmp_path / "b"), lm=tiny_lm, sequences=seqs, progress=False)
    assert resumed.resume() and resumed.step == 3
    resumed.fit()
    a, b = _state(full.head), _state(resumed.head)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_time_boxed_segments_resume_to_the_uninterrupted_head(tiny_lm, seqs, tmp_path):
    """Training split across working sessions: each `time_limit_min` segment stops after one step with
    a checkpoint, the next resumes from it, and the finished head equals an uninterrupted run's. Only
    the newest `keep_checkpoints` stay on disk; the summary's wall time adds up every segment."""
    full = Trainer(_cfg(tmp_path / "a", max_steps=4, checkpoint_every=0), lm=tiny_lm, sequences=seqs, progress=False)
    full.fit()
    cfg = _cfg(tmp_path / "b", max_steps=4, checkpoint_every=0, time_limit_min=0.0, keep_checkpoints=2)
    segments = []
    while True:
        tr = Trainer(cfg, lm=tiny_lm, sequences=seqs, progress=False)
        tr.resume()
        res = tr.fit()
        segments.append(res.get("stopped_at_step"))
        if "stopped_at_step" not in res:
            break
    assert segments == [1, 2, 3, None]
    a, b = _state(full.head), _state(tr.head)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step_0000003", "step_0000004"]
    e3, e4 = (torch.load(tmp_path / "b" / "checkpoints" / f"step_000000{i}" / "trainer_state.pt",
                         weights_only=False)["elapsed_s"] for i in (3, 4))
    assert 0 < e3 < e4  # the last segment's checkpoint counts the three before it too
    summary = json.loads((tmp_path / "b" / "head" / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["wall_time_s"] >= round(e4, 1) - 0.05
    grown = Trainer(cfg, lm=tiny_lm, sequences=seqs + seqs[:2], progress=False)  # the store grew meanwhile
    with pytest.raises(ValueError, match="trained on other data .*start a new --output-dir"):
        grown.resume()


def test_ddp_two_processes_equal_single_process(tiny_ckpts, tiny_lm, seqs, tmp_path):
    data = tmp_path / "seqs.jsonl"
    data.write_text("".join(json.dumps(s) + "\n" for s in seqs))
    script = Path(__file__).parent / "ddp_train_script.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        "29517", str(script), str(tiny_ckpts["llama"]), str(data), str(tmp_path / "ddp")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: same BLAS blocking, so sums round the same way
    try:
        single = Trainer(_cfg(tmp_path / "single", data=str(data)), lm=tiny_lm, progress=False)
        single.fit()
    finally:
        torch.set_num_threads(threads)
    ddp = BlockDraftHead.load(tmp_path / "ddp" / "checkpoints" / "step_0000006", dtype=torch.float32)
    a, b = _state(single.head), ddp.state_dict()
    # Same global batch, same updates, up to float summation order: Adam turns a rounding-level
    # gradient difference on a near-zero gradient into a ~1e-6 step difference; a wrong gradient
    # reduction (e.g. a mean over ranks instead of a sum) moves weights by ~lr = 3e-3.
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=2e-5), k


def test_head_for_another_target_is_refused(tiny_ckpts, tiny_lm, seqs, tmp_path):
    tr = Trainer(_cfg(tmp_path, max_steps=1), lm=tiny_lm, sequences=seqs, progress=False)
    tr.fit()
    head = BlockDraftHead.load(tmp_path / "head")
    other = load_model(str(tiny_ckpts["qwen2"]), "fp32", tokenizer=False)
    with pytest.raises(HeadMismatchError, match="hidden size|vocab"):
        head.check_target(other.config)
    head.check_target(tiny_lm.config)  # its own target is fine


def test_init_from_continues_a_saved_head_and_refuses_another_shape(tiny_lm, seqs, tmp_path):
    """Fine-tuning starts from the saved weights and draft vocab (not a fresh init, not fresh d2t),
    and a head of another shape is refused before any step."""
    first = Trainer(_cfg(tmp_path / "a", max_steps=20, checkpoint_every=0, draft_vocab=40), lm=tiny_lm,
                    sequences=seqs, progress=False)
    first.fit()
    saved = BlockDraftHead.load(tmp_path / "a" / "head").state_dict()
    other_data = seqs[::-1][:12]  # other sequences: a fresh run would pick another draft vocab
    cont = Trainer(_cfg(tmp_path / "b", max_steps=0, draft_vocab=40, init_from=str(tmp_path / "a" / "head")),
                   lm=tiny_lm, sequences=other_data, progress=False)
    got = cont.head.state_dict()
    assert all(torch.equal(got[k].to(saved[k].dtype), saved[k]) for k in saved)
    fresh = Trainer(_cfg(tmp_path / "c", max_steps=0, draft_vocab=40), lm=tiny_lm, sequences=other_data,
                    progress=False)
    assert not torch.equal(fresh.head.state_dict()["layers.0.attn.wq.weight"].to(torch.bfloat16),
                           saved["layers.0.attn.wq.weight"])
    assert cont.evaluate()["eval_loss"] < 0.9 * fresh.evaluate()["eval_loss"]
    with pytest.raises(ValueError, match="block_size"):
        Trainer(_cfg(tmp_path / "d", block_size=4, draft_vocab=40, init_from=str(tmp_path / "a" / "head")),
                lm=tiny_lm, sequences=seqs, progress=False)


def test_head_mlp_width_is_set_by_the_config_and_survives_save_load(tiny_lm, seqs, tmp_path):
    """intermediate_size narrows the head's MLP below the target's (a 1.5B target's 8960 would make a
    one-layer head 90 MB); the saved head loads back at that width; unset, the target's width is kept."""
    assert tiny_lm.config.intermediate_size != 24
    tr = Trainer(_cfg(tmp_path, max_steps=2, checkpoint_every=0, intermediate_size=24), lm=tiny_lm,
                 sequences=seqs, progress=False)
    assert tr.head.layers[0].mlp.w2.weight.shape == (tiny_lm.config.hidden_size, 24)
    tr.fit()
    loaded = BlockDraftHead.load(tmp_path / "head")
    assert loaded.cfg.intermediate_size == 24
    assert loaded.layers[0].mlp.w13.weight.shape == (48, tiny_lm.config.hidden_size)
    default = Trainer(_cfg(tmp_path / "d", max_steps=0), lm=tiny_lm, sequences=seqs, progress=False)
    assert default.head.cfg.intermediate_size == tiny_lm.config.intermediate_size


@pytest.mark.parametrize("family,tree,pc,dv", [("jetspec", True, False, 0), ("jetspec", True, True, 0),
                                               ("jetspec", False, False, 0), ("dflash", True, False, 0),
                                               ("jetspec", True, True, 40)])
def test_block_head_drafting_is_lossless(tiny_ckpts, seqs, tmp_path, family, tree, pc, dv):
    lm64 = load_model(str(tiny_ckpts["llama"]), "fp64", tokenizer=False)
    lm32 = load_model(str(tiny_ckpts["llama"]), "fp32", tokenizer=False)
    tr = Trainer(_cfg(tmp_path, family=family, loss="kl" if family == "jetspec" else "ce_decay", max_steps=30,
                      checkpoint_every=0, unmask_prob=0.5 if pc else 0.0, draft_vocab=dv), lm=lm32, sequences=seqs,
                 progress=False)
    tr.fit()
    head = BlockDraftHead.load(tmp_path / "head", dtype=torch.float64)
    if dv:  # the draft vocab: the dv most frequent response tokens, saved as exact integer ids
        assert head.d2t.dtype == torch.long and torch.equal(head.d2t, tr.head.d2t.cpu())
        assert head.d2t.numel() == dv and head.d2t.unique().numel() == dv
        from collections import Counter
        counts = Counter(t for q in tr.train_seqs for t in q["ids"][q["prompt_len"]:])
        assert set(head.d2t.tolist()) >= {t for t, _ in counts.most_common(dv // 2)}
    runner = TargetRunner(lm64.model, max_len=128)
    drafter = BlockHeadDrafter(head, lm64.model.embed, lm64.model.lm_head, name=family, tree=tree, width=3,
                               path_conditioned=pc)
    def in_draft_vocab(prompt):
        drafted = drafter.propose(prompt, 12).tokens[1:].tolist()
        assert drafted and set(drafted) <= set(head.d2t.tolist())

    assert drafted_losslessly(runner, drafter, seqs[:4], budget=12, check=in_draft_vocab if dv else None) > 0


@pytest.mark.parametrize("route", ["onednn", "mkl"])
def test_packed_head_drafts_the_same_trees(tiny_ckpts, seqs, tmp_path, route, monkeypatch):
    """make_drafter packs a head (and its draft-vocab projection) like a packed fp32 target: same trees.
    The route is forced: on a tiny model the timed route may well be the stock kernel."""
    from paratree.drafters import make_drafter
    from paratree.models.kernels import ENV
    from paratree.models.transformer import PackedLinear

    monkeypatch.setenv(ENV, route)

    packed = load_model(str(tiny_ckpts["llama"]), "fp32", tokenizer=False, pack=True)
    stock = load_model(str(tiny_ckpts["llama"]), "fp32", tokenizer=False, pack=False)
    Trainer(_cfg(tmp_path, max_steps=20, checkpoint_every=0, draft_vocab=40), lm=stock, sequences=seqs,
            progress=False).fit()
    drafters = [make_drafter("jetspec", lm, head_path=str(tmp_path / "head"), width=3) for lm in (packed, stock)]
    if not isinstance(packed.model.layers[0].mlp.w13, PackedLinear):
        pytest.skip("no packed CPU kernels on this build")
    assert isinstance(drafters[0].head.fc, PackedLinear) and isinstance(drafters[0].lm_head[0], PackedLinear)
    assert isinstance(drafters[1].head.fc, torch.nn.Linear)
    for s in seqs[:4]:
        prompt = s["ids"][:16]
        trees = []
        for d, lm in zip(drafters, (packed, stock)):
            runner = TargetRunner(lm.model, max_len=64)
            d.begin(prompt, runner.prefill(prompt[:-1], taps=d.tap_layers))
            trees.append(d.propose(prompt, 12))
        a, b = trees
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.parents, b.parents)
        assert torch.allclose(a.cum_logp, b.cum_logp, atol=1e-4)


def drafted_losslessly(runner, drafter, seqs, budget, check=None) -> int:
    """Greedy decoding with `drafter` == plain on each sequence's 8-token prompt; returns accepted drafts."""
    accepted = 0
    for s in seqs:
        prompt = s["ids"][:8]
        ref = Generator(runner, NoDrafter()).generate(prompt, 40).token_ids
        res = Generator(runner, drafter, budget=budget).generate(prompt, 40)
        assert res.token_ids == ref
        accepted += sum(res.accept_depths)
        if check:
            check(prompt)
    return accepted


def test_conditioned_rows_match_a_block_with_a_real_prefix(tiny_ckpts):
    """The tree-masked refresh pass sees exactly what a block with an un-masked prefix sees."""
    lm = load_model(str(tiny_ckpts["llama"]), "fp64", tokenizer=False)
    from paratree.tree.draft_tree import DraftTree
    from random_heads import random_block_head

    head = random_block_head(lm, seed=0, num_layers=2, block_size=6)
    d = BlockHeadDrafter(head, lm.model.embed, lm.model.lm_head, name="jetspec", path_conditioned=True)
    runner = TargetRunner(lm.model, max_len=64)
    taps = runner.prefill(list(range(3, 15)), taps=head.cfg.tap_layers)
    d.begin(list(range(3, 16)), taps)
    # root 15 -> 7 -> 9, plus a sibling 8 of 7
    tree = DraftTree(torch.tensor([15, 7, 8, 9]), torch.tensor([-1, 0, 0, 1]), torch.tensor([0, 1, 1, 2]))
    cond = d.conditioned_logits(tree)
    assert torch.allclose(cond[0], d.block_logits(15)[0], atol=1e-10)
    assert torch.allclose(cond[1], d.block_logits(15, [7])[1], atol=1e-10)
    assert torch.allclose(cond[2], d.block_logits(15, [8])[1], atol=1e-10)
    assert torch.allclose(cond[3], d.block_logits(15, [7, 9])[2], atol=1e-10)
    assert not torch.allclose(cond[1], cond[2])  # siblings get different, branch-specific children


def test_cli_refuses_to_restart_over_checkpoints_and_resumes(tiny, tmp_path, capsys):
    from paratree.cli import EXIT_USER_ERROR, main

    lm = load_model(tiny, "fp32")
    data = tmp_path / "seqs.jsonl"
    data.write_text("".join(json.dumps(s) + "\n" for s in _sequences(lm, n=8)))
    out = tmp_path / "run"
    cfg = {k: v for k, v in vars(_cfg(out, data=str(data), target=tiny,
                                       target_dtype="fp32")).items()}
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg))
    part = Trainer(_cfg(out, data=str(data), max_steps=3), lm=lm, progress=False)
    part.fit()  # a run that stopped at its step-3 checkpoint
    before = (out / "checkpoints" / "step_0000003" / "head.safetensors").read_bytes()
    assert main(["train", "--config", str(cfg_file)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "--resume" in err and "step_0000003" in err and "Traceback" not in err
    assert (out / "checkpoints" / "step_0000003" / "head.safetensors").read_bytes() == before  # untouched
    assert not (out / "checkpoints" / "step_0000006").exists()
    assert main(["train", "--config", str(cfg_file), "--resume", "--time-limit", "0"]) == 0
    err = capsys.readouterr().err
    assert "resumed from step 3" in err and "stopped at step 4 of 6 (--time-limit)" in err and "--resume" in err
    assert main(["train", "--config", str(cfg_file), "--resume"]) == 0
    assert "resumed from step 4" in capsys.readouterr().err
    assert (out / "checkpoints" / "step_0000006" / "trainer_state.pt").is_file()


@pytest.mark.slow
def test_auto_target_dtype_computes_taps_on_the_runtime_the_head_drafts_for(tmp_path):
    """`target_dtype: auto` loads the target as decoding runs it here: for the default GGUF model on a
    bf16-native CPU, its own 4-bit weights (Int4Linear), not a bf16 de-quantisation."""
    from paratree.models.loader import auto_dtype
    from paratree.models.quant import Int4Linear

    ids = list(range(1000, 1060))
    cfg = _cfg(tmp_path, target=None, target_dtype="auto", max_steps=1, checkpoint_every=0, seqs_per_step=2)
    tr = Trainer(cfg, sequences=[{"ids": ids, "prompt_len": 8}] * 3, progress=False)
    linear = tr.lm.model.layers[0].attn.wqkv
    if auto_dtype("cpu", None) == "gguf":
        assert isinstance(linear, Int4Linear)
    else:
        assert linear.weight.dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[auto_dtype("cpu", None)]
    assert tr.fit()["loss"] > 0
