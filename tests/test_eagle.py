"""EAGLE-3-style AR head: training-time test sees exactly what drafting sees; trained heads stay lossless."""

import pytest
import torch
import torch.nn.functional as F

from paratree.drafters import make_drafter
from paratree.drafters.eagle_drafter import EagleDrafter
from paratree.drafters.heads.block import BlockHeadConfig
from paratree.drafters.heads.eagle import EagleHead, eagle_train_logits
from paratree.models.loader import load_model
from paratree.models.runner import TargetRunner
from paratree.train.trainer import Trainer, TrainConfig
from test_train import _sequences, drafted_losslessly


@pytest.fixture(scope="module")
def lm64(tiny_ckpts):
    return load_model(str(tiny_ckpts["llama"]), "fp64", tokenizer=False)


def test_training_time_test_matches_autoregressive_drafting(lm64):
    """Step j of the TTT unroll at state t == the drafter's step j after committing x_0..x_{t+1}."""
    torch.manual_seed(0)
    head = EagleHead(BlockHeadConfig.for_target(lm64.config, family="eagle", num_taps=2, num_layers=1,
                                                block_size=4)).double()
    for p in head.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    head.requires_grad_(False)
    ids = torch.randint(0, 97, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    runner = TargetRunner(lm64.model, max_len=64)
    taps = runner.prefill(ids, taps=head.cfg.tap_layers)  # taps of positions 0..19
    lm_w = lm64.model.lm_head.weight
    train = eagle_train_logits(head, taps, ids, lm64.model.embed.weight, lm_w, steps=3)
    for n in (5, 11, 17):  # committed x_0..x_n (x_n = root): cached states 0..n-1
        d = EagleDrafter(head, lm64.model.embed, lm_w)
        d.begin(ids[: n + 1], taps[:n])
        d._extend(ids[: n + 1])
        assert torch.allclose(F.linear(d._h_last[0, -1], lm_w), train[0][n - 1], atol=1e-9)
        # step 2 with the real next token, as teacher forcing does
        x = head.step_input(lm64.model.embed(torch.tensor([[ids[n + 1]]])), d._h_last)
        h2, own = head.run(x, torch.tensor([[n]]), d._kv, None)
        assert torch.allclose(F.linear(h2[0, -1], lm_w), train[1][n - 1], atol=1e-9)
        past = [(torch.cat([pk, ok], 2), torch.cat([pv, ov], 2)) for (pk, pv), (ok, ov) in zip(d._kv, own)]
        x = head.step_input(lm64.model.embed(torch.tensor([[ids[n + 2]]])), h2)
        h3, _ = head.run(x, torch.tensor([[n + 1]]), past, None)
        assert torch.allclose(F.linear(h3[0, -1], lm_w), train[2][n - 1], atol=1e-9)


def test_eagle_head_trains_and_drafts_losslessly(tiny_ckpts, lm64, tmp_path):
    lm32 = load_model(str(tiny_ckpts["llama"]), "fp32", tokenizer=False)
    seqs = _sequences(lm32)
    cfg = TrainConfig(family="eagle", num_layers=1, block_size=4, num_taps=2, lr=3e-3, warmup_steps=2,
                      max_steps=40, seqs_per_step=4, eval_every=0, checkpoint_every=0, output_dir=str(tmp_path),
                      autocast_bf16=False, eval_seqs=4, draft_vocab=48)
    tr = Trainer(cfg, lm=lm32, sequences=seqs, progress=False)
    before = tr.evaluate()["eval_loss"]
    tr.fit()
    assert tr.evaluate()["eval_loss"] < 0.8 * before
    drafter = make_drafter("eagle", lm64, head_path=str(tmp_path / "head"))
    assert isinstance(drafter, EagleDrafter)
    runner = TargetRunner(lm64.model, max_len=128)
    assert drafted_losslessly(runner, drafter, seqs[:4], budget=10) > 0
    # The confidence stop (default 0.4) only shortens chains: none at 0 and 1.0 drafts one depth;
    # every setting stays lossless.
    depths = {}
    for mp in (0.0, 0.4, 1.0):
        d = make_drafter("eagle", lm64, head_path=str(tmp_path / "head"), min_prob=mp)
        assert drafted_losslessly(runner, d, seqs[:4], budget=10) > 0
        prompt = seqs[0]["ids"][:20]
        d.begin(prompt, runner.prefill(prompt[:-1], taps=d.tap_layers))  # as the engines do: the last
        depths[mp] = int(d.propose(prompt, 10).depths.max())               # prompt token is the root
        runner.reset()
    assert drafter.min_prob == 0.4 and depths[1.0] == 1 and depths[0.0] == drafter.max_depth >= depths[0.4]
    with pytest.raises(ValueError, match="eagle head"):
        make_drafter("jetspec", lm64, head_path=str(tmp_path / "head"))
