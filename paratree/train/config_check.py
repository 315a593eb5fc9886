"""Check a `paratree train --config` file before any training starts.

`load_train_config` reads and parses the file once, refuses what `TrainConfig` cannot use (a
missing file, a parse error, a document that is not a mapping, unknown keys, values of the wrong
type) with one ValueError that names the file and the problem, and then builds the config with
`TrainConfig.from_mapping`, which adds the family and loss checks.
"""

from __future__ import annotations

import difflib
import json
import typing
from pathlib import Path

import yaml

from .trainer import TrainConfig

_NONE = type(None)


def _parse(path: Path, text: str):
    if path.suffix in (".yaml", ".yml"):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ValueError(f"train config {path} is not valid YAML: {what}{where}") from None
    try:
        return json.loads(text)
    except ValueError as e:
        raise ValueError(f"train config {path} is not valid JSON ({e}); .yaml/.yml files are read as YAML") from None


def _type_problem(value, hint) -> str | None:
    """Why `value` does not fit the field type `hint` (str, int, float, bool, each maybe `| None`)."""
    args = typing.get_args(hint)
    if value is None:
        return None if _NONE in args else "must not be null"
    want = next((a for a in args if a is not _NONE), hint) if args else hint
    if want is bool:
        ok, name = isinstance(value, bool), "true or false"
    elif want is int:
        ok, name = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif want is float:
        ok, name = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif want is str:
        ok, name = isinstance(value, str), "a string"
    else:
        return None
    if ok:
        return None
    hint_txt = ""
    if want in (int, float) and isinstance(value, str):
        try:
            float(value)
            hint_txt = " (YAML reads numbers like 1e-3 as text: write 1.0e-3)"
        except ValueError:
            pass
    return f"expected {name}, got {value!r}{hint_txt}"


def check_train_config(path: str | Path) -> dict:
    """The config file's mapping, or a one-line ValueError naming the file and what is wrong with it."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"train config {path} not found" if not p.exists() else f"train config {path} is not a file")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read train config {path}: {e}") from None
    raw = _parse(p, text)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"train config {path} must be a mapping of option: value (see configs/), "
                         f"not a {type(raw).__name__}")
    hints = typing.get_type_hints(TrainConfig)
    problems = []
    for key in raw:
        if not isinstance(key, str) or key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            problems.append(f"unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    for key, value in raw.items():
        if isinstance(key, str) and key in hints and (why := _type_problem(value, hints[key])):
            problems.append(f"{key}: {why}")
    if problems:
        raise ValueError(f"train config {path}: " + "; ".join(problems))
    return raw


def load_train_config(path: str | Path, **overrides) -> TrainConfig:
    """The checked config file as a `TrainConfig`, with the non-None `overrides` applied."""
    return TrainConfig.from_mapping(check_train_config(path), **overrides)
