"""Fixtures shared by the test files: a tiny random SD-topology model with a tokenizer trained on the demo world."""
from dataclasses import replace

import pytest
import torch

from sau.world import shapes
from sau.models.config import tiny
from sau.models.pipeline import StableDiffusion
from sau.models.tokenizer import Tokenizer


def make_tiny_sd(seed=0):
    _, captions, _ = shapes.batch(300, seed=0)
    tokenizer = Tokenizer.train(captions + [" ".join(shapes.TRIGGERS)] * 3, vocab_size=600, max_length=16)
    cfg = tiny()
    cfg = replace(cfg, text=replace(cfg.text, vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id,
                                    eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id))
    torch.manual_seed(seed)
    return StableDiffusion(cfg, tokenizer).eval()


@pytest.fixture(scope="module")
def tiny_sd():
    return make_tiny_sd()
