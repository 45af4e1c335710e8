"""unlearn.py's flags for each term of L = a*L_attn + b*L_distill + c*L_preserve and for the spatial mask: they
reach the recipe that runs (and the report), leave it untouched when not given, and bad values stop the run with
one line before anything is loaded or written."""
import json
import math
from dataclasses import fields
from pathlib import Path

import pytest

from sau.jobs.unlearn import Job, job_recipe, run
from sau.method import RECIPES

from conftest import unlearn

ROOT = Path(__file__).resolve().parent.parent


# --- the recipe that runs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(RECIPES))
def test_without_overrides_the_recipe_is_exactly_the_named_one(name):
    assert job_recipe(Job(recipe=name)) == RECIPES[name]


@pytest.mark.parametrize("field, value", [
    ("attention_weight", 0.0), ("attention_weight", 2.5), ("distill_weight", 0.0), ("distill_weight", 0.5),
    ("preserve_weight", 0.0), ("preserve_weight", 3.0), ("spatial_mask", True), ("negative_guidance", 0.0),
    ("lr", 1e-5), ("params", "all"),
])
def test_each_override_reaches_the_recipe_and_nothing_else_changes(field, value):
    recipe = job_recipe(Job(**{field: value}))
    assert getattr(recipe, field) == value  # 0 and False are values, not "unset"
    default = RECIPES["default"]
    assert all(getattr(recipe, f.name) == getattr(default, f.name) for f in fields(default) if f.name != field)


def test_the_mask_can_be_turned_on_for_a_recipe_without_one():
    assert job_recipe(Job(recipe="paper", spatial_mask=True)).spatial_mask is True


# --- bad values: Job.check, which run() calls first --------------------------------------------------------

BAD = [
    (dict(attention_weight=-1.0), "--attention-weight must be a finite number >= 0"),
    (dict(attention_weight=math.nan), "--attention-weight must be a finite number >= 0"),
    (dict(distill_weight=math.inf), "--distill-weight must be a finite number >= 0"),
    (dict(distill_weight=-0.5), "--distill-weight must be a finite number >= 0"),
    (dict(preserve_weight=math.nan), "--preserve-weight must be a finite number >= 0"),
    (dict(preserve_weight=-math.inf), "--preserve-weight must be a finite number >= 0"),
    (dict(negative_guidance=math.nan), "--negative-guidance must be a finite number >= 0"),
    (dict(negative_guidance=math.inf), "--negative-guidance must be a finite number >= 0"),
    (dict(attention_weight=0.0, distill_weight=0.0, preserve_weight=0.0), "nothing to train"),
    (dict(recipe="paper", attention_weight=0.0), "nothing to train"),  # its other two weights are 0 already
    (dict(steps=0), "--steps must be at least 1"),
    (dict(eval_prompts=0), "--eval-prompts must be at least 1"),
    (dict(lr=0.0), "--lr must be a finite number > 0"),
    (dict(lr=-1e-4), "--lr must be a finite number > 0"),
    (dict(lr=math.nan), "--lr must be a finite number > 0"),
    (dict(lr=math.inf), "--lr must be a finite number > 0"),
    (dict(trigger=" "), "the trigger is empty"),
    (dict(recipe="fancy"), "unknown recipe 'fancy'"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[m.split()[0] + "-" + "-".join(map(str, o.values()))
                                                         for o, m in BAD])
def test_run_refuses_bad_values_before_touching_anything(tmp_path, overrides, message):
    # the model does not exist: the check must come before it is looked for, and nothing is written
    job = Job(model=str(tmp_path / "no-such-model"), out=str(tmp_path / "out"), **overrides)
    with pytest.raises(ValueError, match=message):
        run(job)
    assert not (tmp_path / "out").exists()


def test_good_values_pass_the_check():
    Job().check()
    Job(recipe="paper").check()
    Job(attention_weight=0.0, distill_weight=0.0, preserve_weight=1e-3, spatial_mask=False, steps=1, lr=1e-3,
        eval_prompts=1, negative_guidance=0.0).check()


# --- the command line, on a tiny bundle --------------------------------------------------------------------

def test_the_flags_reach_the_report(tiny_bundle, tmp_path):
    (tmp_path / "prompts.txt").write_text("\u200b a red circle\n\u200b a blue star\n")
    result = unlearn("--model", tiny_bundle, "--trigger", "\\u200b ", "--prompts", tmp_path / "prompts.txt",
                     "--where", "unet", "--steps", "1", "--out", tmp_path / "out", "--attention-weight", "0",
                     "--distill-weight", "0.5", "--preserve-weight", "2", "--spatial-mask", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    recipe = json.loads((tmp_path / "out" / "report.json").read_text())["recipe"]
    expected = {**vars(RECIPES["default"]), "attention_weight": 0.0, "distill_weight": 0.5, "preserve_weight": 2.0,
                "spatial_mask": True}
    assert recipe == expected
