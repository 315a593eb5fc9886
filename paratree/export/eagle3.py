"""EAGLE-3 checkpoint format (SpecForge `LlamaForCausalLMEagle3`; vLLM, SGLang, llama.cpp
`--spec-type draft-eagle3`). Layout and forward: docs/export_formats_notes.md §1; the layout mapping
is `drafters/heads/eagle3_format.py`. Only an `eagle3`-family head (`heads/eagle3.py`,
configs/eagle3_smollm2.yaml) is that function: paratree's own EAGLE head projects [emb; state] with a
learned matrix, normalises q/k and feeds the normed state back, which the format cannot express.
"""

from __future__ import annotations

from pathlib import Path

from ..drafters.heads.eagle3_format import to_eagle3
from .common import load_for_export, write_checkpoint


def refusals(cfg) -> list[str]:
    if cfg.family == "eagle3":
        return []
    if cfg.family == "eagle":
        return ["it is paratree's own EAGLE head (a learned [emb; state] projection, q/k norms, the normed state fed "
                "back); train the engines' EAGLE-3 with configs/eagle3_smollm2.yaml"]
    return [f"it is a {cfg.family} head (the format holds an autoregressive EAGLE-3 head)"]


def export_eagle3(head_dir, out_dir, lm=None, mask_token_id: int | None = None) -> Path:
    """Write the EAGLE-3 head at `head_dir` (trained for `lm`) into `out_dir`."""
    head, lm, cfg = load_for_export(head_dir, "EAGLE-3", refusals, lm)
    if mask_token_id is not None:
        raise ValueError("--mask-token-id: an EAGLE-3 head drafts autoregressively and has no mask token")
    tensors, config = to_eagle3(head, lm.config.max_position)
    return write_checkpoint(out_dir, tensors, config, head_dir, "eagle3", (
        f"Aux hidden-state layers (inputs of) {config['eagle_aux_hidden_state_layer_ids']}, draft vocab "
        f"{config['draft_vocab_size']} (`d2t` offsets), {cfg.block_size} training-time-test steps."))
