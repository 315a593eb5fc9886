"""Run by test_train.py under torchrun: the same 6 training steps, split over the ranks."""

import sys

import torch

from paratree.models.loader import load_model
from paratree.train.trainer import Trainer, TrainConfig

torch.set_num_threads(1)
ckpt, data, out = sys.argv[1:4]
cfg = TrainConfig(family="jetspec", num_layers=1, block_size=6, num_taps=2, lr=3e-3, warmup_steps=2, epochs=100,
                  max_steps=6, seqs_per_step=4, anchors_per_seq=8, eval_every=0, checkpoint_every=3,
                  output_dir=out, autocast_bf16=False, eval_seqs=4, data=data)
Trainer(cfg, lm=load_model(ckpt, "fp32", tokenizer=False), progress=False).fit()
