"""Untrained block heads with large random weights: they draft confidently wrong and right trees,
which is what lossless-decoding tests need (a trained head is not required to prove exactness)."""

import torch

from paratree.drafters.heads.block import BlockDraftHead, BlockHeadConfig


def random_block_head(lm, seed: int = 0, num_layers: int = 1, block_size: int = 5) -> BlockDraftHead:
    torch.manual_seed(seed)
    cfg = BlockHeadConfig.for_target(lm.config, num_taps=2, num_layers=num_layers, block_size=block_size)
    head = BlockDraftHead(cfg).double()
    for p in head.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    return head
