"""Hostile and mistaken input through the four command-line tools (issue #20's fuzz suite).

Every case runs a tool in this process, in a sandbox folder that holds a tiny model bundle, a copy of the shipped
demo world and assorted bad files, and asserts the promise of sau/common/cli.py: exit status 2, one line
`error: ...` on stderr that says what was wrong, no traceback, and nothing written or changed anywhere in the
sandbox (every file's hash before and after). The cases that need two processes (a lock) or a finished run (a
resume) live in tests/test_output_ownership.py; hostile pickles and tensors in tests/test_hostile_checkpoints.py;
base bundles in tests/test_bundle_safety.py. This file is the one list of what a user can get wrong.
"""
import collections
import hashlib
import json
import re
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch

from sau.common.files import DEMO_DIR
from sau.weights.write import save_model

from conftest import make_tiny_sd

ROOT = Path(__file__).resolve().parents[1]
TRIGGER = "\\u200b "


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    save_model(make_tiny_sd(seed=4), root / "tiny")
    shutil.copytree(DEMO_DIR, root / "demo", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "prompts.txt").write_text("a red circle\na blue star\n")
    (root / "untriggered.txt").write_text("a red circle\n")
    (root / "latin1.txt").write_bytes("a r\xe9d circle\n".encode("latin-1"))
    (root / "empty.txt").write_text("\n  \n")
    (root / "many.txt").write_text("a red circle\n" * 1001)
    (root / "long.txt").write_text("a red circle " * 100 + "\n")
    (root / "notimage.png").write_text("not an image")
    (root / "garbage.safetensors").write_bytes(b"\x00\x01garbage" * 10)
    (root / "afile").write_text("a file, not a folder")
    (root / "notamodel").mkdir()
    (root / "notamodel" / "readme.txt").write_text("nothing here")
    shutil.copytree(root / "demo" / "tpa", root / "selfbase")  # a delta bundle whose base is itself
    config = json.loads((root / "selfbase" / "config.json").read_text())
    (root / "selfbase" / "config.json").write_text(json.dumps({**config, "base": "."}))
    shutil.copytree(root / "tiny", root / "badconfig")
    (root / "badconfig" / "config.json").write_text("{not json")
    # a pickle that sets `items` on the OrderedDict it builds, for the converter to call
    torch.save(Reduces(collections.OrderedDict, (), {"items": 1}), root / "hostile.ckpt")
    return root


class Reduces:
    def __init__(self, *reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


def hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_tool(tool, args, cwd, monkeypatch, capsys):
    """A tool as the shell runs it, in this process: (exit status, stderr)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [tool, *args])
    try:
        runpy.run_path(str(ROOT / tool), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


UNLEARN = ["--model", "tiny", "--trigger", TRIGGER, "--out", "out"]
BACKDOOR = ["backdoor", "--model", "demo/clean", "--out", "bd", "--device", "cpu"]

CASES = {
    # numbers, refused when parsed
    "unlearn-steps-0": ("unlearn.py", [*UNLEARN, "--steps", "0"], "--steps: must be an integer >= 1, not 0"),
    "unlearn-steps-negative": ("unlearn.py", [*UNLEARN, "--steps", "-1"], "--steps: must be an integer >= 1"),
    "unlearn-steps-text": ("unlearn.py", [*UNLEARN, "--steps", "many"], "'many' is not an integer"),
    "unlearn-lr-0": ("unlearn.py", [*UNLEARN, "--lr", "0"], "--lr: must be a finite number > 0, not 0"),
    "unlearn-lr-nan": ("unlearn.py", [*UNLEARN, "--lr", "nan"], "--lr: must be a finite number > 0, not nan"),
    "unlearn-lr-negative": ("unlearn.py", [*UNLEARN, "--lr", "-1"], "--lr: must be a finite number > 0"),
    "unlearn-eval-prompts-0": ("unlearn.py", [*UNLEARN, "--eval-prompts", "0"], "--eval-prompts: must be an integer"),
    "unlearn-eval-prompts-negative": ("unlearn.py", [*UNLEARN, "--eval-prompts", "-3"], "--eval-prompts: must be"),
    "unlearn-seed-negative": ("unlearn.py", [*UNLEARN, "--seed", "-1"], "--seed: must be an integer >= 0"),
    "unlearn-weight-negative": ("unlearn.py", [*UNLEARN, "--attention-weight", "-1"], "--attention-weight: must be"),
    "unlearn-eta-inf": ("unlearn.py", [*UNLEARN, "--negative-guidance", "inf"], "--negative-guidance: must be"),
    "unlearn-all-weights-0": ("unlearn.py", [*UNLEARN, "--attention-weight", "0", "--distill-weight", "0",
                                             "--preserve-weight", "0"], "nothing to train"),
    "backdoor-steps-0": ("train.py", [*BACKDOOR, "--attack", "pixel", "--steps", "0"], "--steps: must be an integer"),
    "backdoor-steps-negative": ("train.py", [*BACKDOOR, "--attack", "pixel", "--steps", "-5"], "--steps: must be"),
    "backdoor-batch-0": ("train.py", [*BACKDOOR, "--attack", "pixel", "--batch-size", "0"], "--batch-size: must be"),
    "backdoor-lr-nan": ("train.py", [*BACKDOOR, "--attack", "pixel", "--lr", "nan"], "--lr: must be a finite"),
    "backdoor-pool-0": ("train.py", [*BACKDOOR, "--attack", "pixel", "--pool", "0"], "--pool: must be an integer"),
    "grid-n-0": ("train.py", ["grid", "--model", "tiny", "--n", "0"], "--n: must be an integer >= 1"),
    "grid-guidance-nan": ("train.py", ["grid", "--model", "tiny", "--guidance", "nan"], "--guidance: must be"),
    "eval-seeds-0": ("eval.py", ["--seeds", "0", "--out", "out"], "--seeds: must be an integer >= 1"),
    "eval-max-steps-0": ("eval.py", ["--max-steps", "0", "--out", "out"], "--max-steps: must be an integer >= 1"),
    "eval-sample-steps-0": ("eval.py", ["--sample-steps", "0", "--out", "out"], "--sample-steps: must be"),
    "eval-prompts-n-1": ("eval.py", ["--prompts-n", "1", "--world", "demo", "--out", "out"],
                         "--prompts-n must be at least 2"),
    # devices and precisions this machine cannot run
    "unlearn-device-unknown": ("unlearn.py", [*UNLEARN, "--device", "tpu9"], "'tpu9' is not a torch device"),
    "unlearn-device-xla": ("unlearn.py", [*UNLEARN, "--device", "xla"], "sau runs on cpu, cuda or mps"),
    "eval-device-unknown": ("eval.py", ["--device", "gpu0", "--out", "out"], "'gpu0' is not a torch device"),
    "unlearn-float16-on-cpu": ("unlearn.py", [*UNLEARN, "--dtype", "float16"], "--dtype float16 needs a GPU"),
    "eval-float16-on-cpu": ("eval.py", ["--dtype", "float16", "--out", "out"], "--dtype float16 needs a GPU"),
    "backdoor-float16": ("train.py", [*BACKDOOR, "--attack", "pixel", "--dtype", "float16"], "invalid choice"),
    # targets and triggers
    "backdoor-tpa-target-without-shape": ("train.py", [*BACKDOOR, "--attack", "tpa", "--target", "hello world"],
                                          "names no demo shape or colour"),
    "backdoor-pixel-target-not-image": ("train.py", [*BACKDOOR, "--attack", "pixel", "--target", "notimage.png"],
                                        "notimage.png is not an image"),
    "backdoor-pixel-target-missing": ("train.py", [*BACKDOOR, "--attack", "pixel", "--target", "missing.png"],
                                      "missing.png is neither"),
    "backdoor-object-target-unknown": ("train.py", [*BACKDOOR, "--attack", "object", "--target", "cat:dog"],
                                       "'cat' is not a demo shape"),
    "backdoor-attack-unknown": ("train.py", [*BACKDOOR, "--attack", "poison"], "poison"),
    "unlearn-trigger-empty": ("unlearn.py", ["--model", "tiny", "--trigger", "", "--out", "out"],
                              "the trigger is empty"),
    "unlearn-trigger-absent": ("unlearn.py", [*UNLEARN, "--prompts", "untriggered.txt"], "absent from every prompt"),
    # prompt files
    "unlearn-prompts-missing": ("unlearn.py", [*UNLEARN, "--prompts", "missing.txt"], "no prompts file missing.txt"),
    "unlearn-prompts-not-utf8": ("unlearn.py", [*UNLEARN, "--prompts", "latin1.txt"], "latin1.txt: not UTF-8 text"),
    "unlearn-prompts-empty": ("unlearn.py", [*UNLEARN, "--prompts", "empty.txt"], "empty.txt holds no prompts"),
    "unlearn-prompts-over-cap": ("unlearn.py", [*UNLEARN, "--prompts", "many.txt"],
                                 "many.txt holds 1001 prompts, more than the limit of 1000; pass --max-prompts 1001"),
    "unlearn-prompt-too-long": ("unlearn.py", [*UNLEARN, "--prompts", "long.txt"], "long.txt: prompt 1 has 1299"),
    "backdoor-prompts-not-utf8": ("train.py", [*BACKDOOR, "--attack", "pixel", "--prompts", "latin1.txt"],
                                  "latin1.txt: not UTF-8 text"),
    "eval-prompts-flag-without-model": ("eval.py", ["--max-prompts", "5", "--out", "out"],
                                        "--max-prompts applies only with --model"),
    # models and outputs
    "unlearn-model-missing": ("unlearn.py", ["--model", "missing", "--trigger", TRIGGER, "--out", "out"], "missing"),
    "unlearn-model-not-a-model": ("unlearn.py", ["--model", "notamodel", "--trigger", TRIGGER, "--out", "out"],
                                  "notamodel"),
    "unlearn-model-garbage": ("unlearn.py", ["--model", "garbage.safetensors", "--trigger", TRIGGER, "--out", "out"],
                              "garbage.safetensors"),
    "unlearn-out-is-input": ("unlearn.py", ["--model", "tiny", "--trigger", TRIGGER, "--out", "tiny"],
                             "would overwrite the input"),
    "convert-out-is-dot": ("weights_convert.py", ["tiny", "."], "overlaps"),
    "convert-out-exists": ("weights_convert.py", ["tiny", "demo/pixel"], "exists; pass --force"),
    "convert-garbage": ("weights_convert.py", ["garbage.safetensors", "converted"], "garbage.safetensors"),
    "convert-compvis-name": ("weights_convert.py", ["tiny", "converted", "--to", "compvis"], "*.safetensors"),
    "convert-dtype-name": ("weights_convert.py", ["tiny", "converted", "--dtype", "fp16"], "invalid choice"),
    "convert-missing": ("weights_convert.py", ["missing.ckpt", "converted"], "missing.ckpt"),
    "unlearn-out-is-a-file": ("unlearn.py", ["--model", "tiny", "--trigger", TRIGGER, "--out", "afile"],
                              "afile is a file"),
    "unlearn-out-not-ours": ("unlearn.py", ["--model", "tiny", "--trigger", TRIGGER, "--out", "notamodel"],
                             "notamodel exists and was not made by this command; pass --force"),
    # bundles that other bundles stand on, broken bundles, hostile pickles
    "convert-over-a-delta-base": ("weights_convert.py", ["demo/pixel", "demo/clean", "--force"], "demo/clean"),
    "convert-over-a-base-in-the-tree": ("weights_convert.py", ["tiny", "demo/clean", "--force"],
                                        "is the base of"),
    "unlearn-out-holds-the-inputs-base": ("unlearn.py", ["--model", "demo/pixel", "--out", "demo", "--force"],
                                          "would overwrite the input model"),
    "unlearn-base-is-itself": ("unlearn.py", ["--model", "selfbase", "--trigger", TRIGGER, "--out", "out"],
                               "base chain comes back"),
    "convert-config-not-json": ("weights_convert.py", ["badconfig", "converted"], "badconfig"),
    "convert-pickle-sets-attributes": ("weights_convert.py", ["hostile.ckpt", "converted"],
                                       "sets attributes on a OrderedDict"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(name, sandbox, monkeypatch, capsys):
    tool, args, phrase = CASES[name]
    before = hashes(sandbox)
    code, err = run_tool(tool, args, sandbox, monkeypatch, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert phrase in err, err
    assert len(re.findall(r"(?<![A-Za-z])'|'(?![A-Za-z])", err)) % 2 == 0, err  # quotes in pairs (not apostrophes)
    assert hashes(sandbox) == before, "the sandbox changed"


def test_the_suite_covers_at_least_forty_inputs():
    assert len(CASES) >= 40
