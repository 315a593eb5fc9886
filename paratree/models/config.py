"""Architecture description shared by the runner, the loaders and the draft heads.

Only the decoder families paratree implements are accepted; anything else fails
here, at load time, with one clear message instead of deep inside a forward.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")


class UnsupportedModelError(ValueError):
    """The checkpoint exists but is not of a family paratree can run."""


class CheckpointError(ValueError):
    """A checkpoint's files are there but unusable: config.json lacks keys, weights are corrupt."""


# config.json keys every supported family needs (the rest have defaults)
REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    tie_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k
    max_position: int = 4096

    @classmethod
    def from_hf(cls, cfg: Any) -> "ModelConfig":
        """Build from a transformers config object or its dict."""
        d = cfg if isinstance(cfg, dict) else cfg.to_dict()
        arch = d.get("model_type", "?")
        if arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"unsupported architecture '{arch}': paratree runs {', '.join(SUPPORTED_ARCHS)} decoders"
            )
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
        if rope_type not in ("default", None):
            raise UnsupportedModelError(f"unsupported rope type '{rope_type}': paratree implements default RoPE")
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        missing = [k for k in REQUIRED_KEYS if d.get(k) is None]
        if missing:
            raise CheckpointError(f"config lacks {', '.join(repr(k) for k in missing)}, needed by a {arch} model")
        bad = [f"{k}={d[k]!r}" for k in (*REQUIRED_KEYS, "num_key_value_heads", "head_dim")
               if d.get(k) is not None and (not isinstance(d[k], int) or isinstance(d[k], bool) or d[k] < 1)]
        if bad:
            raise CheckpointError(f"config has non-positive or non-integer {', '.join(bad)}")
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        if arch == "qwen2":
            bias = True
        else:
            bias = bool(d.get("attention_bias", False))
        return cls(
            arch=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            intermediate_size=d["intermediate_size"],
            rope_theta=float(theta),
            rms_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bias,
            qk_norm=arch == "qwen3",
            max_position=int(d.get("max_position_embeddings", 4096)),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        qkv = h * self.head_dim * (self.num_heads + 2 * self.num_kv_heads)
        layer = qkv + self.num_heads * self.head_dim * h + 3 * h * i + 2 * h
        return self.num_layers * layer + v * h * (1 if self.tie_embeddings else 2) + h
