"""Delta bundles cannot be silently broken: no writer replaces a base, a base is found again after moving,
a replaced base is caught by its hash, a base cycle is refused at once, and the shipped demo still loads.

A tiny random model is the base; a copy with one bias moved is the delta (it stores that one tensor).
"""
import copy
import hashlib
import json
import runpy
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

import sau
from sau.common.files import DEMO_DIR
from sau.common.state import CheckpointError
from sau.weights import bundle
from sau.weights.bundle import base_chain, bundles_using, read_bundle
from sau.weights.write import convert, save_model

from conftest import make_tiny_sd

ROOT = Path(__file__).resolve().parents[1]
DELTA_KEY = "model.diffusion_model.out.2.bias"


@pytest.fixture(scope="module")
def sd():
    return make_tiny_sd(seed=1)


def moved(sd, amount):
    """A copy of sd whose UNet output bias is shifted: as a delta it stores that tensor only."""
    changed = copy.deepcopy(sd)
    with torch.no_grad():
        changed.unet.out[2].bias.add_(amount)
    return changed


def make_pair(sd, root, base_name="base", delta_name="delta"):
    """A base bundle and a delta on it, side by side in `root`: (base, delta)."""
    base, delta = Path(root) / base_name, Path(root) / delta_name
    save_model(sd, base)
    save_model(moved(sd, 1.0), delta, base=base)
    return base, delta


def digest(root):
    """{file: sha256} of every file under root: what a refused write must leave as it was."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def config_of(folder):
    return json.loads((Path(folder) / "config.json").read_text())


def set_config(folder, **changes):
    config = {k: v for k, v in {**config_of(folder), **changes}.items() if v is not None}
    (Path(folder) / "config.json").write_text(json.dumps(config))


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_line(error):
    message = str(error.value)
    assert "\n" not in message, message
    return message


# --- no writer replaces a base ------------------------------------------------------------------------------

def test_convert_with_force_refuses_to_replace_a_base_and_changes_nothing(sd, tiny_bundle, tmp_path):
    make_pair(sd, tmp_path / "tree")
    before = digest(tmp_path)
    with pytest.raises(ValueError) as err:
        convert(tiny_bundle, tmp_path / "tree" / "base", force=True)
    assert one_line(err) == (f"{tmp_path / 'tree' / 'base'} is the base of {tmp_path / 'tree' / 'delta'} (a delta "
                             "bundle); writing over it would change that model too. Choose another output")
    assert digest(tmp_path) == before


def test_save_model_refuses_to_replace_a_base_or_a_folder_holding_one(sd, tmp_path):
    base, delta = make_pair(sd, tmp_path / "tree")
    save_model(moved(sd, 3.0), tmp_path / "other" / "delta", base=base)
    before = digest(tmp_path)
    with pytest.raises(ValueError, match="tree/base is the base of .*tree/delta"):
        save_model(moved(sd, 2.0), base)
    with pytest.raises(ValueError, match="tree holds .*tree/base, which is the base of .*other/delta"):
        save_model(moved(sd, 2.0), tmp_path / "tree")
    with pytest.raises(ValueError, match="would write over"):  # a delta over its own base
        save_model(moved(sd, 2.0), base, base=base)
    with pytest.raises(ValueError, match="would write over"):  # a delta over the folder that holds its base
        save_model(moved(sd, 2.0), tmp_path / "tree", base=base)
    assert digest(tmp_path) == before


def test_a_delta_replaced_together_with_its_base_is_not_in_the_way(sd, tmp_path):
    make_pair(sd, tmp_path / "tree" / "pair")
    save_model(sd, tmp_path / "tree" / "pair")  # the whole folder, delta included, is replaced: nothing left broken
    assert bundle.is_bundle(tmp_path / "tree" / "pair")


def test_protect_keeps_a_path_and_its_bases_and_a_replaced_base_is_caught_by_its_hash(sd, tmp_path):
    base = tmp_path / "models" / "base"
    save_model(sd, base)
    far = tmp_path / "far" / "away" / "deeper" / "delta"  # beyond the writer's shallow scan
    save_model(moved(sd, 1.0), far, base=base)
    before = digest(tmp_path)
    with pytest.raises(ValueError) as err:
        save_model(moved(sd, 5.0), base, protect=[far])
    assert f"{base} would write over {base.resolve()}" in one_line(err)
    assert digest(tmp_path) == before

    save_model(moved(sd, 5.0), base)  # unprotected and unseen: written; the delta now refuses to load
    with pytest.raises(CheckpointError) as err:
        sau.load(far)
    assert one_line(err) == (f"{far.resolve()}: its base {base.resolve()} changed since the delta was written "
                             "(content hash differs); restore the base it was made from, or write the delta again "
                             "against this one")


def test_convert_protects_the_inputs_whole_base_chain(sd, tmp_path):
    base, delta = make_pair(sd, tmp_path / "a")
    top = tmp_path / "b" / "top"
    save_model(moved(sd, 3.0), top, base=delta)
    assert base_chain(top) == [delta.resolve(), base.resolve()]
    before = digest(tmp_path)
    for target in (base, delta, tmp_path / "a", base / "inside"):
        with pytest.raises(ValueError, match="a base of the input"):
            convert(top, target, force=True)
    assert digest(tmp_path) == before


def test_bundles_using_finds_dependents_in_the_tree_and_skips_hidden_folders(sd, tmp_path):
    base, delta = make_pair(sd, tmp_path)
    save_model(moved(sd, 2.0), tmp_path / "group" / "second", base=base)
    save_model(moved(sd, 3.0), tmp_path / ".hidden", base=base)
    found = [folder.name for folder, _ in bundles_using(base, tmp_path)]
    assert found == ["delta", "second"]
    assert bundles_using(delta, tmp_path) == []


# --- finding the base again -------------------------------------------------------------------------------------

def test_a_delta_moved_together_with_its_base_still_loads(sd, tmp_path):
    _, delta = make_pair(sd, tmp_path / "pair")
    assert config_of(delta)["base"] == "../base"
    expected = read_bundle(delta)[1]
    shutil.move(tmp_path / "pair", tmp_path / "moved")
    assert same_state(read_bundle(tmp_path / "moved" / "delta")[1], expected)
    assert torch.equal(expected[DELTA_KEY], moved(sd, 1.0).unet.out[2].bias)


def test_a_delta_outside_the_demo_folder_names_a_demo_base_by_name_and_survives_moving(sd, tmp_path, monkeypatch):
    demo = tmp_path / "install" / "sau" / "demo"
    monkeypatch.setattr(bundle, "DEMO_DIR", demo)  # never write into the real sau/demo
    save_model(sd, demo / "clean")
    save_model(moved(sd, 1.0), demo / "inside", base=demo / "clean")
    outside = tmp_path / "work" / "variant"
    save_model(moved(sd, 2.0), outside, base=demo / "clean")
    assert config_of(demo / "inside")["base"] == "../clean"  # the shipped layout keeps its relative path
    assert config_of(outside)["base"] == "demo/clean"
    expected = read_bundle(outside)[1]
    shutil.move(tmp_path / "work", tmp_path / "elsewhere")
    assert same_state(read_bundle(tmp_path / "elsewhere" / "variant")[1], expected)


def test_a_missing_base_is_refused_in_one_line(sd, tmp_path):
    base, delta = make_pair(sd, tmp_path)
    shutil.rmtree(base)
    with pytest.raises(CheckpointError) as err:
        sau.load(delta)
    assert one_line(err) == (f"{delta.resolve()}: its base {base.resolve()} is missing (no sau bundle there); "
                             "the delta cannot load without it")


# --- cycles and old configs -------------------------------------------------------------------------------------

def test_a_bundle_that_is_its_own_base_is_refused_at_once(sd, tmp_path):
    base, delta = make_pair(sd, tmp_path)
    set_config(delta, base=".")
    set_config(base, base="../delta")
    for path in (delta, base):
        started = time.time()
        with pytest.raises(CheckpointError) as err:
            sau.load(path)
        assert "its base chain comes back to" in one_line(err) and time.time() - started < 2
    with pytest.raises(CheckpointError, match="comes back"):
        save_model(sd, tmp_path / "new", base=delta)
    assert not (tmp_path / "new").exists()


def test_a_two_bundle_cycle_is_refused_at_once(sd, tmp_path):
    base, delta = make_pair(sd, tmp_path)
    set_config(base, base="../delta")
    started = time.time()
    with pytest.raises(CheckpointError) as err:
        read_bundle(delta)
    assert one_line(err) == (f"{delta}: its base chain comes back to {delta.resolve()} (a bundle cannot be its own "
                             "base, directly or through others)")
    assert time.time() - started < 2
    assert [folder.name for folder, _ in bundles_using(base, tmp_path)] == ["delta"]  # a scan never fails


def test_a_delta_without_a_recorded_hash_loads_as_before(sd, tmp_path):
    _, delta = make_pair(sd, tmp_path)
    assert len(config_of(delta)["base_sha256"]) == 64
    set_config(delta, base_sha256=None)
    assert same_state(read_bundle(delta)[1], dict(moved(sd, 1.0).compvis_state_dict()))


# --- the shipped demo -------------------------------------------------------------------------------------------

def test_the_shipped_demo_loads_and_a_copy_of_it_loads_the_same(tmp_path):
    if not (DEMO_DIR / "pixel").exists():
        pytest.skip("the shipped demo models are missing: run `python train.py world` and `python train.py backdoors`")
    assert config_of(DEMO_DIR / "pixel")["base"] == "../clean"
    assert sau.load("demo/pixel").info["backdoor"]["attack"] == "pixel"
    shutil.copytree(DEMO_DIR, tmp_path / "copy")
    assert same_state(read_bundle(tmp_path / "copy" / "pixel")[1], read_bundle(DEMO_DIR / "pixel")[1])


def test_the_command_line_tool_will_not_write_a_backdoored_model_over_the_demo_base(tmp_path, monkeypatch, capsys):
    if not (DEMO_DIR / "pixel").exists():
        pytest.skip("the shipped demo models are missing")
    demo = tmp_path / "demo_copy"
    shutil.copytree(DEMO_DIR, demo)
    before = digest(tmp_path)
    monkeypatch.setattr(sys, "argv", ["weights_convert.py", str(demo / "pixel"), str(demo / "clean"), "--force"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "weights_convert.py"), run_name="__main__")
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "a base of the input" in err[0], err
    assert digest(tmp_path) == before
