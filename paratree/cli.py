"""`paratree` command line: generate, models, data, train, bench, calibrate, bench-plain, serve, bench-serve.

Every user error ends in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from . import __version__

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one `paratree: error:` line (no usage block), exit code 2."""

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f"paratree: error: {message} (see `{self.prog} --help`)\n")


# Counts every command checks before it loads anything: option dest -> smallest value allowed.
_MIN_VALUES = {"max_model_len": 1, "threads": 1, "max_new_tokens": 1}


def _check_counts(args) -> None:
    for dest, lo in _MIN_VALUES.items():
        v = getattr(args, dest, None)
        if v is not None and v < lo:
            raise ValueError(f"--{dest.replace('_', '-')} must be >= {lo}, got {v}")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="packaged name, HF checkpoint dir or .gguf file (default: smollm2-135m)")
    p.add_argument("--dtype", default="auto",
                   help="auto (default: on CPUs that multiply bf16 natively, gguf for GGUF models and bf16 for "
                        "others; bf16 on GPUs; else fp32), gguf (a GGUF model's own 4-bit weights on "
                        "torch's int4 CPU kernel, bf16 activations), bf16, fp32, fp64")
    p.add_argument("--max-model-len", type=int, default=None, help="context window (default: model's, capped at 8192)")


def _add_compile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="run single-sequence verify through TorchInductor: faster steps after a one-off "
                        "compile of ~1 min per graph (needs a C++ compiler); see docs/benchmarks.md")
    p.add_argument("--exact", action=argparse.BooleanOptionalAction, default=None,
                   help="--dtype gguf: speculative, batched and plain decoding give bit-identical output "
                        "(row-invariant attention). Default: on with --compile (5-10%% a step), off eagerly "
                        "(~2x a step there); see docs/benchmarks.md")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)


def _sampling(args):
    from .verify.warp import SamplingParams

    sp = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                        seed=args.seed)
    sp.validate()
    return sp


class _Streamer:
    """Prints decoded text as tokens arrive, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.printed = tokenizer, [], 0

    def __call__(self, new_ids):
        self.ids.extend(new_ids)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return None
        sys.stdout.write(text[self.printed :])
        sys.stdout.flush()
        self.printed = len(text)
        return None


def cmd_generate(args) -> int:
    from .engine.pipeline import Pipeline
    from .engine.sizing import parse_budget

    params = _sampling(args)
    budget = parse_budget(args.budget)
    if args.drafter is None:  # a given head picks its family's tree drafter; packaged models record theirs
        from .drafters import default_drafter, drafter_for_head
        from .models.loader import DEFAULT_MODEL, PACKAGED

        spec = args.model or DEFAULT_MODEL
        args.drafter = drafter_for_head(args.head) if args.head else default_drafter(spec) if spec in PACKAGED else "ngram"
    opts = _drafter_options(args)
    pipe = Pipeline.load(args.model, args.dtype, drafter=args.drafter, budget=budget, max_len=args.max_model_len,
                         compile=args.compile, exact=args.exact, on_calibrate=lambda: print(
                             "paratree: no calibration profile for this model/dtype/machine, running a short one "
                             "(`paratree calibrate` for the full curve)", file=sys.stderr), **opts)
    stream = None if args.json else _Streamer(pipe.tokenizer)
    text, res = pipe.generate(args.prompt, args.max_new_tokens, params, chat=not args.no_chat,
                              stop=args.stop or None, on_tokens=stream)
    if args.json:
        print(json.dumps({
            "text": text, "token_ids": res.token_ids, "num_new_tokens": res.num_new_tokens, "rounds": res.rounds,
            "tau": round(res.tau, 4), "tokens_per_s": round(res.tokens_per_s, 3), "drafter": pipe.drafter_name,
            "model": pipe.lm.name, "finish_reason": res.finish_reason, "time_draft_s": round(res.time_draft, 4),
            "time_verify_s": round(res.time_verify, 4), "time_prefill_s": round(res.time_prefill, 4),
        }))
    else:
        from rich.console import Console

        Console(stderr=True).print(
            f"\n[dim]{res.num_new_tokens} new tokens · {res.rounds} verify rounds · τ {res.tau:.2f} · "
            f"{res.tokens_per_s:.1f} tok/s · draft {res.time_draft:.2f}s / verify {res.time_verify:.2f}s / "
            f"prefill {res.time_prefill:.2f}s · {pipe.drafter_name} on {pipe.lm.name} ({args.dtype})[/dim]"
        )
    return 0


def cmd_models(args) -> int:
    from .models.loader import PACKAGED, is_installed

    from rich.console import Console
    from rich.table import Table

    table = Table(title="Models paratree can obtain offline")
    for col in ("name", "model", "installed", "install command"):
        table.add_column(col)
    for name, pm in PACKAGED.items():
        table.add_row(name, pm.description, "yes" if is_installed(name) else "no", pm.install)
    Console().print(table)
    return 0


def cmd_bench_plain(args) -> int:
    from .bench.plain import run_bench_plain

    run_bench_plain(args.model, args.dtype, args.max_new_tokens, args.repeats, args.prompt, compile=args.compile,
                    exact=args.exact)
    return 0


def cmd_data(args) -> int:
    from .models.loader import load_model
    from .train.data import collect_prompts, generate_dataset
    from .train.store import is_shard_store, store_summary

    mix = {}
    for part in args.mix.split(","):
        name, _, n = part.partition("=")
        if not (n.isdigit() or n == "all"):
            raise ValueError(f"bad --mix entry '{part}': use source=count or source=all, e.g. gsm8k_train=500")
        mix[name] = 1 << 62 if n == "all" else int(n)
    prompts = collect_prompts(mix, seed=args.seed)
    lm = load_model(args.model, args.dtype)
    info = {"dtype": args.dtype, "command": "paratree " + " ".join(args.argv)}
    before = signal.signal(signal.SIGTERM, _interrupt)  # `kill` stores what finished, as Ctrl-C does
    try:
        for temp in args.temperature:
            generate_dataset(lm, prompts, args.out, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                             temperature=temp, seed=args.seed, limit=args.limit, info=info)
    finally:
        signal.signal(signal.SIGTERM, before)
    if is_shard_store(args.out):
        print(json.dumps(store_summary(args.out)))
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _set_threads(n) -> None:
    if n:  # main() refused n < 1 already (`_check_counts`)
        import torch

        torch.set_num_threads(n)


def cmd_bench(args) -> int:
    import shlex

    _set_threads(args.threads)
    from .bench.suite import BenchConfig, parse_budgets, parse_heads, run_bench

    cfg = BenchConfig(
        datasets=[d.strip() for d in args.dataset.split(",") if d.strip()], model=args.model,
        methods=[m.strip() for m in args.methods.split(",")] if args.methods else None, limit=args.limit,
        max_new_tokens=args.max_new_tokens, budgets=parse_budgets(args.budget), temperature=args.temperature,
        repeats=args.repeats, dtype=args.dtype, chat=not args.no_chat, assistant=args.assistant,
        json_out=args.json, report_dir=args.report, quick=args.quick, seed=args.seed,
        command="paratree " + " ".join(shlex.quote(a) for a in getattr(args, "argv", None) or []),
        heads=parse_heads(args.head), compile=args.compile, exact=args.exact,
    )
    res = run_bench(cfg)
    return 130 if res.interrupted else 0


def cmd_calibrate(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .engine.costs import CALIBRATION_SIZES, calibrate
    from .models.loader import load_model

    _set_threads(args.threads)
    err = Console(stderr=True)
    lm = load_model(args.model, args.dtype, compile=args.compile, exact=args.exact)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else list(CALIBRATION_SIZES)
    sizes = [s for s in sizes if 1 <= s <= args.max_nodes]
    with err.status("measuring verify latency…"):
        prof = calibrate(lm, sizes=sizes, max_nodes=args.max_nodes, past_len=args.past_len, repeats=args.repeats,
                         on_point=lambda n, s: err.print(f"[dim]{n:4d} nodes: {1e3 * s:8.2f} ms[/dim]"))
    t = Table(title=f"verify latency · {lm.name} ({args.dtype}) · past {prof['past_len']} tokens · "
                    f"median of {args.repeats}")
    t.add_column("nodes", justify="right")
    t.add_column("ms", justify="right")
    t.add_column("ms / node", justify="right")
    for n, sec in prof["verify_points"]:
        t.add_row(str(n), f"{1e3 * sec:.2f}", f"{1e3 * sec / n:.3f}")
    Console().print(t)
    Console().print("draft latency: " + ", ".join(
        f"{k} {1e3 * v['seconds']:.2f} ms" if "seconds" in v else f"{k} (unavailable: {v['error'][:80]})"
        for k, v in prof["draft"].items()) + f"; per-round overhead {1e3 * prof['round_overhead_s']:.2f} ms")
    Console().print(f"profile: {prof['path']}")
    return 0


def cmd_train(args) -> int:
    from .train.config_check import load_train_config
    from .train.trainer import Trainer, latest_checkpoint

    cfg = load_train_config(args.config, device=args.device, output_dir=args.output_dir,
                            max_steps=args.max_steps, data=args.data, time_limit_min=args.time_limit)
    last = latest_checkpoint(cfg.output_dir)
    if last is not None and not args.resume:  # never silently restart over a killed run's progress
        raise ValueError(f"{cfg.output_dir} already holds checkpoints (latest {last.name}): pass --resume to "
                         f"continue that run, or --output-dir DIR to start a new one")
    trainer = Trainer(cfg)
    if args.resume and trainer.resume():
        print(f"resumed from step {trainer.step}", file=sys.stderr)
    result = trainer.fit()
    print(json.dumps(result))
    if "stopped_at_step" in result:
        print(f"stopped at step {result['stopped_at_step']} of {result['total_steps']} (--time-limit): continue with "
              f"the same command and --resume", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from .export import export_head
    from .models.loader import load_model

    lm = load_model(args.model, "fp32", tokenizer=False) if args.model else None
    out = export_head(args.head_dir, args.format, args.out, lm=lm, mask_token_id=args.mask_token_id)
    print(f"wrote {args.format} checkpoint to {out}")
    return 0


def cmd_card(args) -> int:
    from .train.card import write_model_card

    rows, bench_cmd = None, ""
    if args.bench_json:
        try:
            with open(args.bench_json) as f:
                data = json.load(f)
        except OSError as e:
            raise ValueError(f"cannot read --bench-json {args.bench_json}: {e.strerror}") from None
        except ValueError as e:
            raise ValueError(f"--bench-json {args.bench_json} is not valid JSON: {e}") from None
        rows = data.get("rows") if isinstance(data, dict) else data
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"--bench-json {args.bench_json} holds no bench rows: give `paratree bench --json` output")
        rows = [r for r in rows if r.get("method", "").split("@")[0] in (args.methods or "").split(",")] \
            if args.methods else rows
        bench_cmd = args.bench_command or (data.get("command", "") if isinstance(data, dict) else "")
    out = write_model_card(args.head, args.train_command, args.data_command, rows, bench_cmd, args.notes or "")
    print(out)
    return 0


def _add_drafter_args(p) -> None:
    """Options that pick what a drafter drafts with (shared by generate and serve)."""
    p.add_argument("--head", default=None, help="trained draft head directory (default: the one shipped for the model)")
    p.add_argument("--draft-model", default=None,
                   help="draft-model drafter: packaged name, HF dir or .gguf of a small LM with the target's tokenizer")
    p.add_argument("--draft-depth", type=int, default=None, help="draft-model: most tokens drafted per round (default 10)")
    p.add_argument("--draft-min-prob", type=float, default=None,
                   help="draft-model: stop a round's chain at the first token the draft model gives less than this "
                        "(default 0.4; 0 = always draft --draft-depth tokens)")
    p.add_argument("--draft-lookup", type=int, default=None,
                   help="draft-model: let the draft model check up to this many prompt-lookup tokens in one forward "
                        "before stepping on its own (default 8; 0 = off)")
    p.add_argument("--draft-width", type=int, default=1,
                   help="draft-model: candidates per depth (1 = chain; k > 1 adds k-1 sibling leaves per depth)")


def _drafter_options(args) -> dict:
    opts = {"head_path": args.head} if args.head else {}
    if args.drafter == "draft-model":
        opts.update(draft_model=args.draft_model, draft_width=args.draft_width)
        opts.update({k: v for k, v in (("draft_depth", args.draft_depth), ("draft_min_prob", args.draft_min_prob),
                                                  ("draft_lookup", args.draft_lookup))
                     if v is not None})
    return opts


def cmd_serve(args) -> int:
    from .serve.server import serve

    return serve(args.model, args.dtype, host=args.host, port=args.port, api_key=args.api_key,
                 max_body_bytes=args.max_body_bytes, log_level=args.log_level, drafter=args.drafter,
                 budget=args.budget, max_batch=args.max_batch, max_queue=args.max_queue,
                 max_model_len=args.max_model_len or 2048, policy=args.policy, cost_model=args.cost_model,
                 request_timeout=args.request_timeout, served_model_name=args.served_model_name,
                 threads=getattr(args, "threads", None), drafter_options=_drafter_options(args))


def cmd_bench_serve(args) -> int:
    import shlex

    from .serve.bench_serve import run_cli

    return run_cli(args, "paratree " + " ".join(shlex.quote(a) for a in getattr(args, "argv", None) or ["bench-serve"]))


def build_parser() -> argparse.ArgumentParser:
    from .drafters import drafters
    from .export import FORMATS

    p = _Parser(prog="paratree", description="Lossless speculative decoding with parallel tree drafting")
    p.add_argument("--version", action="version", version=f"paratree {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt, streaming")
    g.add_argument("prompt")
    _add_model_args(g)
    _add_sampling_args(g)
    g.add_argument("--drafter", default=None, choices=drafters(),
                   help="default: with --head, its family's drafter; else the drafter measured fastest for a packaged "
                        "model (jetspec+ngram for smollm2-135m), its shipped JetSpec head, or ngram (prompt lookup)")
    g.add_argument("--budget", default="auto",
                   help="auto (default: size each tree from this machine's calibrated verify cost, see "
                        "`paratree calibrate`) or the max tree nodes per verify, root included")
    _add_drafter_args(g)
    _add_compile_arg(g)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("models", help="list packaged models and how to install them")
    m.set_defaults(func=cmd_models)

    d = sub.add_parser("data", help="self-distillation data: the target's own responses to training prompts")
    d.add_argument("--out", required=True,
                   help="a directory of compact shards, or a .jsonl file (both appended to: a killed run resumes)")
    d.add_argument("--mix", default="gsm8k_train=600,code=400,dolly=250,roleplay=120,self_instruct=50",
                   help="prompts per source (a count, or all): gsm8k_train, code, dolly, roleplay, self_instruct, "
                        "sharegpt")
    _add_model_args(d)
    d.add_argument("--max-new-tokens", type=int, default=192)
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--temperature", type=float, action="append", default=None,
                   help="0 = greedy (default); repeat for several passes, e.g. 0 and 0.8")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--limit", type=int, default=None,
                   help="only the first N prompts of the run's fixed order (what an unlimited run had done after N)")
    d.set_defaults(func=cmd_data)

    t = sub.add_parser("train", help="train a draft head (single process, or under torchrun for DDP)")
    t.add_argument("--config", required=True, help="yaml/json training config (see configs/)")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    t.add_argument("--device", default=None, help="cpu (default) or cuda")
    t.add_argument("--output-dir", default=None)
    t.add_argument("--data", default=None, help="override the config's distilled data file")
    t.add_argument("--max-steps", type=int, default=None)
    t.add_argument("--time-limit", type=float, default=None, metavar="MIN",
                   help="stop after the step that passes MIN minutes, with a checkpoint: --resume continues "
                        "(training split across working sessions)")
    t.set_defaults(func=cmd_train)

    b = sub.add_parser("bench-plain", help="own runner vs HF generate(), plain greedy decoding")
    _add_model_args(b)
    b.add_argument("--max-new-tokens", type=int, default=256)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--prompt", default="Write a short story about a robot who learns to paint.")
    _add_compile_arg(b)
    b.set_defaults(func=cmd_bench_plain)

    bn = sub.add_parser("bench", help="benchmark decoding methods on eval sets: τ, tokens/s, speedup vs plain")
    bn.add_argument("--model", default=None, help="packaged name, HF checkpoint dir or .gguf file")
    bn.add_argument("--dtype", default="auto", help="auto (default), gguf, bf16, fp32, fp64")
    bn.add_argument("--dataset", default="gsm8k",
                    help="gsm8k, humaneval, mt_bench or a .jsonl file; comma-separated list allowed")
    bn.add_argument("--methods", default=None,
                    help="comma-separated: plain, hf, hf-pld, hf-assisted, llama.cpp, llama.cpp-lookup "
                         "(llama-cpp-python on the same GGUF: scripts/build_llama_cpp.sh), "
                         "llama.cpp-eagle3|dflash|dspark@N (an exported head, --head FMT=DIR, in llama.cpp's "
                         "speculative decoding with N-1 drafts: scripts/build_llama_spec.sh) and paratree "
                         "drafters (name or name@budget); plain and drafters take ~inexact (e.g. plain~inexact, "
                         "ngram@auto~inexact): the same model loaded again with --no-exact, to price exactness "
                         "in the same run; default: all but llama.cpp")
    bn.add_argument("--limit", type=int, default=10, help="prompts per dataset (default 10)")
    bn.add_argument("--max-new-tokens", type=int, default=128)
    bn.add_argument("--budget", default=None,
                    help="tree budget(s) for paratree drafters: N, auto or a list (default 8,16,32,64,128,auto)")
    bn.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    bn.add_argument("--seed", type=int, default=0)
    bn.add_argument("--repeats", type=int, default=3, help="runs per method; the first is a warm-up when >= 2")
    bn.add_argument("--assistant", default=None, help="assistant model for hf-assisted")
    bn.add_argument("--head", action="append", default=None, metavar="[NAME=]DIR",
                    help="trained draft head dir for head drafters (NAME = drafter or head family; repeatable)")
    bn.add_argument("--json", default=None, metavar="OUT", help="write the rows as a JSON list")
    bn.add_argument("--report", default=None, metavar="DIR", help="write report.md and PNG plots")
    bn.add_argument("--quick", action="store_true", help="2 prompts, 32 tokens, 1 repeat, budgets 32,auto (CI)")
    bn.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    bn.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's); profiles are kept per thread count")
    _add_compile_arg(bn)
    bn.set_defaults(func=cmd_bench)

    mc = sub.add_parser("card", help="write MODEL_CARD.md for a trained head from its run records and a bench JSON")
    mc.add_argument("--head", required=True, help="head directory (head.safetensors, head_config.json, train_summary.json)")
    mc.add_argument("--train-command", required=True)
    mc.add_argument("--data-command", required=True)
    mc.add_argument("--bench-json", default=None, help="`paratree bench --json` output")
    mc.add_argument("--bench-command", default=None)
    mc.add_argument("--methods", default=None, help="only these drafters' rows (comma-separated names)")
    mc.add_argument("--notes", default=None)
    mc.set_defaults(func=cmd_card)

    ex = sub.add_parser("export", help="write a trained head in another engine's checkpoint format")
    ex.add_argument("head_dir")
    ex.add_argument("--format", required=True, choices=FORMATS)
    ex.add_argument("--out", required=True, help="output directory (config.json, model.safetensors, README.md)")
    ex.add_argument("--model", default=None, help="the head's target (default: the packaged model it names)")
    ex.add_argument("--mask-token-id", type=int, default=None,
                    help="token whose row of the exported draft's embed_tokens carries the learned mask embedding "
                         "(default: the last id; that token, as a draft anchor, then reads as the mask in engines)")
    ex.set_defaults(func=cmd_export)

    c = sub.add_parser("calibrate", help="measure verify latency vs tree size; store the profile for --budget auto")
    c.add_argument("--model", default=None, help="packaged name, HF checkpoint dir or .gguf file")
    c.add_argument("--dtype", default="auto", help="auto (default), gguf, bf16, fp32, fp64")
    c.add_argument("--max-nodes", type=int, default=256)
    c.add_argument("--sizes", default=None, help="comma-separated tree sizes (default 1,2,4,…,192,256)")
    c.add_argument("--past-len", type=int, default=256, help="cached tokens before the tree (default 256)")
    c.add_argument("--repeats", type=int, default=5, help="timings per size; the median is kept")
    c.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    _add_compile_arg(c)
    c.set_defaults(func=cmd_calibrate)

    from .serve.cli_args import add_serve_parsers

    add_serve_parsers(sub, _add_model_args, _add_drafter_args, cmd_serve, cmd_bench_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if getattr(args, "cmd", None) == "data" and args.temperature is None:
        args.temperature = [0.0]
    from .models.config import UnsupportedModelError
    from .models.loader import ModelNotFoundError
    from .models.runner import ContextOverflowError

    try:
        _check_counts(args)
        if isinstance(getattr(args, "dtype", None), str):
            from .models.loader import dtype_name

            args.dtype = dtype_name(args.dtype, getattr(args, "model", None))  # 'auto' -> fastest here
        return args.func(args)
    except (ModelNotFoundError, UnsupportedModelError, ContextOverflowError, ValueError) as e:
        print("paratree: error: " + " ".join(str(e).split()), file=sys.stderr)  # always one line
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\nparatree: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
