"""A drafter family is one module: a toy family registered from this file trains with `paratree train`,
generates with `paratree generate --head`, is benchmarked by `paratree bench` and served by the
OpenAI-compatible server, with no other file naming it. Its greedy output equals plain decoding."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
import yaml

from paratree.cli import main
from paratree.drafters import NoDrafter, drafters, make_drafter
from paratree.drafters.block_drafter import BlockHeadDrafter
from paratree.drafters.registry import (BuildContext, DrafterSpec, HeadFamily, drafter_spec, register_drafter,
                                        register_family, unregister)
from paratree.engine.generate import Generator
from paratree.models.loader import load_model
from paratree.models.runner import TargetRunner


class Toy(HeadFamily):
    """A block-causal head drafted as a chain: the smallest family there is."""

    name, causal, drafter = "toy", True, "toy"


def build_toy(ctx: BuildContext) -> BlockHeadDrafter:
    return BlockHeadDrafter.for_family(ctx, "toy", "toy", tree=False)


@pytest.fixture
def toy():
    register_family(Toy())
    register_drafter(DrafterSpec("toy", build_toy, family="toy", tree=False, help="toy chain"))
    yield
    unregister("toy")


def test_registry_names_and_errors(toy):
    assert "toy" in drafters() and drafter_spec("toy").family == "toy"
    assert drafter_spec("ngram").fork == "fresh" and drafter_spec("jetspec").fork == "copy"
    assert drafter_spec("jetspec+ngram").family == "jetspec"
    with pytest.raises(ValueError, match="unknown drafter 'nosuch': choose from .*toy"):
        make_drafter("nosuch")
    with pytest.raises(ValueError, match="fork must be"):
        register_drafter(DrafterSpec("bad", lambda ctx: NoDrafter(), fork="share"))


def _distilled(lm, path, n=12):
    """Self-distilled training data from the tiny target (random prompts + its greedy continuations)."""
    g = torch.Generator().manual_seed(0)
    gen = Generator(TargetRunner(lm.model, max_len=96), NoDrafter())
    rows = []
    for _ in range(n):
        prompt = torch.randint(3, lm.config.vocab_size, (8,), generator=g).tolist()
        rows.append({"ids": prompt + gen.generate(prompt, 32).token_ids, "prompt_len": 8})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_toy_family_trains_generates_benches_and_serves(toy, tiny, tmp_path, capsys):
    pytest.importorskip("uvicorn")
    from live_server import serving
    from paratree.bench.suite import BenchConfig, run_bench
    from paratree.serve.backend import ServeEngine

    lm = load_model(tiny, "fp32")
    _distilled(lm, tmp_path / "data.jsonl")
    cfg = dict(family="toy", target=tiny, target_dtype="fp32", data=str(tmp_path / "data.jsonl"), num_layers=1,
               block_size=4, num_taps=2, max_steps=4, seqs_per_step=4, anchors_per_seq=6, warmup_steps=1,
               eval_every=0, checkpoint_every=2, eval_seqs=2, output_dir=str(tmp_path / "run"), autocast_bf16=False)
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(cfg))

    # train: the trainer finds the family in the registry
    assert main(["train", "--config", str(tmp_path / "toy.yaml")]) == 0
    head = tmp_path / "run" / "head"
    assert json.loads((head / "head_config.json").read_text())["family"] == "toy"

    # generate: --head picks the family's drafter; greedy output is plain decoding's
    prompt = "Tell me about apples."
    capsys.readouterr()
    common = ["--model", tiny, "--dtype", "fp32", "--max-new-tokens", "16", "--json"]
    assert main(["generate", prompt, "--head", str(head), "--budget", "5", *common]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert main(["generate", prompt, "--drafter", "plain", *common]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert spec["drafter"] == "toy" and spec["token_ids"] == plain["token_ids"]

    # bench: the method list and heads come from the registry
    rows = run_bench(BenchConfig(datasets=["gsm8k"], model=tiny, dtype="fp32", methods=["plain", "toy@5"],
                                 limit=2, max_new_tokens=12, repeats=1, heads={"toy": str(head)},
                                 progress=False)).rows
    toy_row = next(r for r in rows if r["method"] == "toy@5")
    assert toy_row["greedy_mismatches"] == 0 and toy_row["tau"] >= 1.0

    # serve: a real HTTP server in this process, each sequence with its own copy of the drafter
    cost = tmp_path / "cost.json"
    cost.write_text(json.dumps({"points": [[1, 0.02], [8, 0.03], [64, 0.2], [256, 0.8]]}))
    engine = ServeEngine(lm, drafter="toy", budget=5, max_batch=2, max_model_len=256, cost_model=str(cost),
                         drafter_options={"head_path": str(head)})
    with serving(engine) as url:
        body = {"model": engine.model_name, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16,
                "temperature": 0}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["choices"][0]["message"]["content"] == plain["text"]
        assert got["speculative"]["drafter"] == "toy"
