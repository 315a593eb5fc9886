"""Self-distillation data (`paratree data`): prompt sources, batched generation equal to one-by-one
greedy decoding, and resuming a killed run without losing or duplicating a sequence."""

import json

import pytest

from paratree.data import DATA, read_jsonl
from paratree.drafters import NoDrafter
from paratree.engine.generate import Generator
from paratree.engine.pipeline import encode_prompt
from paratree.models.loader import load_model
from paratree.models.runner import TargetRunner
from paratree.train.data import SOURCES, collect_prompts, generate_dataset, load_sequences


def test_every_training_source_yields_prompts_and_none_is_an_eval_split():
    for name, (rel, field) in SOURCES.items():
        assert not any(part in rel for part in ("test", "mt_bench", "humaneval")), name
        rows = read_jsonl(DATA / rel)
        assert len(rows) >= 100 and all(r.get(field) for r in rows), name
        got = collect_prompts({name: 3}, seed=1)
        assert len(got) == 3 and all(p["source"] == name and p["prompt"].strip() for p in got)
    assert collect_prompts({"sharegpt": 4}, seed=1) == collect_prompts({"sharegpt": 4}, seed=1)
    with pytest.raises(ValueError, match="unknown prompt source 'nope'"):
        collect_prompts({"nope": 1})


def test_batched_generation_equals_greedy_decoding_and_resumes_after_a_kill(tiny, tmp_path):
    lm = load_model(tiny, "fp32")
    prompts = collect_prompts({"gsm8k_train": 3, "sharegpt": 2}, seed=0)
    out = tmp_path / "d.jsonl"
    generate_dataset(lm, prompts, out, max_new_tokens=10, batch_size=2, max_prompt_tokens=1024, progress=False)
    first = load_sequences(out)
    assert sorted((r["source"], r["index"]) for r in first) == sorted((p["source"], p["index"]) for p in prompts)

    gen = Generator(TargetRunner(lm.model, max_len=1100), NoDrafter(), eos_ids=lm.eos_ids)
    by_key = {(p["source"], p["index"]): p for p in prompts}
    for r in first:
        ids = encode_prompt(lm.tokenizer, by_key[(r["source"], r["index"])]["prompt"])
        assert r["ids"][: r["prompt_len"]] == ids
        assert r["ids"][r["prompt_len"]:] == gen.generate(ids, 10).token_ids

    # A kill mid-write: one sequence lost entirely, the next cut mid-line.
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])
    generate_dataset(lm, prompts, out, max_new_tokens=10, batch_size=2, max_prompt_tokens=1024, progress=False)
    again = [json.loads(line) for line in out.read_text().splitlines()]
    key = lambda r: (r["source"], r["index"])  # noqa: E731
    assert sorted(again, key=key) == sorted(first, key=key)


def test_limited_run_is_the_prefix_an_unlimited_run_writes(tiny, tmp_path):
    """`--limit N` reproduces a run stopped after N prompts: the same sequences, in the same order;
    resuming the limited file without a limit then completes it to the full set."""
    lm = load_model(tiny, "fp32")
    prompts = collect_prompts({"gsm8k_train": 4, "code": 3}, seed=2)
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    kw = dict(max_new_tokens=6, batch_size=2, max_prompt_tokens=1024, progress=False)
    generate_dataset(lm, prompts, full, **kw)
    generate_dataset(lm, prompts, part, limit=4, **kw)
    a, b = load_sequences(full), load_sequences(part)
    assert len(b) == 4 and b == a[:4]
    generate_dataset(lm, prompts, part, **kw)
    key = lambda r: (r["source"], r["index"])  # noqa: E731
    assert sorted(load_sequences(part), key=key) == sorted(a, key=key)


def test_sampled_responses_do_not_depend_on_what_they_were_batched_with(tiny, tmp_path):
    """Continuous batching admits prompts as rows free up, so a row's neighbours depend on timing:
    each prompt samples from its own seeded generator, and the data is the same at any batch size."""
    lm = load_model(tiny, "fp32")
    prompts = collect_prompts({"gsm8k_train": 3, "dolly": 2}, seed=4)
    runs = []
    for b in (1, 3):
        out = tmp_path / f"b{b}.jsonl"
        generate_dataset(lm, prompts, out, max_new_tokens=12, batch_size=b, temperature=0.9, seed=7,
                         max_prompt_tokens=1024, progress=False)
        runs.append(sorted(load_sequences(out), key=lambda r: (r["source"], r["index"])))
    assert runs[0] == runs[1] and len(runs[0]) == 5  # (the batch size also sets the order: compare by key)
    assert len({tuple(r["ids"][r["prompt_len"]:]) for r in runs[0]}) == 5
    other = tmp_path / "seed8.jsonl"
    generate_dataset(lm, prompts, other, max_new_tokens=12, batch_size=3, temperature=0.9, seed=8,
                     max_prompt_tokens=1024, progress=False)
    assert sorted(load_sequences(other), key=lambda r: (r["source"], r["index"])) != runs[0]


def test_shard_store_holds_the_jsonl_rows_compactly_and_resumes_after_a_kill(tiny, tmp_path):
    """A directory output stores the same sequences as jsonl in safetensors shards (uint16 tokens
    when the vocabulary fits); a kill loses only unflushed rows and a half-written shard, and the
    resumed run completes the set with nothing duplicated. Every shard records what it cost."""
    from paratree.train.store import store_summary

    lm = load_model(tiny, "fp32")
    prompts = collect_prompts({"gsm8k_train": 4, "code": 3}, seed=3)
    kw = dict(max_new_tokens=8, batch_size=3, max_prompt_tokens=1024, progress=False)
    ref = tmp_path / "ref.jsonl"
    generate_dataset(lm, prompts, ref, **kw)
    store = tmp_path / "store"
    generate_dataset(lm, prompts, store, rows_per_shard=2, info={"dtype": "fp32", "command": "test"}, **kw)
    shards = sorted(store.glob("shard-*.safetensors"))
    assert len(shards) == 4  # 7 rows, 2 per shard
    assert load_sequences(store) == load_sequences(ref)  # same rows, same (fixed) order
    s = store_summary(store)
    assert s["rows"] == 7 and s["tokens"] == sum(len(r["ids"]) for r in load_sequences(ref))
    assert s["response_tokens"] == sum(len(r["ids"]) - r["prompt_len"] for r in load_sequences(ref))
    assert s["generation_s"] > 0
    assert sum(p.stat().st_size for p in shards) < 6 * s["tokens"] + 4 * 1024  # jsonl: ~4-6 bytes a token

    # A kill: the last shard never renamed into place (a half-written temp file is left behind).
    shards[-1].rename(store / f".{shards[-1].name}.tmp")
    assert len(load_sequences(store)) == 6
    generate_dataset(lm, prompts, store, rows_per_shard=2, **kw)
    key = lambda r: (r["source"], r["index"])  # noqa: E731
    assert sorted(load_sequences(store), key=key) == sorted(load_sequences(ref), key=key)
    assert not list(store.glob(".*.tmp"))
    with pytest.raises(FileNotFoundError, match="paratree data --out"):
        load_sequences(tmp_path / "missing")


def test_data_command_writes_a_store_that_records_its_command_and_cost(tiny, tmp_path, capsys):
    """`paratree data --out DIR`: `source=all` counts, the summary line, and the command, dtype and
    machine in every shard's header; a bad --mix entry, a file as the store, or resuming a store with
    other generation settings is one clear error."""
    from paratree.cli import main
    from paratree.train.store import read_shard_meta

    out = tmp_path / "store"
    args = ["data", "--out", str(out), "--model", tiny, "--dtype", "fp32", "--mix", "self_instruct=all",
            "--max-new-tokens", "4", "--batch-size", "2", "--limit", "5"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == 5 and summary["response_tokens"] > 0 and summary["generation_s"] > 0
    meta = read_shard_meta(next(out.glob("shard-*.safetensors")))
    assert meta["dtype"] == "fp32" and "--mix self_instruct=all" in meta["command"] and meta["machine"]
    assert main(args[:-1] + ["7"]) == 0  # resumed with a larger limit: only the 2 new prompts run
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"] == 7
    assert main(["data", "--out", str(out), "--model", tiny, "--mix", "self_instruct=lots"]) == 2
    assert "bad --mix entry 'self_instruct=lots'" in capsys.readouterr().err
    assert main(args[:2] + [str(out / "shard-00000.safetensors")] + args[3:]) == 2  # a file is not a store
    assert "is a file, not a directory of shards" in capsys.readouterr().err
    assert main(["data", "--out", str(out), "--model", tiny, "--dtype", "fp32", "--mix", "self_instruct=9",
                 "--max-new-tokens", "5", "--batch-size", "2"]) == 2  # other settings: refused, not mixed in
    assert "made with max_new_tokens 4; this run has max_new_tokens 5" in capsys.readouterr().err


def test_an_interrupted_store_keeps_what_finished(tiny, tmp_path, monkeypatch):
    """Ctrl-C (or `kill`, which `paratree data` turns into the same) flushes the rows that finished
    into a last, short shard; the rerun generates only the rest."""
    import paratree.train.data as data

    lm = load_model(tiny, "fp32")
    prompts = collect_prompts({"gsm8k_train": 5}, seed=5)
    kw = dict(max_new_tokens=6, batch_size=2, max_prompt_tokens=1024, progress=False)
    real = data.decode_continuously

    def dies_after_three(*a, **k):
        for n, item in enumerate(real(*a, **k)):
            if n == 3:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(data, "decode_continuously", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(lm, prompts, tmp_path / "s", rows_per_shard=256, **kw)
    kept = load_sequences(tmp_path / "s")
    assert 1 <= len(kept) <= 3  # in the run's order, so those not yet preceded by all earlier ones wait
    monkeypatch.setattr(data, "decode_continuously", real)
    seen = []
    monkeypatch.setattr(data, "decode_continuously", lambda r, jobs, *a, **k: (seen.append(len(jobs)), real(r, jobs, *a, **k))[1])
    generate_dataset(lm, prompts, tmp_path / "s", rows_per_shard=256, **kw)
    assert seen == [5 - len(kept)] and len(load_sequences(tmp_path / "s")) == 5


def test_store_keeps_ids_past_uint16_for_large_vocabularies(tmp_path):
    """Qwen's 151,936-token vocabulary does not fit uint16: its shards hold int32 tokens, read back exactly."""
    from safetensors import safe_open

    from paratree.train.store import ShardWriter, read_rows

    rows = [{"source": "code", "index": i, "temperature": 0.0, "prompt_len": 2, "ids": [151_000 + i, 7, 65_536, i]}
            for i in range(3)]
    for vocab, dtype in ((151_936, "int32"), (49_152, "uint16")):
        w = ShardWriter(tmp_path / str(vocab), vocab, {"model": "m"}, rows_per_shard=2)
        for r in rows if vocab > 65_536 else [dict(r, ids=r["ids"][1:2] + r["ids"][3:]) for r in rows]:
            w.add(r, 0.01)
        w.close()
        got = read_rows(tmp_path / str(vocab))
        assert [g["ids"] for g in got] == [r["ids"] if vocab > 65_536 else [7, r["index"]] for r in rows]
        with safe_open(str(tmp_path / str(vocab) / "shard-00000.safetensors"), "np") as f:
            assert str(f.get_tensor("tokens").dtype) == dtype


def test_store_refuses_a_second_writer_and_names_a_shard_cut_short(tmp_path):
    from paratree.train.store import ShardWriter

    w = ShardWriter(tmp_path / "s", 100, {"model": "m"}, rows_per_shard=1)
    with pytest.raises(ValueError, match="another `paratree data` is writing"):
        ShardWriter(tmp_path / "s", 100, {"model": "m"})
    w.add({"source": "code", "index": 0, "temperature": 0.0, "prompt_len": 1, "ids": [1, 2]}, 0.1)
    w.close()
    ShardWriter(tmp_path / "s", 100, {"model": "m"}).close()  # the lock goes with the writer
    shard = tmp_path / "s" / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:40])  # what a lost machine could leave without the fsync
    with pytest.raises(ValueError, match="shard-00000.safetensors' is unreadable.*delete it and rerun"):
        load_sequences(tmp_path / "s")
