"""Issue 24: every bad input to every `paratree` command is ONE line on stderr, exit code 2, no traceback.

Most cases run `paratree.cli.main` in this process (an argparse refusal is its SystemExit code, what a
real process exits with); two run the real `python -m paratree` to show the same from outside.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from paratree.cli import EXIT_USER_ERROR, main

ROOT = Path(__file__).resolve().parent.parent


def _cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's refusals end the process with this code
        rc = e.code
    return rc, capsys.readouterr().err


def _one_line(rc, err) -> str:
    assert rc == EXIT_USER_ERROR, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("paratree: error:"), err
    return lines[0]


def refused(argv, capsys) -> str:
    return _one_line(*_cli(argv, capsys))


def run(*args, timeout=120):
    p = subprocess.run([sys.executable, "-m", "paratree", *args], capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT)
    return p.returncode, p.stderr


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: these refusals must come before it."""
    import paratree.models.loader as loader

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    # Every load goes through loader.checkpoint_dir, however load_model was imported. (Patching
    # load_model itself would leak: a module first imported during the test, e.g. engine.pipeline,
    # would keep the patched function for the rest of the session.)
    monkeypatch.setattr(loader, "checkpoint_dir", boom)


# -- 1. --max-model-len -------------------------------------------------------------------------------------------
MODEL_LEN_COMMANDS = {"generate": ["generate", "hi"], "bench-plain": ["bench-plain"], "serve": ["serve"],
                      "bench-serve": ["bench-serve"]}


@pytest.mark.parametrize("cmd", list(MODEL_LEN_COMMANDS))
@pytest.mark.parametrize("value", ["0", "-3"])
def test_max_model_len_must_be_positive(cmd, value, capsys, no_model_load):
    line = refused([*MODEL_LEN_COMMANDS[cmd], "--max-model-len", value], capsys)
    assert "--max-model-len must be >= 1" in line and value in line


@pytest.mark.parametrize("cmd", list(MODEL_LEN_COMMANDS))
def test_max_model_len_must_be_a_number(cmd, capsys, no_model_load):
    line = refused([*MODEL_LEN_COMMANDS[cmd], "--max-model-len", "abc"], capsys)
    assert "--max-model-len" in line and "invalid int value: 'abc'" in line and f"paratree {cmd} --help" in line


def test_argparse_refusal_is_one_line_from_a_real_process():
    rc, err = run("generate", "hi", "--max-model-len", "abc")
    line = _one_line(rc, err)
    assert "--max-model-len" in line and "'abc'" in line and "usage:" not in err


def test_other_argparse_refusals_are_one_line(capsys):
    assert "invalid choice: 'nope'" in refused(["generate", "hi", "--drafter", "nope"], capsys)
    assert "unrecognized arguments: --bogus" in refused(["models", "--bogus"], capsys)
    assert "required" in refused([], capsys)


# -- 2. --threads ---------------------------------------------------------------------------------------------------
THREAD_COMMANDS = {"bench": ["bench", "--quick"], "calibrate": ["calibrate"], "serve": ["serve"],
                   "bench-serve": ["bench-serve"]}


@pytest.mark.parametrize("cmd", list(THREAD_COMMANDS))
@pytest.mark.parametrize("value", ["0", "-2"])
def test_threads_must_be_positive(cmd, value, capsys, no_model_load):
    line = refused([*THREAD_COMMANDS[cmd], "--threads", value], capsys)
    assert "--threads must be >= 1" in line and value in line


def test_threads_must_be_a_number(capsys):
    assert "--threads" in refused(["calibrate", "--threads", "two"], capsys)


# -- 3. train --config ----------------------------------------------------------------------------------------------
BAD_CONFIGS = {
    "missing": (None, "not found"),
    "list": ("- family: jetspec\n- lr: 0.001\n", "must be a mapping"),
    "scalar": ("just some words\n", "must be a mapping"),
    "syntax": ("family: jetspec\n  lr: [1, 2\n", "not valid YAML"),
    "unknown key": ("family: jetspec\nlearning_rate: 0.001\n", "unknown key 'learning_rate'"),
    "typo": ("famly: dflash\n", "did you mean 'family'"),
    "text for a number": ("lr: fast\n", "lr: expected a number, got 'fast'"),
    "yaml 1e-3": ("lr: 1e-3\n", "write 1.0e-3"),
    "float for an int": ("num_layers: 2.5\n", "num_layers: expected an integer, got 2.5"),
    "text for a bool": ("autocast_bf16: maybe\n", "autocast_bf16: expected true or false"),
    "null for a string": ("output_dir: null\n", "output_dir: must not be null"),
    "unknown family": ("family: medusa\n", "unknown head family 'medusa'"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_train_config_is_one_line(case, tmp_path, capsys, no_model_load):
    text, expect = BAD_CONFIGS[case]
    path = tmp_path / "cfg.yaml"
    if text is not None:
        path.write_text(text)
    line = refused(["train", "--config", str(path), "--output-dir", str(tmp_path / "out")], capsys)
    assert expect in line and (case == "unknown family" or str(path) in line)


def test_bad_json_train_config_is_one_line(tmp_path, capsys, no_model_load):
    path = tmp_path / "cfg.json"
    path.write_text('{"family": "jetspec", "lr": }')
    line = refused(["train", "--config", str(path)], capsys)
    assert "not valid JSON" in line and str(path) in line


def test_shipped_and_complete_train_configs_pass_the_check(tmp_path):
    from dataclasses import asdict

    from paratree.train.config_check import check_train_config
    from paratree.train.trainer import TrainConfig

    shipped = sorted((ROOT / "configs").rglob("*.yaml"))
    assert shipped
    for f in shipped:
        check_train_config(f)
    full = tmp_path / "full.json"  # every field, defaults included (None where optional)
    full.write_text(json.dumps(asdict(TrainConfig())))
    assert check_train_config(full)["family"] == "jetspec"
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert check_train_config(empty) == {}


# -- 4. card --bench-json -------------------------------------------------------------------------------------------
def _card(head, bench):
    return ["card", "--head", str(head), "--train-command", "t", "--data-command", "d", "--bench-json", str(bench)]


def test_card_with_missing_bench_json_is_one_line(tmp_path, capsys):
    line = refused(_card(tmp_path, tmp_path / "nope.json"), capsys)
    assert "--bench-json" in line and "nope.json" in line and "No such file" in line


def test_card_with_bad_bench_json_or_head_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bench.json"
    bad.write_text("{not json")
    assert "not valid JSON" in refused(_card(tmp_path, bad), capsys)
    bad.write_text(json.dumps({"command": "x"}))
    assert "no bench rows" in refused(_card(tmp_path, bad), capsys)
    bad.write_text(json.dumps([{"method": "plain"}]))
    line = refused(_card(tmp_path / "nohead", bad), capsys)
    assert "train_summary.json" in line and "nohead" in line


# -- 5. config.json lacking keys ------------------------------------------------------------------------------------
def _model_dir(tmp_path, drop=(), weights=b"", **changes) -> Path:
    from hf_oracle import TINY

    d = tmp_path / "model"
    d.mkdir()
    cfg = {k: v for k, v in dict(TINY["llama"], **changes).items() if k not in drop}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").write_bytes(weights)
    return d


@pytest.mark.parametrize("cmd", [["generate", "hi"], ["bench-plain"]])
def test_config_json_missing_a_key_is_one_line(cmd, tmp_path, capsys):
    d = _model_dir(tmp_path, drop=("hidden_size",))
    line = refused([*cmd, "--model", str(d), "--dtype", "fp32"], capsys)
    assert "'hidden_size'" in line and "config.json" in line and "lacks" in line


def test_config_json_bad_values_or_syntax_is_one_line(tmp_path, capsys):
    d = _model_dir(tmp_path, num_hidden_layers="three")
    assert "num_hidden_layers='three'" in refused(["generate", "hi", "--model", str(d), "--dtype", "fp32"], capsys)
    (d / "config.json").write_text("{")
    line = refused(["generate", "hi", "--model", str(d), "--dtype", "fp32"], capsys)
    assert "config.json is not valid JSON" in line


# -- 6. corrupt safetensors -----------------------------------------------------------------------------------------
def test_corrupt_model_weights_are_one_line(tmp_path, capsys):
    d = _model_dir(tmp_path, weights=b"\x00garbage, not a safetensors file" * 8)
    line = refused(["generate", "hi", "--model", str(d), "--dtype", "fp32"], capsys)
    assert str(d / "model.safetensors") in line and "corrupt" in line


def _head_dir(tmp_path, tcfg, name="head", **kw) -> Path:
    from paratree.drafters.heads.block import BlockDraftHead, BlockHeadConfig

    head = BlockDraftHead(BlockHeadConfig.for_target(tcfg, num_taps=2, num_layers=1, block_size=4, **kw))
    head.save(tmp_path / name, dtype=torch.float32)
    return tmp_path / name


def _generate_with_head(tiny, head):
    return ["generate", "hi", "--model", tiny, "--dtype", "fp32", "--head", str(head), "--max-new-tokens", "2",
            "--json"]


def test_corrupt_head_weights_are_one_line(tiny, tmp_path, capsys):
    from paratree.models.loader import read_config

    head = _head_dir(tmp_path, read_config(Path(tiny)))
    (head / "head.safetensors").write_bytes(b"\xff" * 64)
    line = refused(_generate_with_head(tiny, head), capsys)
    assert str(head / "head.safetensors") in line and "corrupt" in line


def test_head_config_that_is_not_one_is_one_line(tiny, tmp_path, capsys):
    from paratree.models.loader import read_config

    head = _head_dir(tmp_path, read_config(Path(tiny)))
    cfg = json.loads((head / "head_config.json").read_text())
    del cfg["tap_layers"]
    (head / "head_config.json").write_text(json.dumps(cfg))
    line = refused(_generate_with_head(tiny, head), capsys)
    assert "head_config.json" in line and "tap_layers" in line


# -- 7. a head trained for another target ---------------------------------------------------------------------------
def test_head_for_another_target_is_one_line(tiny, tmp_path, capsys):
    from dataclasses import replace

    from paratree.models.loader import read_config

    tcfg = read_config(Path(tiny))
    other = replace(tcfg, hidden_size=32, head_dim=8)
    head = _head_dir(tmp_path, other, target_name="some-other-model")
    line = refused(_generate_with_head(tiny, head), capsys)
    assert "some-other-model" in line and f"hidden size 32 != target's {tcfg.hidden_size}" in line


# -- 8. --max-new-tokens < 1, before any model load ------------------------------------------------------------------
# (0 too: the generator refuses it anyway, but only once the model has loaded)
@pytest.mark.parametrize("cmd", [["generate", "hi"], ["bench-plain"], ["bench", "--quick"],
                                 ["data", "--out", "x.jsonl"]])
@pytest.mark.parametrize("value", ["-1", "0"])
def test_non_positive_max_new_tokens_is_refused_before_loading(cmd, value, capsys, no_model_load):
    t0 = time.perf_counter()
    line = refused([*cmd, "--max-new-tokens", value], capsys)
    assert f"--max-new-tokens must be >= 1, got {value}" in line
    assert time.perf_counter() - t0 < 5


def test_negative_max_new_tokens_from_a_real_process():
    rc, err = run("generate", "hi", "--max-new-tokens", "-5", "--model", "/no/such/model")
    assert "--max-new-tokens must be >= 1, got -5" in _one_line(rc, err)  # not the model's error: nothing was loaded
