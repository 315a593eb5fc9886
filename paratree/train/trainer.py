"""`paratree train --config FILE`: train a block draft head against a frozen target.

One process on CPU, or `torchrun --nproc-per-node N` (gloo on CPU, nccl on GPU):
every rank takes its share of each step's sequences, gradients are summed across
ranks, and each loss is normalised by the GLOBAL number of supervised rows, so N
ranks compute exactly the update one process computes on the same global batch.
Anchors are drawn from a generator keyed by (seed, epoch, sequence), never by
rank, for the same reason. Checkpoints hold weights, optimiser, scheduler and
RNG state and are written atomically; `--resume` continues from the latest.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..drafters.heads.block import BlockDraftHead, tokenizer_fingerprint
from ..drafters.heads.dspark import expected_calibration_error, fit_temperature
from ..drafters.heads.training import LOSSES, teacher_forced_tau
from ..drafters.registry import head_family_of
from ..models.loader import LoadedModel, auto_dtype, cpu_has_native_bf16, load_model
from .data import load_sequences, machine_description


@dataclass
class TrainConfig:
    family: str = "jetspec"  # a registered head family (drafters/families/): jetspec (block-causal, KL) |
    # dflash (bidirectional, decayed CE) | eagle (AR, TTT) | dspark (Markov + confidence heads, own loss mix)
    markov_rank: int = 64  # dspark: rank of the previous-token bias
    target: str | None = None  # model spec; None = the default model
    target_dtype: str = "auto"
    data: str = "runs/data/smollm2_distill.jsonl"
    eval_fraction: float = 0.03
    num_layers: int = 2
    intermediate_size: int | None = None  # head MLP width; None = the target's (too wide for a 1.5B target's head)
    block_size: int = 16
    num_taps: int = 3
    draft_vocab: int = 0  # > 0: predict over the N most frequent response tokens only (EAGLE-3's d2t)
    tap_norm: bool = True  # block heads: RMS-normalise each tap before fc (False: exportable as DFlash/DSpark)
    root_in: bool = True  # block heads: root row mixes its embedding with the state before it (False: exportable)
    shifted: bool = False  # block heads: DFlash's layout (row i >= 1 predicts its own position; exportable as DFlash)
    mask_token: int = -1  # block heads: >= 0 = mask rows are the target's embedding of this token (exportable)
    loss: str = "kl"
    kl_temperature: float = 1.0
    gamma: float = 7.0
    ttt_decay: float = 0.8  # eagle: weight of training-time-test step j is ttt_decay ** (j - 1)
    unmask_prob: float = 0.0  # path-conditioned training: chance a block gets a real-token prefix
    lr: float = 6e-4
    weight_decay: float = 0.0
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    epochs: float = 2.0
    max_steps: int | None = None
    seqs_per_step: int = 8
    anchors_per_seq: int = 24
    seed: int = 0
    eval_every: int = 100
    eval_seqs: int = 16
    checkpoint_every: int = 50
    keep_checkpoints: int = 3  # the newest N checkpoints stay on disk (0 = all); a head + AdamW state is ~100 MB
    time_limit_min: float | None = None  # stop after the step that passes this (checkpoint saved; --resume goes on)
    log_every: int = 5
    output_dir: str = "runs/jetspec"
    device: str = "cpu"
    autocast_bf16: bool = True  # head matmuls in bf16 (fp32 master weights): ~6x faster on bf16-native CPUs,
    # ignored (fp32) on CPUs that only emulate bf16, where it would be ~2x slower
    cache_features: bool = True  # keep target states in RAM across epochs (~4.6 KB/token for 3 taps at H=576)
    feature_cache_gb: float = 4.0  # ...up to this many GiB; sequences beyond it recompute their states each
    # epoch (ten times the data would be ~25 GiB of states: more than these machines' RAM)
    init_from: str | None = None  # a saved head (dir) to start from instead of random weights: same family,
    # shape and target; its draft vocab is kept (fine-tuning a shipped head on more data)

    @classmethod
    def from_mapping(cls, raw: dict, **overrides) -> "TrainConfig":
        """A config from a mapping whose keys and types `train.config_check` has checked, plus the
        non-None `overrides` (command-line options); refuses an unknown family or loss."""
        cfg = cls(**{**raw, **{k: v for k, v in overrides.items() if v is not None}})
        head_family_of(cfg.family)  # an unknown family is a one-line error naming the registered ones
        if cfg.loss not in LOSSES:
            raise ValueError(f"unknown loss '{cfg.loss}': {', '.join(LOSSES)}")
        return cfg


# -- target features -------------------------------------------------------------------
@torch.no_grad()  # not inference_mode: the outputs feed the head's autograd graph
def target_states(lm: LoadedModel, ids: list[int], taps: tuple[int, ...]) -> torch.Tensor:
    """Residual stream (T, (k+1)*H) of the frozen target at the tap layers plus the last layer.

    The last layer's residual is all that is needed to recompute the target's
    logits (final norm + LM head), so caching this is ~4 KB/token instead of
    the ~200 KB/token the full logits would take.
    """
    m, cfg = lm.model, lm.config
    t = len(ids)
    w = next(m.parameters())
    dev = w.device
    k = torch.zeros(cfg.num_layers, 1, cfg.num_kv_heads, t, cfg.head_dim, dtype=w.dtype, device=dev)
    v = torch.zeros_like(k)
    pos = torch.arange(t, device=dev).view(1, t)
    mask = torch.ones(t, t, dtype=torch.bool, device=dev).tril().view(1, 1, t, t)
    layers = tuple(sorted(set(taps) | {cfg.num_layers - 1}))
    _, tapped = m(torch.tensor([ids], device=dev), pos, k, v, t, mask=mask, taps=layers,
                  logits_rows=torch.tensor([t - 1], device=dev))
    h = cfg.hidden_size
    by_layer = dict(zip(layers, tapped[0].split(h, dim=-1)))
    return torch.cat([by_layer[i] for i in taps] + [by_layer[cfg.num_layers - 1]], dim=-1)


@torch.no_grad()
def target_features(lm: LoadedModel, states: torch.Tensor, rows: torch.Tensor, lm_w: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Head taps (T, k*H) from cached states, and the target's logits at `rows` over lm_w's vocab."""
    h = lm.config.hidden_size
    last = lm.model.norm(states[rows.to(states.device), -h:])
    return states[:, :-h].float(), F.linear(last, lm_w.to(last.dtype)).float()


def frequent_tokens(seqs: list[dict], n: int, always: set[int], vocab_size: int) -> torch.Tensor:
    """`always` plus the most frequent response tokens (ties by id: identical on every rank), n in all;
    if the data has fewer distinct tokens, the lowest unused ids fill the rest."""
    counts = Counter(t for s in seqs for t in s["ids"][s["prompt_len"]:])
    ranked = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    keep = dict.fromkeys([*sorted(always), *ranked])
    for t in range(vocab_size):
        if len(keep) >= n:
            break
        keep.setdefault(t)
    return torch.tensor(sorted(list(keep)[:n]), dtype=torch.long)


# -- the trainer -------------------------------------------------------------------------
def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under `output_dir` (None if there is none)."""
    ck = Path(output_dir) / "checkpoints"
    done = sorted(p for p in ck.glob("step_*") if (p / "trainer_state.pt").is_file()) if ck.is_dir() else []
    return done[-1] if done else None


class Trainer:
    def __init__(self, cfg: TrainConfig, lm: LoadedModel | None = None, sequences: list[dict] | None = None,
                 progress: bool = True):
        self.cfg = cfg
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
        self.progress = progress and self.rank == 0
        torch.manual_seed(cfg.seed)
        self.device = torch.device(cfg.device)
        on_cpu = self.device.type == "cpu"
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device '{cfg.device}' asked for, but torch sees no CUDA GPU")
        # auto: the runtime the head will draft for (a GGUF target's own 4-bit weights on bf16-native CPUs)
        dtype = cfg.target_dtype if cfg.target_dtype != "auto" else auto_dtype(cfg.device, cfg.target)
        self.lm = lm or load_model(cfg.target, dtype, pack=on_cpu)
        self.lm.model.to(self.device)
        # Head matmuls in bf16 autocast where that is fast: GPUs and bf16-native CPUs.
        self._autocast = cfg.autocast_bf16 and (not on_cpu or cpu_has_native_bf16())
        seqs = sequences if sequences is not None else load_sequences(cfg.data)
        rng = random.Random(cfg.seed)
        order = list(range(len(seqs)))
        rng.shuffle(order)
        n_eval = max(1, int(len(seqs) * cfg.eval_fraction)) if len(seqs) > 1 else 0
        self.eval_seqs = [seqs[i] for i in order[:n_eval]][: cfg.eval_seqs]
        self.train_seqs = [seqs[i] for i in order[n_eval:]]
        if not self.train_seqs:
            raise ValueError("no training sequences left after the eval split")
        self.family = family = head_family_of(cfg.family)
        hcfg = family.head_config(
            self.lm.config, cfg, num_taps=cfg.num_taps, num_layers=cfg.num_layers, block_size=cfg.block_size,
            intermediate_size=cfg.intermediate_size or self.lm.config.intermediate_size, target_name=self.lm.name,
            tokenizer_hash=tokenizer_fingerprint(self.lm.tokenizer), draft_vocab=cfg.draft_vocab,
            tap_norm=cfg.tap_norm, root_in=cfg.root_in, shifted=cfg.shifted, mask_token=cfg.mask_token)
        self.head = family.new_head(hcfg)
        # confidence rows (logit, realised acceptance, supervision) of the last eval, from families with a
        # confidence head (DSpark): calibrated by temperature scaling at the end of training
        self._conf_rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._init_weights()
        if cfg.draft_vocab:
            if cfg.draft_vocab > self.lm.config.vocab_size:
                raise ValueError(f"draft_vocab {cfg.draft_vocab} exceeds the target's vocab {self.lm.config.vocab_size}")
            if not cfg.init_from:  # a loaded head brings its own d2t
                self.head.d2t.copy_(frequent_tokens(self.train_seqs, cfg.draft_vocab, self.lm.eos_ids,
                                                    self.lm.config.vocab_size))
        self.family.init_head(self.head, self.lm)
        if cfg.init_from:
            self._load_init(cfg.init_from)
        self.head.to(self.device)
        self.embed_w = self.lm.model.embed.weight.detach()
        # Teacher and draft over the same vocab: with a draft vocab, the target's distribution
        # renormalised on it (what a draft restricted to it can match at best).
        self.teacher_w = self.head.target_rows(self.lm.model.lm_head.weight.detach())
        self.lm_w = self.head.lm_weight(self.lm.model.lm_head.weight.detach())  # teacher_w, or the head's own
        params = [p for p in self.head.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
        self.steps_per_epoch = math.ceil(len(self.train_seqs) / cfg.seqs_per_step)
        self.total_steps = cfg.max_steps or max(1, int(cfg.epochs * self.steps_per_epoch))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_lambda)
        self.step = 0
        self.out = Path(cfg.output_dir)
        self._cache: dict[int, torch.Tensor] = {}
        self._cache_bytes = 0
        self._elapsed_before, self._t_start = 0.0, None

    def _init_weights(self) -> None:
        g = torch.Generator().manual_seed(self.cfg.seed)
        for name, p in self.head.named_parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, 0.0, 0.02, generator=g)
        # Start the mask embedding at the target's mean token embedding: a neutral input.
        if self.head.mask_emb is not None:
            with torch.no_grad():
                self.head.mask_emb.copy_(self.lm.model.embed.weight.float().mean(0))

    def _load_init(self, path: str) -> None:
        """Start from a saved head; refuse one whose family, shape or target differ (clear error)."""
        saved = json.loads(BlockDraftHead.read_config(path).to_json())
        differ = [k for k, v in json.loads(self.head.cfg.to_json()).items() if saved.get(k) != v]
        if differ:
            raise ValueError(f"init_from head at '{path}' does not match this run's head: {', '.join(differ)} differ")
        self.head.load_state_dict(self.family.load_head(path, dtype=torch.float32).state_dict())

    def _lr_lambda(self, step: int) -> float:
        c = self.cfg
        if step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        frac = (step - c.warmup_steps) / max(1, self.total_steps - c.warmup_steps)
        return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    # -- one step ------------------------------------------------------------------------
    def _step_sequences(self, step: int) -> list[tuple[int, dict]]:
        epoch, within = divmod(step, self.steps_per_epoch)
        order = list(range(len(self.train_seqs)))
        random.Random(self.cfg.seed * 1000003 + epoch).shuffle(order)
        idx = order[within * self.cfg.seqs_per_step : (within + 1) * self.cfg.seqs_per_step]
        return [(epoch * len(order) + i, self.train_seqs[i]) for i in idx]

    def _prepare(self, key: int, seq: dict, unmask_prob: float | None = None):
        gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + key)
        p = self.cfg.unmask_prob if unmask_prob is None else unmask_prob
        return self.family.training_rows(seq, self.head.cfg.depth, self.cfg, gen, p)

    def _states(self, seq: dict) -> torch.Tensor:
        key = id(seq)
        if key not in self._cache:
            st = target_states(self.lm, seq["ids"], self.head.cfg.tap_layers)
            nbytes = st.numel() * st.element_size()
            if self.cfg.cache_features and self._cache_bytes + nbytes <= self.cfg.feature_cache_gb * 2**30:
                self._cache[key] = st
                self._cache_bytes += nbytes
            return st
        return self._cache[key]

    def _loss_sum(self, seq: dict, anchors, toks, sup):
        d, family = self.head.cfg.depth, self.family
        # draft row i (depth i+1) is supervised by the target's prediction at anchor + i + offset
        off = family.target_offset
        idx = (torch.tensor(anchors).view(-1, 1) + torch.arange(off, d + off).view(1, -1))
        idx = idx.clamp(max=len(seq["ids"]) - 1)
        taps, target = target_features(self.lm, self._states(seq), idx.reshape(-1), self.teacher_w)
        target = target.view(*idx.shape, -1)
        sup = sup.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._autocast):
            draft, aux = family.draft_logits(self.head, taps, seq, anchors, toks, idx.to(self.device), self.embed_w,
                                             self.lm_w)
        loss, conf = family.loss(draft, aux, target, sup, self.cfg)
        if conf is not None and not self.head.training:
            self._conf_rows.append((*conf, sup))
        return loss, draft.detach(), target, sup

    def train_step(self) -> dict:
        items = self._step_sequences(self.step)
        prepared = [(seq, *self._prepare(key, seq)) for key, seq in items]
        # Every rank prepares every item (cheap), so `rows` is already the global count.
        rows = float(sum(float(p[3].sum()) for p in prepared))
        mine = prepared[self.rank :: self.world]
        self.head.train()
        self.opt.zero_grad(set_to_none=False)
        total, tau_sum, tau_rows, n_tok = 0.0, 0.0, 0.0, 0
        for seq, anchors, toks, sup in mine:
            if not anchors:
                continue
            loss, draft, target, _ = self._loss_sum(seq, anchors, toks, sup)
            (loss / max(rows, 1.0)).backward()
            total += float(loss.detach())
            w = float((sup[:, 0] > 0).sum())  # rows drafted from the root, as at inference
            if w:
                tau_sum += teacher_forced_tau(draft, target, sup) * w
                tau_rows += w
            n_tok += len(seq["ids"])
        stats = torch.tensor([total, tau_sum, tau_rows, float(n_tok)], device=self.device)
        if self.world > 1:
            for p in self.head.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
            dist.all_reduce(stats)
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.head.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.step += 1
        return {"step": self.step, "loss": float(stats[0]) / max(1.0, float(rows)),
                "tau_tf": float(stats[1]) / max(1.0, float(stats[2])), "tokens": int(stats[3]),
                "lr": self.sched.get_last_lr()[0]}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out KL/CE and teacher-forced τ, on mask-only blocks (as drafted at inference)."""
        self.head.eval()
        self._conf_rows = []
        loss, rows, taus = 0.0, 0.0, []
        for i, seq in enumerate(self.eval_seqs):
            anchors, toks, sup = self._prepare(10_000 + i, seq, unmask_prob=0.0)
            if not anchors:
                continue
            value, draft, target, _ = self._loss_sum(seq, anchors, toks, sup)
            loss, rows = loss + float(value), rows + float(sup.sum())
            taus.append(teacher_forced_tau(draft, target, sup))
        out = {"eval_loss": loss / max(rows, 1.0), "eval_tau_tf": sum(taus) / max(1, len(taus))}
        if self._conf_rows:
            logit, accept = self._conf_logits()
            out["eval_ece"] = expected_calibration_error(torch.sigmoid(logit / self.head.conf_temperature), accept)
        return out

    def _conf_logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Confidence logits and realised acceptances of the supervised rows of the last eval."""
        keep = [sup > 0 for _, _, sup in self._conf_rows]
        return (torch.cat([c[k] for (c, _, _), k in zip(self._conf_rows, keep)]),
                torch.cat([a[k] for (_, a, _), k in zip(self._conf_rows, keep)]))

    def calibrate_confidence(self) -> dict:
        """Temperature-scale the confidence head on the held-out split; ECE before and after."""
        self.head.cfg.extra["conf_temperature"] = 1.0
        before = self.evaluate()["eval_ece"]
        t = fit_temperature(*self._conf_logits())
        self.head.cfg.extra["conf_temperature"] = t
        logit, accept = self._conf_logits()
        after = expected_calibration_error(torch.sigmoid(logit / t), accept)
        return {"conf_temperature": t, "ece_before": before, "ece_after": after}

    # -- checkpoints ---------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        if self.rank != 0:
            return None
        ck = self.out / "checkpoints"
        ck.mkdir(parents=True, exist_ok=True)
        tmp = ck / f".tmp-step_{self.step}"
        shutil.rmtree(tmp, ignore_errors=True)
        self.head.save(tmp, dtype=torch.float32)
        torch.save({"step": self.step, "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                    "torch_rng": torch.get_rng_state(), "config": asdict(self.cfg), "elapsed_s": self._elapsed(),
                    "data": self._data_fingerprint()},
                   tmp / "trainer_state.pt")
        final = ck / f"step_{self.step:07d}"
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if self.cfg.keep_checkpoints > 0:
            for old in sorted(ck.glob("step_*"))[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def _data_fingerprint(self) -> dict:
        """What the step order and the held-out split depend on: a store that grew changes both."""
        seqs = self.train_seqs + self.eval_seqs
        return {"sequences": len(seqs), "tokens": sum(len(q["ids"]) for q in seqs)}

    def _time_up(self, t0: float, limit_min: float) -> bool:
        """Whether this segment's time is up, decided alike on every rank (one late rank would otherwise
        wait forever in the next step's all_reduce)."""
        up = torch.tensor([float(time.perf_counter() - t0 >= 60 * limit_min)], device=self.device)
        if self.world > 1:
            dist.all_reduce(up, op=dist.ReduceOp.MAX)
        return bool(up.item())

    def _elapsed(self) -> float:
        """Training wall time over every run segment so far (resumed runs add theirs)."""
        return self._elapsed_before + (time.perf_counter() - self._t_start if self._t_start is not None else 0.0)

    def resume(self) -> bool:
        last = latest_checkpoint(self.out)
        if last is None:
            return False
        loaded = type(self.head).load(last, dtype=torch.float32)
        self.head.load_state_dict(loaded.state_dict())
        state = torch.load(last / "trainer_state.pt", weights_only=False)
        if state.get("data", self._data_fingerprint()) != self._data_fingerprint():
            raise ValueError(f"{last} was trained on other data ({state['data']['sequences']} sequences, "
                             f"{state['data']['tokens']} tokens; now {self._data_fingerprint()['sequences']}, "
                             f"{self._data_fingerprint()['tokens']}): the shuffle and the held-out split would "
                             f"change, so resume on the same data or start a new --output-dir")
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["torch_rng"])
        self.step = state["step"]
        self._elapsed_before = state.get("elapsed_s", 0.0)
        return True

    # -- the loop ------------------------------------------------------------------------
    def fit(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        log = open(self.out / "log.jsonl", "a") if self.rank == 0 else None
        cols = [TextColumn(f"[bold]train {self.cfg.family}"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
                TextColumn("loss {task.fields[loss]:.3f} τtf {task.fields[tau]:.2f} {task.fields[tps]:.0f} tok/s"),
                TimeElapsedColumn(), TimeRemainingColumn()]
        last: dict = {}
        t0, toks = time.perf_counter(), 0
        self._t_start = t0
        limit = self.cfg.time_limit_min
        with Progress(*cols, disable=not self.progress) as bar:
            task = bar.add_task("train", total=self.total_steps, completed=self.step, loss=0.0, tau=0.0, tps=0.0)
            while self.step < self.total_steps:
                last = self.train_step()
                toks += last["tokens"]
                last["tokens_per_s"] = toks / (time.perf_counter() - t0)
                bar.update(task, completed=self.step, loss=last["loss"], tau=last["tau_tf"], tps=last["tokens_per_s"])
                if self.cfg.eval_every and self.step % self.cfg.eval_every == 0:
                    last.update(self.evaluate())
                if log and (self.step % self.cfg.log_every == 0 or "eval_loss" in last):
                    log.write(json.dumps(last) + "\n")
                    log.flush()
                saved = bool(self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0)
                if saved:
                    self.save_checkpoint()
                if limit is not None and self._time_up(t0, limit) and self.step < self.total_steps:
                    if not saved:
                        self.save_checkpoint()  # a time-boxed segment: the next --resume continues from here
                    if log:
                        log.close()
                    return {**last, "stopped_at_step": self.step, "total_steps": self.total_steps}
        last.update(self.evaluate())
        if self._conf_rows:  # a confidence head (DSpark): temperature-scale it on the held-out split
            last["calibration"] = self.calibrate_confidence()
        if log:
            log.write(json.dumps({**last, "final": True}) + "\n")
            log.close()
        if self.rank == 0:
            self.save_checkpoint()
            n_tok = sum(len(s["ids"]) for s in self.train_seqs)
            summary = {"config": asdict(self.cfg), "steps": self.step, "world_size": self.world,
                       "wall_time_s": round(self._elapsed(), 1), "train_sequences": len(self.train_seqs),
                       "train_tokens": n_tok, "eval_sequences": len(self.eval_seqs), "final": last,
                       "machine": machine_description(), "head_params": sum(p.numel() for p in self.head.parameters())}
            self.head.save(self.out / "head", dtype=torch.bfloat16,
                           extra_files={"train_summary.json": json.dumps(summary, indent=2)})
        return last
