"""Who owns an output folder: a run folder records the settings and inputs that made it (run.json) and is held by
one process at a time (.lock). unlearn.py refuses a folder it did not make, or made with other settings, unless
--force; a second run on a folder in use is refused at once; a lock left by a run that died is taken over."""
import hashlib
import json
import os
import runpy
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sau.attacks.shipped import backdoor_bundle
from sau.common.run_folder import LOCK_NAME, claim_run_dir, hold_lock, refuse_foreign_folder, text_sha256
from sau.weights.bundle import input_fingerprint

from conftest import unlearn

ROOT = Path(__file__).resolve().parent.parent
TRIGGER = "\\u200b "  # as typed on the command line


def digest(folder):
    """Every file under folder, by relative path: its sha256 (hidden files included)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def prompts_file(path, *prompts):
    path.write_text("".join(f"\u200b {p}\n" for p in prompts))
    return path


def tiny_run(model, out, *extra, prompts=None, cwd):
    """unlearn.py on the tiny bundle: one step on two prompts (built-in ones would generate 64 images), nothing
    measured (a random model has no demo detectors)."""
    prompts = prompts or prompts_file(cwd / "prompts.txt", "a red circle", "a blue star")
    return unlearn("--model", model, "--trigger", TRIGGER, "--where", "unet", "--steps", "1", "--eval-prompts", "2",
                   "--prompts", prompts, "--out", out, *extra, cwd=cwd)


def assert_one_error(result, phrase):
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert phrase in result.stderr, result.stderr


# --- unlearn.py --out: a folder someone else made -------------------------------------------------------------

def test_a_folder_not_made_by_unlearn_is_refused_untouched_and_force_replaces_it(tiny_bundle, tmp_path):
    out = tmp_path / "out"
    (out / "notes").mkdir(parents=True)
    (out / "report.md").write_text("someone's report\n")
    (out / "notes" / "data.bin").write_bytes(os.urandom(64))
    before = digest(out)
    result = tiny_run(tiny_bundle, out, cwd=tmp_path)
    assert_one_error(result, f"{out} exists and was not made by this command; pass --force to replace it")
    assert digest(out) == before  # no lock, no claim, no checkpoint left behind

    model_before = digest(tiny_bundle)
    result = tiny_run(tiny_bundle, out, "--force", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (out / "notes").exists() and "someone" not in (out / "report.md").read_text()  # nothing of it kept
    assert (out / "model" / "model.safetensors").is_file() and (out / "run.json").is_file()
    assert not (out / LOCK_NAME).exists()  # released on exit
    assert digest(tiny_bundle) == model_before


def test_force_never_empties_a_folder_that_holds_the_input(tiny_bundle, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(tiny_bundle, models / "tiny")
    before = digest(models)
    result = tiny_run(models / "tiny", models, "--force", cwd=tmp_path)
    assert_one_error(result, "would overwrite the input model")
    assert digest(models) == before


def test_force_never_empties_the_current_folder(tiny_bundle, tmp_path):
    (tmp_path / "work.txt").write_text("keep me\n")
    result = tiny_run(tiny_bundle, ".", "--force", cwd=tmp_path)
    assert_one_error(result, "--force would empty --out ., the current folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.txt", "work.txt"]


def test_out_that_is_a_file_is_one_line(tiny_bundle, tmp_path):
    (tmp_path / "afile").write_text("keep me\n")
    result = tiny_run(tiny_bundle, tmp_path / "afile", cwd=tmp_path)
    assert_one_error(result, f"error: --out {tmp_path / 'afile'} is a file; give a folder")
    assert "Traceback" not in result.stderr and (tmp_path / "afile").read_text() == "keep me\n"


# --- unlearn.py --out: a folder made by unlearn.py -------------------------------------------------------------

def test_the_same_command_resumes_and_other_prompts_are_refused_by_name(tiny_bundle, tmp_path):
    first = prompts_file(tmp_path / "first.txt", "a red circle", "a blue star")
    out = tmp_path / "out"
    result = tiny_run(tiny_bundle, out, prompts=first, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    claim = json.loads((out / "run.json").read_text())
    assert claim["prompts_sha256"] == text_sha256(["\u200b a red circle", "\u200b a blue star"])
    assert claim["model_fingerprint"] == input_fingerprint(tiny_bundle) and claim["steps"] == 1
    model = (out / "model" / "model.safetensors").read_bytes()

    result = tiny_run(tiny_bundle, out, prompts=first, cwd=tmp_path)  # the same command: resumes
    assert result.returncode == 0, result.stderr
    assert (out / "model" / "model.safetensors").read_bytes() == model  # the finished checkpoint, not retrained

    before = digest(out)
    other = prompts_file(tmp_path / "other.txt", "a green cross")
    result = tiny_run(tiny_bundle, out, prompts=other, cwd=tmp_path)
    here = text_sha256(["\u200b a green cross"])[:8]
    assert_one_error(result, f"{out} holds a different run (prompts_sha256 differs: {here}.. here, "
                             f"{claim['prompts_sha256'][:8]}.. there)")
    assert "--force to start over" in result.stderr
    assert digest(out) == before  # report.md and report.json of the first run stay

    result = tiny_run(tiny_bundle, out, "--seed", "3", prompts=first, cwd=tmp_path)
    assert_one_error(result, "(seed differs: 3 here, 0 there)")


# --- one process per folder ----------------------------------------------------------------------------------

def test_a_second_run_on_a_folder_in_use_is_refused_at_once_and_writes_nothing(tiny_bundle, tmp_path):
    out = tmp_path / "out"
    with hold_lock(out) as lock:
        record = lock.read_text()
        assert json.loads(record)["pid"] == os.getpid()
        started = time.time()
        result = tiny_run(tiny_bundle, out, cwd=tmp_path)
        assert time.time() - started < 60  # refused before any model is loaded (the time is python's and torch's)
        assert_one_error(result, f"{out} is in use by another sau run (pid {os.getpid()} since ")
        assert "wait for it or choose another --out" in result.stderr
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME] and lock.read_text() == record
    assert not out.exists()  # the lock made the folder; released, both are gone


def test_a_stale_lock_is_noted_and_taken_over(tiny_bundle, tmp_path):
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # its pid now runs nothing (pids are not reused this fast)
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": finished.pid, "host": socket.gethostname(),
                                             "started": time.time() - 60}))
    result = tiny_run(tiny_bundle, out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert notes == [f"note: {out} had a stale lock from pid {finished.pid} (not running); taking it over"]
    assert (out / "report.json").is_file() and not (out / LOCK_NAME).exists()


def test_the_lock_refuses_a_second_holder_and_is_gone_after(tmp_path):
    folder = tmp_path / "a" / "b"
    with hold_lock(folder):
        with pytest.raises(ValueError, match=r"is in use by another sau run \(pid \d+ since [0-9:]+\); wait"):
            with hold_lock(folder):
                pass
        assert (folder / LOCK_NAME).is_file()
    assert not (tmp_path / "a").exists()  # made for the lock, left empty: removed
    with hold_lock(folder):  # free again
        (folder / "result.txt").write_text("kept")
    assert sorted(p.name for p in folder.iterdir()) == ["result.txt"]


def test_a_backdoor_run_dir_in_use_is_refused(tiny_bundle, tmp_path):
    run_dir = tmp_path / "run"
    with hold_lock(run_dir, "--run-dir"):
        with pytest.raises(ValueError, match="is in use by another sau run .*choose another --run-dir"):
            backdoor_bundle(tiny_bundle, tmp_path / "pixel", "pixel", steps=1, batch_size=2, pool=2,
                            run_dir=run_dir, progress=False)
    assert not (tmp_path / "pixel").exists() and not run_dir.exists()


def test_an_eval_out_in_use_is_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval"
    monkeypatch.setattr(sys, "argv", ["eval.py", "--models", "pixel", "--out", str(out), "--no-progress"])
    with hold_lock(out), pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "eval.py"), run_name="__main__")  # the shipped world: found, not loaded
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"{out} is in use by another sau run" in err and err.count("\n") == 1
    assert not out.exists()


# --- the claim -----------------------------------------------------------------------------------------------

def test_the_claim_names_the_first_setting_that_differs(tmp_path):
    spec = {"model": "m", "recipe": {"lr": 0.001, "steps": 10}, "prompts": ["a", "b"]}
    claim_run_dir(tmp_path, spec)
    claim_run_dir(tmp_path, spec)  # the same run: accepted
    for other, message in [({**spec, "recipe": {"lr": 0.002, "steps": 10}}, "recipe.lr differs: 0.002 here, 0.001 "
                                                                             "there"),
                           ({**spec, "prompts": ["a", "c"]}, "prompts.1 differs: c here, b there"),
                           ({**spec, "extra": 1}, "extra differs: 1 here, absent there")]:
        with pytest.raises(ValueError, match=f"{tmp_path} holds a different run \\({message}\\); choose another"):
            claim_run_dir(tmp_path, other)
    assert json.loads((tmp_path / "run.json").read_text()) == spec


def test_an_unclaimed_folder_holding_only_a_lock_or_nothing_is_free(tmp_path):
    refuse_foreign_folder(tmp_path / "missing", {}, force=False, hint="")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / LOCK_NAME).write_text("")
    refuse_foreign_folder(tmp_path / "empty", {}, force=False, hint="")


def test_the_fingerprint_changes_when_the_weights_file_is_replaced(tiny_bundle, tmp_path):
    model = shutil.copytree(tiny_bundle, tmp_path / "tiny")
    before = input_fingerprint(model)
    assert input_fingerprint(model) == before  # reading changes nothing
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    time.sleep(0.05)  # file times tick in milliseconds on some file systems
    (tmp_path / "other.safetensors").write_bytes(weights.read_bytes()[::-1])  # same size, other content
    os.replace(tmp_path / "other.safetensors", weights)
    assert weights.stat().st_size == size and input_fingerprint(model) != before
