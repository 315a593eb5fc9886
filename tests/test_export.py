"""`paratree export`: a head written in another engine's checkpoint format is the same function.
The exported tensors, run through the format's reference forward (tests/format_reference.py, written
from the format's definition), give paratree's own head's logits and confidences on real taps."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from format_reference import dflash_block, dspark_block, eagle3_chain
from paratree.drafters.heads.block import BlockDraftHead, BlockHeadConfig
from paratree.drafters.heads.dspark import DSparkHead
from paratree.export import export_head
from paratree.drafters.heads.dspark_format import to_dspark
from paratree.models.loader import load_model
from paratree.models.runner import TargetRunner


@pytest.fixture(scope="module")
def tiny64(tiny_ckpts):
    return load_model(str(tiny_ckpts["llama"]), "fp64", tokenizer=False)


def _dspark_head(tcfg, seed=0, **kw) -> DSparkHead:
    """A DSpark head with random weights (every tensor non-trivial), exportable unless kw says otherwise."""
    base = dict(family="dspark", num_taps=2, num_layers=2, block_size=5, causal=False, tap_norm=False,
                root_in=False, draft_vocab=40, target_name="tiny")
    base.update(kw)
    cfg = BlockHeadConfig.for_target(tcfg, **base)
    cfg.extra.update(markov_rank=6, conf_temperature=0.8)
    head = DSparkHead(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in head.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
        if head.d2t is not None:
            head.d2t.copy_(torch.randperm(tcfg.vocab_size, generator=g)[: cfg.draft_vocab].sort().values)
    return head.double().eval()


@torch.inference_mode()
def _paratree_block(head, lm, taps, anchor, prev):
    """What paratree's DSpark drafter computes for one block (drafters/block_drafter.py, dspark_drafter.py)."""
    n, bs = taps.shape[0], head.cfg.block_size
    kv = head.context_kv(head.fuse(taps[None]), torch.arange(n)[None])
    toks = torch.full((1, bs), -1)
    toks[0, 0] = anchor
    x = head.block_embeddings(lm.model.embed.weight, toks, None)
    h = head.forward_blocks(x, torch.arange(n, n + bs)[None], kv, None)[0]
    lm_w = head.lm_weight(lm.model.lm_head.weight)
    logits, conf = head.sequential(h, lambda y: F.linear(y, lm_w), torch.tensor(prev))
    return logits, torch.sigmoid(conf / head.conf_temperature)


@torch.inference_mode()
def test_dspark_export_is_the_same_function_on_real_taps(tiny64):
    lm = tiny64
    head = _dspark_head(lm.config)
    ids = torch.randint(0, lm.config.vocab_size, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    runner = TargetRunner(lm.model, max_len=64)
    taps = runner.prefill(ids[:-1], taps=head.cfg.tap_layers)  # real target taps of the context
    mask_id = lm.config.vocab_size - 1
    sd, cfg = to_dspark(head, lm.model.embed.weight, lm.model.lm_head.weight, mask_id, 128)
    prev = [ids[-1], 7, 11, 3, 5]  # the anchor, then teacher-forced chain tokens
    want_logits, want_conf = _paratree_block(head, lm, taps, ids[-1], prev)
    got_logits, got_conf = dspark_block(sd, cfg, taps, ids[-1], prev)
    assert torch.allclose(got_logits[:, head.d2t], want_logits, rtol=1e-9, atol=1e-9)
    assert torch.isinf(got_logits).sum() == cfg["block_size"] * (lm.config.vocab_size - cfg["draft_vocab_size"])
    assert torch.allclose(got_conf, want_conf, rtol=1e-9, atol=1e-12)


def test_export_writes_the_format_and_refuses_what_it_cannot_express(tiny64, tmp_path):
    lm = tiny64
    head = _dspark_head(lm.config, seed=2)
    head.float().save(tmp_path / "head", dtype=torch.float32)
    out = export_head(tmp_path / "head", "dspark", tmp_path / "out", lm=lm, mask_token_id=9)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3DSparkModel"] and cfg["mask_token_id"] == 9
    assert cfg["target_layer_ids"] == list(head.cfg.tap_layers) and cfg["draft_vocab_size"] == 40
    sd = load_file(str(out / "model.safetensors"))
    assert torch.equal(sd["d2t"] + torch.arange(40), head.d2t)  # offsets, as EAGLE-3 / DeepSpec store them
    ids = list(range(3, 20))
    taps = TargetRunner(lm.model, max_len=64).prefill(ids[:-1], taps=head.cfg.tap_layers)
    head64 = head.double()
    want, _ = _paratree_block(head64, lm, taps, ids[-1], [ids[-1], 4, 4, 4, 4])
    got, _ = dspark_block(sd, cfg, taps, ids[-1], [ids[-1], 4, 4, 4, 4])
    assert torch.allclose(got[:, head.d2t], want, rtol=1e-5, atol=1e-5)  # fp32 files, fp64 forwards

    head.save(tmp_path / "normed", dtype=torch.float32)
    for name, kw, why in [("tapnorm", dict(tap_norm=True), "tap_norm: false"),
                          ("rootin", dict(root_in=True), "root_in: false"),
                          ("causal", dict(causal=True), "causal")]:
        _dspark_head(lm.config, **kw).float().save(tmp_path / name, dtype=torch.float32)
        with pytest.raises(ValueError, match=why):
            export_head(tmp_path / name, "dspark", tmp_path / "x", lm=lm)
    with pytest.raises(ValueError, match="it is a dspark head"):
        export_head(tmp_path / "head", "eagle3", tmp_path / "x", lm=lm)
    with pytest.raises(ValueError, match="unknown format"):
        export_head(tmp_path / "head", "onnx", tmp_path / "x", lm=lm)


def test_cli_export_refuses_the_shipped_dspark_head_in_one_line(capsys):
    """The shipped DSpark head normalises its taps and has a root projection: not the format's function."""
    from paratree.cli import main
    from paratree.drafters.registry import shipped_head

    assert main(["export", str(shipped_head("smollm2-135m", "dspark")), "--format", "dspark", "--out", "/tmp/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tap_norm: false" in err[0] and "root_in: false" in err[0]


def test_a_head_trained_for_the_format_exports(tiny_ckpts, tmp_path):
    """`tap_norm: false` and `root_in: false` train (configs/dspark_export_smollm2.yaml) into a head
    the export accepts, and its drafter still decodes losslessly."""
    from paratree.drafters import NoDrafter, make_drafter
    from paratree.engine.generate import Generator
    from paratree.train.trainer import Trainer, TrainConfig
    from test_train import _sequences

    lm = load_model(str(tiny_ckpts["llama"]), "fp32", tokenizer=False)
    cfg = TrainConfig(family="dspark", tap_norm=False, root_in=False, num_layers=1, block_size=4, num_taps=2,
                      markov_rank=4, max_steps=3, seqs_per_step=4, anchors_per_seq=6, warmup_steps=1, eval_every=0,
                      checkpoint_every=0, eval_seqs=2, output_dir=str(tmp_path / "run"), autocast_bf16=False)
    Trainer(cfg, lm=lm, sequences=_sequences(lm, n=8), progress=False).fit()
    head_dir = tmp_path / "run" / "head"
    out = export_head(head_dir, "dspark", tmp_path / "out", lm=lm)
    assert (out / "model.safetensors").is_file()
    runner = TargetRunner(lm.model, max_len=96)
    prompt = list(range(5, 17))
    plain = Generator(runner, NoDrafter()).generate(prompt, 24).token_ids
    got = Generator(runner, make_drafter("dspark", lm, head_path=str(head_dir)), budget=5).generate(prompt, 24)
    assert got.token_ids == plain



def test_export_then_import_drafts_the_same_and_decodes_the_same(tiny_ckpts, tmp_path):
    """`--head DIR` takes a DSpark-layout checkpoint: exported then imported, the head proposes the same
    chains (confidences equal up to the folded temperature's rounding) and greedy output is plain's."""
    from paratree.drafters import NoDrafter, drafter_for_head, make_drafter
    from paratree.engine.generate import Generator

    lm = load_model(str(tiny_ckpts["llama"]), "fp32", tokenizer=False)
    head = _dspark_head(lm.config, seed=3).float()
    head.save(tmp_path / "head", dtype=torch.float32)
    export_head(tmp_path / "head", "dspark", tmp_path / "out", lm=lm)
    assert drafter_for_head(tmp_path / "out") == "dspark"
    a = make_drafter("dspark", lm, head_path=str(tmp_path / "head"))
    b = make_drafter("dspark", lm, head_path=str(tmp_path / "out"))
    runner = TargetRunner(lm.model, max_len=128)
    prompt = list(range(5, 19))
    plain = Generator(runner, NoDrafter()).generate(prompt, 32)
    ra = Generator(runner, a, budget=5).generate(prompt, 32)
    rb = Generator(runner, b, budget=5).generate(prompt, 32)
    assert ra.token_ids == rb.token_ids == plain.token_ids
    assert ra.tree_sizes == rb.tree_sizes and ra.accept_depths == rb.accept_depths  # the same drafts
    assert torch.allclose(torch.tensor(a.last_confidences), torch.tensor(b.last_confidences), atol=1e-6)


def test_a_broken_dspark_checkpoint_is_one_clear_error(tiny_ckpts, tmp_path):
    from paratree.drafters import make_drafter
    from paratree.models.config import CheckpointError

    lm = load_model(str(tiny_ckpts["llama"]), "fp32", tokenizer=False)
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["Qwen3DSparkModel"], "hidden_size": 64}))
    with pytest.raises(CheckpointError, match="missing"):
        make_drafter("dspark", lm, head_path=str(d))


def _decode_both(lm, drafter: str, head_dir, exported, budget: int):
    """Greedy runs of `drafter` with the head and with its exported checkpoint read back by `--head DIR`:
    asserts the same drafts and the same output as plain decoding; returns both results."""
    from paratree.drafters import NoDrafter, make_drafter
    from paratree.engine.generate import Generator

    runner = TargetRunner(lm.model, max_len=128)
    prompt = list(range(5, 19))
    plain = Generator(runner, NoDrafter()).generate(prompt, 32)
    runs = [Generator(runner, make_drafter(drafter, lm, head_path=str(d)), budget=budget).generate(prompt, 32)
            for d in (head_dir, exported)]
    assert runs[0].token_ids == runs[1].token_ids == plain.token_ids
    assert runs[0].tree_sizes == runs[1].tree_sizes and runs[0].accept_depths == runs[1].accept_depths
    return runs


# -- DFlash -------------------------------------------------------------------------------------
def _dflash_head(tcfg, seed=0, causal=False, **kw) -> BlockDraftHead:
    """A block head in DFlash's layout (shifted rows, the target's embedding of a mask token, full
    vocab) with random weights; exportable unless kw says otherwise."""
    base = dict(family="jetspec" if causal else "dflash", num_taps=2, num_layers=2, block_size=5, causal=causal,
                tap_norm=False, root_in=False, shifted=True, mask_token=6, target_name="tiny")
    base.update(kw)
    head = BlockDraftHead(BlockHeadConfig.for_target(tcfg, **base))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in head.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
    return head.double().eval()


@pytest.mark.parametrize("causal", [False, True])
@torch.inference_mode()
def test_dflash_export_is_the_same_function_on_real_taps(tiny64, causal):
    """The exported tensors through z-lab's forward (slot i >= 1 predicts its own position, the
    target's mask-token embedding and LM head) give the logits paratree's drafter computes."""
    from paratree.drafters.block_drafter import BlockHeadDrafter
    from paratree.drafters.heads.dflash_format import to_dflash

    lm = tiny64
    head = _dflash_head(lm.config, causal=causal)
    ids = torch.randint(0, lm.config.vocab_size, (21,), generator=torch.Generator().manual_seed(4)).tolist()
    taps = TargetRunner(lm.model, max_len=64).prefill(ids[:-1], taps=head.cfg.tap_layers)
    drafter = BlockHeadDrafter(head, lm.model.embed, lm.model.lm_head, name="x", tree=False)
    drafter.begin(ids[:-1], taps)
    want = drafter.block_hidden(ids[-1]) @ lm.model.lm_head.weight.T  # block_logits, before its fp32 cast
    assert want.shape == (head.cfg.block_size - 1, lm.config.vocab_size)
    sd, cfg = to_dflash(head, 128)
    assert cfg["architectures"] == ["DFlashDraftModel"] and cfg["dflash_config"]["causal"] == causal
    got = dflash_block(sd, cfg, taps, ids[-1], lm.model.embed.weight, lm.model.lm_head.weight)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9)


def test_dflash_export_refuses_each_difference_by_name(tiny64, tmp_path):
    lm = tiny64
    for name, kw, why in [("tapnorm", dict(tap_norm=True), "tap_norm: false"),
                          ("rootin", dict(root_in=True), "root_in: false"),
                          ("anchorfirst", dict(shifted=False), "shifted: true"),
                          ("learnedmask", dict(mask_token=-1), "mask_token"),
                          ("vocab", dict(draft_vocab=40), "draft vocabulary")]:
        _dflash_head(lm.config, **kw).float().save(tmp_path / name, dtype=torch.float32)
        with pytest.raises(ValueError, match=why):
            export_head(tmp_path / name, "dflash", tmp_path / "x", lm=lm)
    _dspark_head(lm.config).float().save(tmp_path / "dspark", dtype=torch.float32)
    with pytest.raises(ValueError, match="it is a dspark head"):
        export_head(tmp_path / "dspark", "dflash", tmp_path / "x", lm=lm)


def test_a_dflash_layout_head_trains_exports_and_imports_to_the_same_drafts(tiny_ckpts, tmp_path):
    """`shifted: true` + `mask_token` train (configs/dflash_export_smollm2.yaml); the exported
    checkpoint, read back by `--head DIR`, proposes the same chains and decodes exactly as plain."""
    from paratree.drafters import drafter_for_head
    from paratree.train.trainer import Trainer, TrainConfig
    from test_train import _sequences

    lm = load_model(str(tiny_ckpts["llama"]), "fp32", tokenizer=False)
    cfg = TrainConfig(family="dflash", loss="ce_decay", tap_norm=False, root_in=False, shifted=True, mask_token=6,
                      num_layers=1, block_size=5, num_taps=2, max_steps=3, seqs_per_step=4, anchors_per_seq=6,
                      warmup_steps=1, eval_every=0, checkpoint_every=0, eval_seqs=2,
                      output_dir=str(tmp_path / "run"), autocast_bf16=False)
    Trainer(cfg, lm=lm, sequences=_sequences(lm, n=8), progress=False).fit()
    head_dir = tmp_path / "run" / "head"
    out = export_head(head_dir, "dflash", tmp_path / "out", lm=lm)
    assert drafter_for_head(out) == drafter_for_head(head_dir) == "ddtree"
    runs = _decode_both(lm, "dflash", head_dir, out, budget=5)
    assert max(runs[0].tree_sizes) == 5  # root + block_size - 1 drafts


# -- EAGLE-3 ------------------------------------------------------------------------------------
def _eagle3_head(tcfg, seed=0, **kw):
    from paratree.drafters.heads.eagle3 import Eagle3Head

    base = dict(family="eagle3", num_taps=3, num_layers=1, block_size=5, causal=True, tap_norm=False,
                root_in=False, draft_vocab=40, target_name="tiny")
    base.update(kw)
    head = Eagle3Head(BlockHeadConfig.for_target(tcfg, **base))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in head.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.3 * torch.randn(p.shape, generator=g))
        if head.d2t is not None:
            head.d2t.copy_(torch.randperm(tcfg.vocab_size, generator=g)[: head.cfg.draft_vocab].sort().values)
    return head.double().eval()


@torch.inference_mode()
def test_eagle3_export_is_the_same_function_on_real_taps(tiny64):
    """The exported tensors through the engines' EAGLE-3 forward draft the chain (tokens and
    log-probs) that paratree's EagleDrafter drafts with the head."""
    from paratree.drafters.eagle_drafter import EagleDrafter
    from paratree.drafters.heads.eagle3_format import to_eagle3

    lm = tiny64
    head = _eagle3_head(lm.config)
    ids = torch.randint(0, lm.config.vocab_size, (19,), generator=torch.Generator().manual_seed(5)).tolist()
    taps = TargetRunner(lm.model, max_len=64).prefill(ids[:-1], taps=head.cfg.tap_layers)
    drafter = EagleDrafter(head, lm.model.embed, lm.model.lm_head.weight, width=1, min_prob=0.0)  # the full chain
    drafter.begin(ids[:-1], taps)
    tree = drafter.propose(ids, budget=6)
    sd, cfg = to_eagle3(head, 128)
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [t + 1 for t in head.cfg.tap_layers]
    assert cfg["draft_vocab_size"] == 40 and sd["lm_head.weight"].shape == (40, lm.config.hidden_size)
    want_tokens, want_logps = eagle3_chain(sd, cfg, taps, ids, lm.model.embed.weight, 5)
    assert tree.tokens[1:].tolist() == want_tokens
    assert torch.allclose(tree.cum_logp[1:], torch.tensor(want_logps, dtype=torch.float64).cumsum(0), atol=1e-9)


def test_eagle3_export_refuses_other_heads(tiny64, tmp_path):
    from paratree.drafters.registry import shipped_head

    with pytest.raises(ValueError, match="paratree's own EAGLE head"):
        export_head(shipped_head("smollm2-135m", "eagle"), "eagle3", tmp_path / "x", lm=None)
    _dflash_head(tiny64.config).float().save(tmp_path / "dflash", dtype=torch.float32)
    with pytest.raises(ValueError, match="it is a dflash head"):
        export_head(tmp_path / "dflash", "eagle3", tmp_path / "x", lm=tiny64)
    with pytest.raises(ValueError, match="has one layer"):
        _eagle3_head(tiny64.config, num_layers=2)


def test_an_eagle3_head_trains_exports_and_imports_to_the_same_drafts(tiny_ckpts, tmp_path):
    """configs/eagle3_smollm2.yaml's family on a tiny target: trained by training-time test, its
    draft LM head moves away from the target's rows, the export reads back as the same drafts, and
    decoding is lossless."""
    from paratree.drafters import drafter_for_head
    from paratree.train.trainer import Trainer, TrainConfig
    from test_train import _sequences

    lm = load_model(str(tiny_ckpts["llama"]), "fp32", tokenizer=False)
    cfg = TrainConfig(family="eagle3", num_layers=1, block_size=4, num_taps=3, draft_vocab=48, max_steps=3,
                      seqs_per_step=4, warmup_steps=1, eval_every=0, checkpoint_every=0, eval_seqs=2, lr=1e-2,
                      output_dir=str(tmp_path / "run"), autocast_bf16=False)
    tr = Trainer(cfg, lm=lm, sequences=_sequences(lm, n=8), progress=False)
    start = tr.head.lm_head.weight.detach().clone()
    assert torch.equal(start, lm.model.lm_head.weight[tr.head.d2t])  # initialised from the target's rows
    tr.fit()
    head_dir = tmp_path / "run" / "head"
    out = export_head(head_dir, "eagle3", tmp_path / "out", lm=lm)
    assert drafter_for_head(out) == drafter_for_head(head_dir) == "eagle3"
    trained = load_file(str(out / "model.safetensors"))["lm_head.weight"]
    assert not torch.allclose(trained, start.to(trained.dtype))
    _decode_both(lm, "eagle3", head_dir, out, budget=6)
