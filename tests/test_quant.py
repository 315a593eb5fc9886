"""`--dtype gguf`: the GGUF's own 4-bit codes on torch's int4 CPU kernel (models/quant.py)."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from paratree.models.quant import GROUP, Int4Linear, QuantFormatError, int4_groups


def _raw(type_name: str, n: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if type_name == "Q4_K":  # gguf-py cannot quantise Q4_K: random codes and 6-bit scales, finite fp16 d/dmin
        raw = rng.integers(0, 256, size=(n, k // 256, 144), dtype=np.uint8)
        raw[..., 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        raw[..., 2:4] = np.frombuffer(np.float16(0.003).tobytes(), np.uint8)
        return raw.reshape(n, -1)
    return quantize(rng.standard_normal((n, k)).astype(np.float32), QT[type_name])


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q4_K"])
def test_codes_scales_and_bases_reproduce_gguf_dequantisation(type_name):
    raw = _raw(type_name, 24, 512, seed=1)
    q, s, b = int4_groups(raw, type_name)
    w = dequantize(raw, QT[type_name])
    assert q.dtype == torch.uint8 and q.shape == w.shape and int(q.max()) <= 15
    assert s.shape == b.shape == (24, 512 // GROUP)
    g = torch.arange(512) // GROUP
    got = q.float() * s[:, g] + b[:, g]
    assert (got - torch.from_numpy(w)).abs().max() <= 1e-6 * float(np.abs(w).max())
    assert len(torch.unique(q)) > 8  # real codes, not a constant


def test_a_non_affine_type_is_refused():
    raw = quantize(np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32), QT.Q8_0)
    with pytest.raises(KeyError):
        int4_groups(raw, "Q8_0")


def _layer(n=192, k=576, seed=0, bias=False):
    raw = _raw("Q4_1", n, k, seed)
    q, s, b = int4_groups(raw, "Q4_1")
    return Int4Linear.from_codes(q, s, b, torch.randn(n) if bias else None), q, s, b


@pytest.mark.parametrize("bias", [False, True])
def test_int4_linear_applies_the_bf16_rounded_affine_weight(bias):
    lin, q, s, b = _layer(bias=bias)
    g = torch.arange(q.shape[1]) // GROUP
    sb, zb = s.bfloat16().float(), (b + 8 * s).bfloat16().float()
    w = (q.float() - 8) * sb[:, g] + zb[:, g]
    assert torch.equal(lin.dequantized(), w)
    x = torch.randn(7, q.shape[1]).bfloat16()
    ref = x.float() @ w.T + (0 if lin.bias is None else lin.bias.float())
    y = lin(x)
    assert y.dtype == torch.bfloat16 and y.shape == (7, q.shape[0])
    assert (y.float() - ref).abs().max() <= 0.02 * ref.abs().max()


def test_int4_linear_rows_do_not_depend_on_the_row_count():
    """What tree verify relies on: a node's row is bit-identical whether 1, 3 or 64 rows are multiplied."""
    lin, *_ = _layer(n=256, k=1536, seed=3)
    x = torch.randn(64, 1536).bfloat16()
    full = lin(x)
    for m in (1, 2, 3, 4, 5, 8, 16, 33):
        for i in (0, 7, 64 - m):
            assert torch.equal(lin(x[i:i + m]), full[i:i + m])
    assert torch.equal(lin(x.view(4, 16, 1536)), full.view(4, 16, -1))


def test_gguf_dtype_needs_a_gguf_model(tiny_ckpts):
    from paratree.models.config import UnsupportedModelError
    from paratree.models.loader import load_model

    with pytest.raises(UnsupportedModelError, match="needs a GGUF model"):
        load_model(str(tiny_ckpts["llama"]), "gguf", tokenizer=False)


def test_default_model_runs_its_own_q4_codes(default_ckpt):
    """Every decoder linear of SmolLM2's Q4_1 file runs as 4-bit codes, laid out like the dense model
    (q/k rows in llama's rotary order), and greedy decoding agrees with the fp32 de-quantised model."""
    from paratree.models.loader import load_model
    from paratree.models.runner import TargetRunner
    from paratree.models.transformer import linear_kernels
    from test_runner import _own_greedy

    lm = load_model(None, "gguf", tokenizer=False)
    dense = load_model(None, "fp32", tokenizer=False, pack=False)
    assert lm.model.weight_counts == {"int4": lm.config.num_layers * 4, "dense": 0}
    assert linear_kernels(lm.model) == ("int4", ())
    for name in ("attn.wqkv", "attn.wo", "mlp.w13", "mlp.w2"):
        got = lm.model.layers[3].get_submodule(name).dequantized()
        want = dense.model.layers[3].get_submodule(name).weight
        # bf16 scales: each weight within a few bf16 ulps of its group's scale.
        assert (got - want).abs().max() <= 0.02 * want.abs().max(), name
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2]
    a = _own_greedy(TargetRunner(lm.model, max_len=128), prompt, 24)
    b = _own_greedy(TargetRunner(dense.model, max_len=128), prompt, 24)
    assert a == b
    # the bench's HF peers: 4-bit codes have no weight to view, so the twin is the checkpoint itself
    from paratree.models.loader import hf_twin
    from paratree.models.transformer import hf_state_dict

    assert hf_state_dict(lm.model) is None
    assert type(hf_twin(lm)).__name__ == "LlamaForCausalLM"


def test_codes_that_do_not_reproduce_the_model_are_refused(default_ckpt):
    """A GGUF that is not the file the dense weights came from fails loudly, naming the tensor."""
    from paratree.models.loader import load_model, load_weights
    from paratree.models.quant import load_int4_linears, source_gguf

    lm = load_model(None, "bf16", tokenizer=False, pack=False)
    sd = load_weights(default_ckpt)
    sd["model.layers.0.self_attn.k_proj.weight"] = sd["model.layers.0.self_attn.k_proj.weight"] * 1.01
    with pytest.raises(QuantFormatError, match="blk.0.attn_k.weight"):
        load_int4_linears(lm.model, source_gguf(default_ckpt), sd)


def test_auto_runs_a_gguf_model_on_its_own_codes_where_bf16_is_native(tiny_ckpts, monkeypatch):
    from paratree.models import loader

    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: True)
    assert loader.dtype_name("auto", None) == "gguf"  # the default model ships as a Q4_1 GGUF
    assert loader.dtype_name("auto", str(tiny_ckpts["llama"])) == "bf16"  # a dense checkpoint
    assert loader.dtype_name("auto") == "bf16"  # no model named (e.g. the trainer's head dtype)
    assert loader.dtype_name("auto", "no-such-model") == "bf16"  # the load reports the bad name itself
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: False)
    assert loader.dtype_name("auto", None) == "fp32"


def test_packed_layers_are_cached_and_reloaded_identically(default_ckpt, tmp_path):
    """The first gguf load checks the codes against the dense model and writes the packed layers;
    the next reads them instead of the GGUF and gets the very same tensors."""
    from paratree.models.loader import load_model, load_weights
    from paratree.models.quant import load_int4_linears, source_gguf

    cache = tmp_path / "int4.safetensors"
    a, b = (load_model(None, "bf16", tokenizer=False) for _ in range(2))
    sd = load_weights(default_ckpt)
    counts = load_int4_linears(a.model, source_gguf(default_ckpt), sd, cache)
    assert cache.is_file()
    assert load_int4_linears(b.model, source_gguf(default_ckpt), {}, cache) == counts  # no reference needed now
    for la, lb in zip(a.model.layers, b.model.layers):
        for name in ("attn.wqkv", "attn.wo", "mlp.w13", "mlp.w2"):
            x, y = la.get_submodule(name), lb.get_submodule(name)
            assert isinstance(y, Int4Linear) and torch.equal(x.packed, y.packed)
            assert torch.equal(x.scales_zeros, y.scales_zeros)
