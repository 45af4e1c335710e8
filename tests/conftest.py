"""Fixtures shared by the test files: a tiny random SD-topology model with a tokenizer trained on the demo world."""
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sau.world import shapes
from sau.models.config import tiny
from sau.models.pipeline import StableDiffusion
from sau.models.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent


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


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """A tiny random model saved as a bundle, for the command-line tests."""
    from sau.weights.write import save_model
    path = tmp_path_factory.mktemp("bundle") / "tiny"
    save_model(make_tiny_sd(seed=4), path)
    return path


def unlearn(*args, cwd):
    """unlearn.py as the shell runs it, on one thread: the CompletedProcess."""
    return subprocess.run([sys.executable, str(ROOT / "unlearn.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
