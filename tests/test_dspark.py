"""DSpark: the head trains (Markov + confidence heads), the confidence is temperature-calibrated on
held-out rows, drafting is lossless under greedy decoding AND under sampling with the confidence
gate on (the gate must not look at the token it admits), and the gate follows the cost curve."""

import json

import pytest
import torch

from paratree.drafters.dspark_drafter import DSparkDrafter
from paratree.verify.gate import admit_next
from paratree.drafters.heads.dspark import DSparkHead, expected_calibration_error, fit_temperature
from paratree.engine.generate import Generator
from paratree.models.loader import load_model
from paratree.models.runner import TargetRunner
from paratree.train.trainer import Trainer
from paratree.tree.cost import VerifyCostModel
from paratree.verify.warp import SamplingParams, warp_probs
from test_train import _cfg, _sequences, drafted_losslessly
from test_verify_lossless import g_test

FLAT = VerifyCostModel([(1, 0.010), (64, 0.011)])


@pytest.fixture(scope="module")
def trained(tiny_ckpts, tmp_path_factory):
    lm32 = load_model(str(tiny_ckpts["llama"]), "fp32", tokenizer=False)
    seqs = _sequences(lm32)
    out = tmp_path_factory.mktemp("dspark")
    tr = Trainer(_cfg(out, family="dspark", max_steps=40, checkpoint_every=0, markov_rank=16), lm=lm32,
                 sequences=seqs, progress=False)
    tr.fit()
    return tr, out, seqs


def test_trains_and_calibrates_the_confidence(trained):
    tr, out, _ = trained
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    cal = log[-1]["calibration"]
    assert 0 < cal["conf_temperature"] and 0 <= cal["ece_after"] <= 1
    head = DSparkHead.load(out / "head")
    assert head.conf_temperature == pytest.approx(cal["conf_temperature"])
    assert head.markov_out.weight.abs().sum() > 0  # the sequential head learned something
    # temperature scaling never makes the held-out BCE worse than T = 1
    logit, accept = tr._conf_logits()
    bce = lambda t: float(torch.nn.functional.binary_cross_entropy_with_logits(logit / t, accept))  # noqa: E731
    assert bce(cal["conf_temperature"]) <= bce(1.0) + 1e-9


def test_calibration_helpers():
    g = torch.Generator().manual_seed(0)
    true_p = torch.rand(20_000, generator=g)
    outcome = (torch.rand(20_000, generator=g) < true_p).double()
    assert expected_calibration_error(true_p, outcome) < 0.02
    assert expected_calibration_error(true_p.sqrt(), outcome) > 0.1  # over-confident
    logits = torch.logit(true_p.clamp(1e-4, 1 - 1e-4))
    assert fit_temperature(logits * 3, outcome) == pytest.approx(3.0, rel=0.1)


def test_gate_follows_the_cost_curve():
    steep = VerifyCostModel([(1, 0.010), (2, 0.030), (64, 0.033)])
    assert admit_next(1.0, 0.99, 0.99, 1, 8, FLAT, 0.0)
    assert not admit_next(1.0, 0.5, 0.5, 1, 1, steep, 0.0)  # one position: 1.5 tokens for 3x the time
    assert admit_next(1.0, 0.95, 0.95, 1, 8, steep, 0.0)  # ~7.4 expected tokens over 8 repay the jump
    assert not admit_next(1.0, 0.6, 0.6, 1, 8, steep, 0.0)  # ~2.5 do not
    assert admit_next(1.0, 0.3, 0.3, 1, 8, None, 0.25) and not admit_next(1.0, 0.2, 0.3, 1, 8, None, 0.25)


def test_greedy_drafting_is_lossless(tiny_ckpts, trained):
    _, out, seqs = trained
    lm64 = load_model(str(tiny_ckpts["llama"]), "fp64", tokenizer=False)
    head = DSparkHead.load(out / "head", dtype=torch.float64)
    for cost in (FLAT, None):
        drafter = DSparkDrafter(head, lm64.model.embed, lm64.model.lm_head, cost=cost, threshold=0.05)
        assert drafted_losslessly(TargetRunner(lm64.model, max_len=128), drafter, seqs[:4], budget=8) > 0


def test_sampling_with_the_confidence_gate_is_lossless(tiny_ckpts, trained):
    """Joint law of the first two sampled tokens == the warped target's (G-test), gate on."""
    _, out, seqs = trained
    lm = load_model(str(tiny_ckpts["llama"]), "fp64", tokenizer=False)
    head = DSparkHead.load(out / "head", dtype=torch.float64)
    params = dict(temperature=0.8, top_k=4)
    prompt = seqs[0]["ids"][:6]
    runner = TargetRunner(lm.model, max_len=64)
    v = lm.config.vocab_size

    def dist(ids):
        runner.reset()
        runner.prefill(ids[:-1])
        return warp_probs(runner.step(ids[-1]).double().view(1, -1), SamplingParams(**params))[0]

    p1 = dist(prompt)
    exact = torch.zeros(v * v, dtype=torch.float64)
    for x in torch.nonzero(p1).flatten().tolist():
        exact[x * v: (x + 1) * v] = p1[x] * dist(prompt + [x])
    drafter = DSparkDrafter(head, lm.model.embed, lm.model.lm_head, cost=None, threshold=0.3)
    gen = Generator(runner, drafter, budget=4)
    runs, admitted = 600, 0
    codes = torch.empty(runs, dtype=torch.long)
    for i in range(runs):
        res = gen.generate(prompt, 2, SamplingParams(seed=20_000 + i, **params))
        codes[i] = res.token_ids[0] * v + res.token_ids[1]
        admitted += len(drafter.last_confidences)
    assert g_test(codes, exact) > 1e-3
    assert 0 < admitted  # the gate admitted drafts in some rounds, so the test exercised it


def test_model_card_states_the_dspark_loss_and_calibration(trained):
    from paratree.cli import main

    _, out, _ = trained
    summary = json.loads((out / "head" / "train_summary.json").read_text())
    rows = [{"dataset": "gsm8k", "method": "plain", "tau": 1.0, "tokens_per_s": 20.0, "speedup": 1.0,
             "greedy_mismatches": 0},
            {"dataset": "gsm8k", "method": "dspark@auto", "tau": 1.6, "tokens_per_s": None, "speedup": None,
             "greedy_mismatches": 0}]
    (out / "rows.json").write_text(json.dumps(rows))
    assert main(["card", "--head", str(out / "head"), "--train-command", "paratree train --config X.yaml",
                 "--data-command", "paratree data --out D.jsonl", "--bench-json", str(out / "rows.json"),
                 "--bench-command", "paratree bench …", "--notes", "made in a test"]) == 0
    card = (out / "head" / "MODEL_CARD.md").read_text()
    cal = summary["final"]["calibration"]
    assert card.startswith("# dspark draft head")
    assert "0.1 CE + 0.9 TV" in card and f"T = {cal['conf_temperature']:.3f}" in card and "kl (" not in card
    assert f"{summary['train_tokens']} train tokens" in card and "paratree train --config X.yaml" in card
    assert "| gsm8k | dspark@auto | 1.60 | - | - | 0 |" in card and "made in a test" in card
