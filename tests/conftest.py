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
