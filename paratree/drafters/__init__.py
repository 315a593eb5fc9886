"""Drafters behind one protocol; `make_drafter` builds one by its registered name (`registry.py`)."""

from __future__ import annotations

from pathlib import Path

from . import families  # noqa: F401  (registers every family module)
from .base import Drafter, NoDrafter
from .ngram import NGramDrafter
from .registry import (BuildContext, DrafterSpec, HeadFamily, drafter_names, drafter_spec, family_names,
                       head_family_of, read_head_config, register_drafter, register_family, shipped_head)
from ..tree.cost import VerifyCostModel

# The drafter measured fastest per packaged model, where that is not its plain JetSpec head. SmolLM2-135M
# (docs/benchmarks.md, session 11): jetspec+ngram@auto is the fastest method on GSM8K, HumanEval and MT-Bench.
MEASURED_DEFAULT = {"smollm2-135m": "jetspec+ngram"}


def drafters() -> tuple[str, ...]:
    """Every registered drafter name (a toy family registered at run time included)."""
    return drafter_names()


def default_drafter(model_name: str) -> str:
    """The best drafter this model has, by measurement: the recorded one, else its shipped JetSpec
    head, else prompt lookup (training-free)."""
    if model_name in MEASURED_DEFAULT:
        return MEASURED_DEFAULT[model_name]
    return "jetspec" if shipped_head(model_name, "jetspec") else "ngram"


def head_family(name: str) -> str | None:
    """The head family drafter `name` runs on (a merged drafter: its base's), or None for training-free ones."""
    return drafter_spec(name).family


def drafter_for_head(path: str | Path) -> str:
    """The tree drafter for a trained head directory, by the family it was trained as."""
    return head_family_of(read_head_config(path).family).drafter


def make_drafter(name: str, lm=None, head_path: str | None = None, width: int = 8,
                 cost: VerifyCostModel | None = None, **options) -> Drafter:
    """Build the drafter called `name` for the loaded target `lm`; `cost` is the engine's verify
    cost curve for drafters that size their own drafts (None: not calibrated on this machine)."""
    spec = drafter_spec(name)
    return spec.build(BuildContext(lm, Path(head_path) if head_path else None, width, cost, dict(options)))


__all__ = ["Drafter", "NoDrafter", "NGramDrafter", "DrafterSpec", "HeadFamily", "make_drafter", "default_drafter",
           "drafter_for_head", "head_family", "drafters", "family_names", "register_drafter",
           "register_family"]
