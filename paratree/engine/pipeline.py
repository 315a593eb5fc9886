"""Model + tokenizer + drafter + generator in one object: what the CLI, bench and server drive."""

from __future__ import annotations

from collections.abc import Callable

from ..drafters import make_drafter
from ..models.loader import LoadedModel, load_model
from ..models.runner import TargetRunner
from ..verify.stopping import StopStrings
from ..verify.warp import SamplingParams
from .costs import CostService
from .generate import GenerationResult, Generator
from .rounds import stop_cut


def encode_prompt(tokenizer, prompt: str | list[dict], chat: bool = True) -> list[int]:
    """Token ids for a prompt, through the model's chat template unless `chat` is False."""
    if isinstance(prompt, list):
        messages = prompt
    elif chat:
        messages = [{"role": "user", "content": prompt}]
    else:
        return tokenizer.encode(prompt, add_special_tokens=True)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template: use --no-chat")
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


class Pipeline:
    """`budget`: the tree budget, or "auto" (each tree sized against this machine's measured verify
    cost; a short calibration runs first when there is no profile, announced by `on_calibrate`)."""

    def __init__(self, lm: LoadedModel, drafter: str = "ngram", budget: int | str = 32, max_len: int | None = None,
                 method: str = "auto", on_calibrate: Callable[[], None] | None = None, **drafter_options):
        self.lm = lm
        self.drafter_name = drafter
        self.costs = CostService(lm, on_calibrate=on_calibrate)
        self.runner = TargetRunner(lm.model, max_len=max_len or min(lm.config.max_position, 8192))
        self.drafter = make_drafter(drafter, lm, cost=self.costs.verify_curve(), **drafter_options)
        sizer = None
        if budget == "auto" and drafter != "plain":
            sizer = self.costs.auto_sizer(drafter)
            budget = sizer.max_nodes
        elif budget == "auto":
            budget = 1
        self.generator = Generator(self.runner, self.drafter, eos_ids=lm.eos_ids, budget=int(budget), method=method,
                                   sizer=sizer)

    @classmethod
    def load(cls, model: str | None = None, dtype: str = "auto", compile: bool = False, exact: bool | None = None,
             **kw) -> "Pipeline":
        return cls(load_model(model, dtype, compile=compile, exact=exact), **kw)

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    def encode(self, prompt, chat: bool = True) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, chat)

    def generate(self, prompt, max_new_tokens: int = 256, params: SamplingParams | None = None, chat: bool = True,
                 stop: list[str] | None = None, on_tokens=None) -> tuple[str, GenerationResult]:
        ids = prompt if isinstance(prompt, list) and (not prompt or isinstance(prompt[0], int)) else self.encode(prompt, chat)
        stopper = StopStrings(stop) if stop else None
        decode = self.decode
        stop_check = None if stopper is None else (lambda new_ids: stop_cut(stopper, decode, new_ids))
        res = self.generator.generate(ids, max_new_tokens, params, on_tokens=on_tokens,
                                      stop_check=stop_check)
        text = decode(res.token_ids)
        if stopper is not None and (at := stopper.find(text)) is not None:
            text = text[:at]
        return text, res

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
