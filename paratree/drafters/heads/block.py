"""Block draft heads: one pass over [root, MASK x (B-1)] gives B depths of logits.

The head reads fused target hidden states ("taps") of the committed context and
injects them as extra keys/values in every layer (DFlash / JetSpec design):
queries come from the block only, keys/values from [context ; block]. It owns
no embedding or LM head: it borrows the frozen target's, so it stays small.

Row i of a block holds the token at position root+i (the root, then MASKs or
real branch tokens) and predicts the NEXT token, depth i+1, as a causal LM row
does. The root row's input pairs the root's embedding with the fused state of
the token before it (EAGLE's step input): depth 1 then needs no attention hop
to the newest context state; without it, CPU-budget training never got past
unigram predictions (measured: depth-1 top-1 6.5% -> 21% after 100 steps).

`causal=True` is JetSpec (block-causal: row i sees block rows <= i, so rows can
carry real branch tokens and a node's row gives its own children, which is
path-conditioned drafting); `causal=False` is DFlash (bidirectional block).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ...models.config import CheckpointError, ModelConfig
from ...models.transformer import MLP, RMSNorm, rotate_half


class HeadMismatchError(ValueError):
    """A head trained for another target model."""


@dataclass
class BlockHeadConfig:
    family: str  # "jetspec" | "dflash"
    causal: bool
    target_hidden: int
    vocab_size: int
    target_layers: int
    tap_layers: tuple[int, ...]
    block_size: int = 16
    num_layers: int = 2
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    intermediate_size: int = 1536
    rms_eps: float = 1e-5
    rope_theta: float = 100000.0
    target_name: str = ""
    tokenizer_hash: str = ""
    # > 0: the head predicts over this many target tokens only (EAGLE-3's reduced draft vocab),
    # stored as the `d2t` buffer (draft index -> target id). The LM-head product, the largest
    # cost of both training and drafting, shrinks by vocab_size / draft_vocab.
    draft_vocab: int = 0
    # Architecture switches (defaults: the shipped heads). False/False is the function the DFlash/DSpark
    # checkpoint formats can express (docs/export_formats_notes.md §5): raw taps into `fc`, and a root
    # row that is its token's embedding (the context K/V already carry the state before it).
    tap_norm: bool = True  # RMS-normalise each tap before `fc`
    root_in: bool = True  # root row = Linear([norm(emb(root)); fused state before it])
    # DFlash's block layout (z-lab): row 0, the anchor, only feeds the others; row i >= 1, a mask at
    # position n+i, predicts the token AT n+i, so one pass drafts block_size - 1 depths (default:
    # anchor-first, as DSpark's `sample_from_anchor`: row i predicts the token after n+i).
    shifted: bool = False
    # >= 0: mask rows are the target's own embedding of this token (the formats' `mask_token_id`)
    # instead of a learned vector that no engine's checkpoint format can carry.
    mask_token: int = -1
    extra: dict = field(default_factory=dict)

    @classmethod
    def for_target(cls, tcfg: ModelConfig, family: str = "jetspec", num_taps: int = 3, **kw) -> "BlockHeadConfig":
        """Sensible head shape for a target: target-sized layers, taps spread over 1..L-3 (DFlash's rule)."""
        n = tcfg.num_layers
        lo, hi = 1, max(1, n - 3)
        taps = tuple(sorted({round(lo + i * (hi - lo) / max(1, num_taps - 1)) for i in range(num_taps)}))
        base = dict(family=family, causal=family != "dflash", target_hidden=tcfg.hidden_size,
                    vocab_size=tcfg.vocab_size, target_layers=n, tap_layers=taps, num_heads=tcfg.num_heads,
                    num_kv_heads=tcfg.num_kv_heads, head_dim=tcfg.head_dim,
                    intermediate_size=tcfg.intermediate_size, rms_eps=tcfg.rms_eps, rope_theta=tcfg.rope_theta)
        base.update(kw)
        return cls(**base)

    @property
    def depth(self) -> int:
        """Depths drafted per pass: one per block row (row i predicts depth i+1), less the
        anchor row of a shifted block."""
        return self.block_size - int(self.shifted)

    def to_json(self) -> str:
        d = asdict(self)
        d["tap_layers"] = list(self.tap_layers)
        return json.dumps(d, indent=2)

    @classmethod
    def from_json(cls, s: str) -> "BlockHeadConfig":
        d = json.loads(s)
        d["tap_layers"] = tuple(d["tap_layers"])
        return cls(**d)


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the vocabulary, so a head refuses a target with another tokenizer."""
    if tokenizer is None:
        return ""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


class HeadAttention(nn.Module):
    def __init__(self, cfg: BlockHeadConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h = cfg.target_hidden
        self.wq = nn.Linear(h, self.nh * self.hd, bias=False)
        self.wkv = nn.Linear(h, 2 * self.nkv * self.hd, bias=False)
        self.wo = nn.Linear(self.nh * self.hd, h, bias=False)
        self.q_norm = RMSNorm(self.hd, cfg.rms_eps)
        self.k_norm = RMSNorm(self.hd, cfg.rms_eps)

    def kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values (B, nkv, T, hd) for rows x (B, T, H) at the given RoPE angles."""
        b, t, _ = x.shape
        k, v = self.wkv(x).view(b, t, 2, self.nkv, self.hd).unbind(2)
        k = self.k_norm(k).transpose(1, 2)
        k = k * cos + rotate_half(k) * sin
        return k, v.transpose(1, 2)

    def forward(self, x, cos, sin, ctx_k, ctx_v, mask):
        b, t, _ = x.shape
        q = self.q_norm(self.wq(x).view(b, t, self.nh, self.hd)).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k, v = self.kv(x, cos, sin)
        keys, vals = torch.cat([ctx_k, k], dim=2), torch.cat([ctx_v, v], dim=2)
        y = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, enable_gqa=self.nh != self.nkv)
        return self.wo(y.transpose(1, 2).reshape(b, t, self.nh * self.hd))


class HeadLayer(nn.Module):
    def __init__(self, cfg: BlockHeadConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.target_hidden, cfg.rms_eps)
        self.attn = HeadAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.target_hidden, cfg.rms_eps)
        self.mlp = MLP(cfg.target_hidden, cfg.intermediate_size)

    def forward(self, x, cos, sin, ctx_k, ctx_v, mask):
        x = x + self.attn(self.attn_norm(x), cos, sin, ctx_k, ctx_v, mask)
        return x + self.mlp(self.mlp_norm(x))


class BlockDraftHead(nn.Module):
    def __init__(self, cfg: BlockHeadConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.target_hidden
        self.fc = nn.Linear(len(cfg.tap_layers) * h, h, bias=False)
        self.hidden_norm = RMSNorm(h, cfg.rms_eps)
        if not -1 <= cfg.mask_token < cfg.vocab_size:
            raise ValueError(f"mask_token {cfg.mask_token} is not a token id of the target (0..{cfg.vocab_size - 1}, "
                             f"or -1 for a learned mask)")
        self.mask_emb = nn.Parameter(torch.zeros(h)) if cfg.mask_token < 0 else None
        # root row: [norm(emb(root)); state before it] -> H, or the root's embedding alone
        self.root_in = nn.Linear(2 * h, h, bias=False) if cfg.root_in else None
        self.layers = nn.ModuleList(HeadLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(h, cfg.rms_eps)
        if cfg.draft_vocab:
            self.register_buffer("d2t", torch.arange(cfg.draft_vocab, dtype=torch.long))
        else:
            self.d2t = None
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def target_rows(self, target_lm_weight: torch.Tensor) -> torch.Tensor:
        """The target LM head's rows over this head's vocabulary (the teacher's, in training)."""
        return target_lm_weight if self.d2t is None else target_lm_weight[self.d2t]

    def lm_weight(self, target_lm_weight: torch.Tensor) -> torch.Tensor:
        """The LM-head weight the head's logits come from: the target's frozen rows (heads with an
        LM head of their own return it)."""
        return self.target_rows(target_lm_weight)

    # -- pieces ------------------------------------------------------------------------
    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos/sin (…, T, hd) for integer positions (any leading shape)."""
        need = int(positions.max()) + 1
        r = self._rope
        if r is None or r[0].shape[0] < need or r[0].dtype != dtype or r[0].device != positions.device:
            n = max(need, 4096)
            hd = self.cfg.head_dim
            inv = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
            f = torch.outer(torch.arange(n, dtype=torch.float64), inv)
            emb = torch.cat((f, f), dim=-1)
            self._rope = (emb.cos().to(positions.device, dtype), emb.sin().to(positions.device, dtype))
        return self._rope[0][positions], self._rope[1][positions]

    def fuse(self, taps: torch.Tensor) -> torch.Tensor:
        """Context features from concatenated target taps (…, k*H) -> (…, H).

        Each tap is RMS-normalised first: residual streams differ ~10x in scale between
        layers and carry massive activations (SmolLM2's BOS row reaches 2.5e4 at layer 14),
        which would otherwise drown the other taps in the fused sum.
        """
        if not self.cfg.tap_norm:
            return self.hidden_norm(self.fc(taps))
        h = self.cfg.target_hidden
        parts = taps.unflatten(-1, (-1, h))
        parts = parts * torch.rsqrt(parts.float().pow(2).mean(-1, keepdim=True) + self.cfg.rms_eps).to(parts.dtype)
        return self.hidden_norm(self.fc(parts.flatten(-2)))

    def context_kv(self, ctx: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer context keys/values for fused features ctx (B, S, H) at positions (B, S)."""
        cos, sin = self.rope(positions, ctx.dtype)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return [layer.attn.kv(ctx, cos, sin) for layer in self.layers]

    def block_embeddings(self, embed_w: torch.Tensor, block_tokens: torch.Tensor,
                         root_feat: torch.Tensor | None) -> torch.Tensor:
        """Inputs for blocks of rows (B, n*R): token id -1 is MASK (the learned mask embedding);
        row 0 of each R-row block is a root, paired with root_feat (B, n, H), the fused state of
        the token before it (None: no context yet, a zero state)."""
        b, t = block_tokens.shape
        h = embed_w.shape[1]
        is_mask = block_tokens < 0
        x = F.embedding(block_tokens.clamp_min(0), embed_w)
        mask = embed_w[self.cfg.mask_token] if self.mask_emb is None else self.mask_emb
        x = torch.where(is_mask.unsqueeze(-1), mask.to(x.dtype), x)
        if self.root_in is None:
            return x
        n = 1 if root_feat is None else root_feat.shape[1]
        rows = x.view(b, n, t // n, h)
        feat = rows.new_zeros(b, n, 1, h) if root_feat is None else root_feat.to(x.dtype).unsqueeze(2)
        # raw embeddings are ~50x smaller than the normalised state: normalise before pairing
        root = self.root_in(torch.cat([F.rms_norm(rows[:, :, :1], (h,), eps=self.cfg.rms_eps), feat], dim=-1))
        return torch.cat([root, rows[:, :, 1:]], dim=2).view(b, t, h)

    def forward_blocks(self, x: torch.Tensor, positions: torch.Tensor, ctx_kv, mask: torch.Tensor | None):
        """Run block rows x (B, T, H) at positions (B, T) against context K/V; returns final-normed rows."""
        cos, sin = self.rope(positions, x.dtype)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for layer, (ck, cv) in zip(self.layers, ctx_kv):
            x = layer(x, cos, sin, ck, cv, mask)
        return self.norm(x)

    def block_rows(self, depth: int) -> int:
        """Rows of a block that drafts `depth` depths (a shifted block's anchor row comes on top)."""
        return depth + int(self.cfg.shifted)

    def depth_states(self, h: torch.Tensor) -> torch.Tensor:
        """The states (…, rows, H) of a block's rows that predict depths 1, 2, … (drops a shifted anchor)."""
        return h[..., 1:, :] if self.cfg.shifted else h

    def block_mask(self, n_blocks: int, ctx_visible: torch.Tensor) -> torch.Tensor:
        """(n_blocks*B, S + n_blocks*B) bool mask: context visibility per block + in-block pattern."""
        bs = self.cfg.block_size
        inner = torch.ones(bs, bs, dtype=torch.bool, device=ctx_visible.device)
        if self.cfg.causal:
            inner = inner.tril()
        same = torch.block_diag(*([inner] * n_blocks)) if n_blocks > 1 else inner
        ctx = ctx_visible.repeat_interleave(bs, dim=0)  # (n_blocks*bs, S)
        return torch.cat([ctx, same], dim=1)

    # -- save / load -------------------------------------------------------------------
    def save(self, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16, extra_files: dict | None = None) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
              for k, v in self.state_dict().items()}
        save_file(sd, str(out / "head.safetensors"))
        (out / "head_config.json").write_text(self.cfg.to_json())
        for name, text in (extra_files or {}).items():
            (out / name).write_text(text)

    @staticmethod
    def read_config(path: str | Path) -> BlockHeadConfig:
        p = Path(path)
        f = p / "head_config.json"
        if not f.is_file():
            raise ValueError(f"no draft head at '{path}' (expected head_config.json + head.safetensors)")
        try:
            cfg = BlockHeadConfig.from_json(f.read_text())
        except (ValueError, TypeError, KeyError) as e:  # bad JSON, missing or unknown fields
            raise CheckpointError(f"{f} is not a head config: {e}") from None
        return cfg

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> "BlockDraftHead":
        p = Path(path)
        head = cls(cls.read_config(p))
        f = p / "head.safetensors"
        if not f.is_file():
            raise CheckpointError(f"no head weights {f}")
        try:
            sd = load_file(str(f))
        except SafetensorError as e:
            raise CheckpointError(f"cannot read head weights {f} (corrupt or truncated safetensors?): {e}") from None
        return head.fill(sd, dtype, f"head weights {f} do not fit {p / 'head_config.json'}")

    def fill(self, sd: dict[str, torch.Tensor], dtype: torch.dtype, what: str) -> "BlockDraftHead":
        """Load `sd` in `dtype`; missing, unexpected or mis-shaped tensors are one CheckpointError `what: …`."""
        try:
            self.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()})
        except RuntimeError as e:
            raise CheckpointError(f"{what}: {str(e)[:300]}") from None
        return self.to(dtype)

    def check_target(self, tcfg: ModelConfig, tokenizer=None) -> None:
        """Refuse a target the head was not trained for (clear error, before any decoding)."""
        c = self.cfg
        problems = []
        if c.target_hidden != tcfg.hidden_size:
            problems.append(f"hidden size {c.target_hidden} != target's {tcfg.hidden_size}")
        if c.vocab_size != tcfg.vocab_size:
            problems.append(f"vocab size {c.vocab_size} != target's {tcfg.vocab_size}")
        if c.target_layers and c.target_layers != tcfg.num_layers:  # 0: a foreign checkpoint that does not say
            problems.append(f"{c.target_layers} target layers != target's {tcfg.num_layers}")
        fp = tokenizer_fingerprint(tokenizer) if tokenizer is not None else ""
        if c.tokenizer_hash and fp and fp != c.tokenizer_hash:
            problems.append("tokenizer differs from the one the head was trained with")
        if problems:
            raise HeadMismatchError(
                f"draft head trained for '{c.target_name or 'another model'}' does not fit this target: "
                + "; ".join(problems)
            )
