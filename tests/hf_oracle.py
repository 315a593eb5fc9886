"""Hugging Face transformers as the correctness oracle, lifted to true float64.

HF computes RMSNorm and RoPE tables in float32 even for float64 models; those
fp32 islands alone cause ~1e-7 differences. The patch below makes them keep
the input precision so an fp64 HF forward is an fp64 reference.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama import modeling_llama
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3


def _rms_forward(self, x):
    var = x.pow(2).mean(-1, keepdim=True)
    return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))


def _rope_forward(self, x, position_ids):
    cfg = self.config
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freqs = position_ids[..., None].to(torch.float64) * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


@contextlib.contextmanager
def fp64_exact():
    saved = []
    for mod, prefix in ((modeling_llama, "Llama"), (modeling_qwen2, "Qwen2"), (modeling_qwen3, "Qwen3")):
        for cls_name, fn in ((f"{prefix}RMSNorm", _rms_forward), (f"{prefix}RotaryEmbedding", _rope_forward)):
            cls = getattr(mod, cls_name)
            saved.append((cls, cls.forward))
            cls.forward = fn
    try:
        yield
    finally:
        for cls, fn in saved:
            cls.forward = fn


def load_hf(path: Path | str, dtype=torch.float64):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    return model


TINY = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                  max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, vocab_size=101,
                  max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=103,
                  max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False),
}


def make_tiny_checkpoint(arch: str, out: Path, seed: int = 0) -> Path:
    """A randomly initialised HF checkpoint of the given family (weights scaled up so logits are not flat)."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(**TINY[arch])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
            elif "bias" in name:
                p.normal_(0, 0.1)
            else:
                p.uniform_(0.8, 1.2)
    model.save_pretrained(out)
    (out / "paratree_test.json").write_text(json.dumps({"arch": arch}))
    return out
