"""The GGUF's own 4-bit weights, run natively (`--dtype gguf`).

Why: de-quantising SmolLM2's 92 MB Q4_1 file gives 269 MB of bf16 that every decode step
streams. torch's int4 CPU kernel (`_weight_int4pack_mm_for_cpu`, group 32, bf16 activations)
reads the 4-bit codes and their group scales instead: on the Intel AVX-512 VM of session 13 the
120 decoder linears of SmolLM2 took 4.3 ms at 1 row against 12.9 ms for oneDNN's packed bf16
(docs/benchmarks.md). Its rows are computed independently of how many rows a call carries (each
row's reduction order is fixed), so a tree verify gives every node the same numbers as a
one-token step: tested bit for bit in tests/test_quant.py.

Formats: every 4-bit GGUF type whose groups are 32 weights of `scale * q + base` (Q4_0, Q4_1,
Q4_K). The kernel computes `(q - 8) * S + Z` with S, Z in bf16, so S = scale and Z = base +
8 * scale, each rounded to bf16 (fp16 scales lose 3 bits: the measured quality change is in
docs/benchmarks.md). Other types (Q5/Q6/Q8, float) stay de-quantised bf16 linears.

The codes are read without re-implementing any block format: gguf-py de-quantises the block
as stored, with its nibbles all 0 (giving `base`) and all 1 (giving `base + scale`), and
`q = (w - base) / scale` recovers each code. The result is checked against the dense
checkpoint the model was loaded from, which transformers made from the same file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

GROUP = 32
# Byte offset of the packed nibbles inside one block of each 4-bit type with group-32 affine codes.
_NIBBLES_AT = {"Q4_0": 2, "Q4_1": 4, "Q4_K": 16}


class QuantFormatError(ValueError):
    """A GGUF whose tensors do not match the model they should describe."""


def int4_groups(raw: np.ndarray, type_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 (N, K) in 0..15, scale fp32 (N, K/32), base fp32 (N, K/32)) of one GGUF tensor,
    stored as `raw` (N, bytes per row), such that weight = scale * code + base exactly as gguf-py
    de-quantises it."""
    qt = GGMLQuantizationType[type_name]
    _, type_size = GGML_QUANT_SIZES[qt]
    blocks = raw.reshape(raw.shape[0], -1, type_size)
    probe = blocks.copy()
    probe[..., _NIBBLES_AT[type_name]:] = 0x00
    w0 = dequantize(probe.reshape(raw.shape), qt)
    probe[..., _NIBBLES_AT[type_name]:] = 0x11
    w1 = dequantize(probe.reshape(raw.shape), qt)
    w = dequantize(raw, qt)
    n, k = w.shape
    step = (w1 - w0).reshape(n, k // GROUP, GROUP)
    scale, base = step[..., 0], w0.reshape(n, k // GROUP, GROUP)[..., 0]
    if not (np.array_equal(step, np.broadcast_to(scale[..., None], step.shape))
            and np.array_equal(w0.reshape(step.shape), np.broadcast_to(base[..., None], step.shape))):
        raise QuantFormatError(f"{type_name}: scales are not constant over groups of {GROUP}")
    s = np.repeat(scale, GROUP, axis=1)
    b = np.repeat(base, GROUP, axis=1)
    q = np.where(s != 0, np.rint((w - b) / np.where(s != 0, s, 1)), 0)
    if q.min() < 0 or q.max() > 15 or not np.allclose(q * s + b, w, rtol=1e-6, atol=1e-7):
        raise QuantFormatError(f"{type_name}: codes do not reproduce the de-quantised weights")
    return torch.from_numpy(q.astype(np.uint8)), torch.from_numpy(scale.copy()), torch.from_numpy(base.copy())


class Int4Linear(nn.Module):
    """A Linear on torch's int4 CPU kernel: 4-bit codes in groups of 32 along the input, bf16 activations.

    Inference only (no Parameters). `dequantized()` is the weight the kernel multiplies by."""

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.packed, self.scales_zeros = packed, scales_zeros
        self.out_features, self.in_features = scales_zeros.shape[1], scales_zeros.shape[0] * GROUP
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16)
        self.weight_bytes = self.packed.nbytes + self.scales_zeros.nbytes

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, bias: torch.Tensor | None):
        """From codes (N, K) in 0..15 and fp32 scale/base (N, K/32): weight = scale * code + base."""
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2)
        # (K/32, N, 2): the kernel's scale and zero per group, as `(q - 8) * S + Z`.
        sz = torch.stack([scale, base + 8 * scale], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()
        return cls(packed, sz, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, GROUP, self.scales_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The (N, K) fp32 weight this layer applies (from the packed codes, via the kernel itself)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        sz = self.scales_zeros
        # One-hot rows pick weight columns; bf16 output rounding would lose bits, so do it per group in fp32.
        s, z = sz[..., 0].float().T, sz[..., 1].float().T  # (N, K/32)
        unit = torch.ops.aten._weight_int4pack_mm_for_cpu(
            eye, self.packed, GROUP, torch.stack([torch.ones_like(sz[..., 0]), torch.zeros_like(sz[..., 1])], -1))
        centred = unit.float().T  # (N, K): code - 8 (small integers, exact in bf16)
        return centred * s.repeat_interleave(GROUP, 1) + z.repeat_interleave(GROUP, 1)


def source_gguf(ckpt: Path) -> Path | None:
    """The GGUF file a converted checkpoint directory was made from (None for a plain HF checkpoint)."""
    f = ckpt / "paratree_source.json"
    if not f.is_file():
        return None
    p = Path(json.loads(f.read_text())["gguf"])
    return p if p.is_file() else None


def _rope_rows(n: int, heads: int) -> torch.Tensor:
    """The row order transformers restores for llama's GGUF Q/K (llama.cpp interleaves rotary halves)."""
    return torch.arange(n).view(heads, n // heads // 2, 2).transpose(1, 2).reshape(-1)


def _gguf_parts(cfg) -> dict[str, list[tuple[str, str, int]]]:
    """Own linear name -> [(GGUF tensor, HF name, rope heads or 0)] fused in row order."""
    out = {}
    for i in range(cfg.num_layers):
        b, p = f"blk.{i}.", f"model.layers.{i}."
        out[f"layers.{i}.attn.wqkv"] = [(b + "attn_q.weight", p + "self_attn.q_proj.weight", cfg.num_heads),
                                        (b + "attn_k.weight", p + "self_attn.k_proj.weight", cfg.num_kv_heads),
                                        (b + "attn_v.weight", p + "self_attn.v_proj.weight", 0)]
        out[f"layers.{i}.attn.wo"] = [(b + "attn_output.weight", p + "self_attn.o_proj.weight", 0)]
        out[f"layers.{i}.mlp.w13"] = [(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", 0),
                                      (b + "ffn_up.weight", p + "mlp.up_proj.weight", 0)]
        out[f"layers.{i}.mlp.w2"] = [(b + "ffn_down.weight", p + "mlp.down_proj.weight", 0)]
    return out


def load_int4_linears(model: nn.Module, gguf: Path, reference: dict[str, torch.Tensor],
                      cache: Path | None = None) -> dict[str, int]:
    """Swap every decoder linear whose GGUF tensors are group-32 4-bit for an Int4Linear.

    `reference`: the dense fp32 state dict (HF names) the model was loaded from. Each part's codes
    must reproduce it exactly, in GGUF row order or llama's rotary order; anything else is a
    QuantFormatError, never a silently wrong model. `cache`: a safetensors file of the packed
    layers, written after the first checked load and read instead of the GGUF next time (the
    packed layout depends on the CPU's SIMD level, so the caller keys the file by it).
    Returns counts {"int4": n, "dense": m}."""
    if cache is not None and cache.is_file():
        return _load_packed(model, cache)

    tensors = {t.name: t for t in GGUFReader(gguf).tensors}
    counts = {"int4": 0, "dense": 0}
    for own, parts in _gguf_parts(model.cfg).items():
        found = [tensors.get(g) for g, _, _ in parts]
        if any(t is None or t.tensor_type.name not in _NIBBLES_AT for t in found):
            counts["dense"] += 1
            continue
        codes, scales, bases = [], [], []
        for t, (g, hf, heads) in zip(found, parts):
            q, s, b = int4_groups(np.asarray(t.data), t.tensor_type.name)
            ref = reference[hf].float()
            if q.shape != ref.shape:
                raise QuantFormatError(f"{g}: shape {tuple(q.shape)} in the GGUF, {tuple(ref.shape)} in the model")
            rows = torch.arange(q.shape[0])
            w, tol = _affine(q, s, b), 1e-6 * float(ref.abs().max())
            if not _close(w, ref, tol):
                rows = _rope_rows(q.shape[0], heads) if heads else rows
                if not _close(w[rows], ref, tol):
                    raise QuantFormatError(f"{g}: the 4-bit codes do not reproduce the model's weights")
            codes.append(q[rows]), scales.append(s[rows]), bases.append(b[rows])
        parent_name, _, attr = own.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, attr)
        setattr(parent, attr, Int4Linear.from_codes(torch.cat(codes), torch.cat(scales), torch.cat(bases), old.bias))
        counts["int4"] += 1
    if cache is not None:
        _save_packed(model, cache, counts)
    return counts


def _save_packed(model: nn.Module, path: Path, counts: dict[str, int]) -> None:
    out = {}
    for name, m in model.layers.named_modules():
        if isinstance(m, Int4Linear):
            out[f"{name}.packed"], out[f"{name}.scales_zeros"] = m.packed, m.scales_zeros
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(out, str(tmp), metadata={k: str(v) for k, v in counts.items()})
    tmp.replace(path)  # atomic: a concurrent or killed load never sees half a file


def _load_packed(model: nn.Module, path: Path) -> dict[str, int]:
    with safe_open(str(path), "pt") as f:
        counts = {k: int(v) for k, v in f.metadata().items()}
        names = {k.rpartition(".")[0] for k in f.keys()}
        for name in names:
            parent_name, _, attr = name.rpartition(".")
            parent = model.layers.get_submodule(parent_name)
            old = getattr(parent, attr)
            setattr(parent, attr, Int4Linear(f.get_tensor(f"{name}.packed"), f.get_tensor(f"{name}.scales_zeros"),
                                             old.bias))
    return counts


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    # gguf-py's own arithmetic order differs per type (Q4_K: d*sc*q - dmin*m), so allow an fp32 ulp;
    # a wrong row order or format is off by whole quantisation steps.
    return bool((a - b).abs().max() <= tol)


def _affine(q: torch.Tensor, s: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """scale * code + base per group, in fp32 like gguf-py."""
    return q.float() * s.repeat_interleave(GROUP, 1) + b.repeat_interleave(GROUP, 1)



def streamed_weight_bytes(model: nn.Module) -> int:
    """Weight bytes one decode step reads: every decoder linear as stored (4-bit codes and their bf16
    scales, or dense), the norms and the LM head (the embedding lookup reads one row: not counted).

    Plain decoding's bandwidth floor is this over the memory bandwidth."""
    head = getattr(model, "lm_head_packed", None) or model.lm_head
    total = 0
    for m in [*model.layers.modules(), model.norm, head]:
        if hasattr(m, "weight_bytes"):  # Int4Linear, PackedLinear: what their kernels read
            total += m.weight_bytes + (0 if m.bias is None else m.bias.nbytes)
        else:
            total += sum(p.nbytes for p in m.parameters(recurse=False))
    return total
