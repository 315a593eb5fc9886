import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    """One random tiny checkpoint per supported family."""
    from hf_oracle import TINY, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_checkpoint(arch, root / arch) for arch in TINY}


@pytest.fixture(scope="session")
def default_ckpt():
    """The real default model's converted checkpoint (converted once per cache)."""
    from paratree.models.loader import checkpoint_dir

    return checkpoint_dir(None)[1]


def _make_tiny(out: Path) -> Path:
    """A random tiny Llama with a real BPE tokenizer (trained on the vendored prompts) and a ChatML
    template, so the whole text path (datasets, chat template, EOS) runs as on a real model."""
    from hf_oracle import TINY, make_tiny_checkpoint
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from paratree import data as datasets

    vocab = 512
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 like SmolLM2
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(datasets.load_prompts("gsm8k", 200) + datasets.load_prompts("mt_bench"), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    TINY["bench"] = dict(TINY["llama"], vocab_size=vocab, max_position_embeddings=2048, bos_token_id=1,
                         eos_token_id=2, pad_token_id=2)
    try:
        make_tiny_checkpoint("bench", out)
    finally:
        del TINY["bench"]
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Path of the tiny model with a tokenizer and chat template."""
    return str(_make_tiny(tmp_path_factory.mktemp("tinybench") / "tiny"))
