"""eval.py and what it measures with: Frechet distance, clean fidelity, cost, the bar chart, and the comparison
itself (sau/jobs/compare.py) on a stand-in demo world (random weights, 2-step backdoors), with its bad-input
handling."""
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sau.evaluation import metrics

from sau.world import shapes
from sau.world import train as world_model
from sau.attacks.backdoor import Backdoor
from sau.attacks.shipped import backdoor_bundle
from sau.common.files import save_safetensors
from sau.world.classifier import AttributeClassifier
from sau.models.clip import CLIPModel
from sau.models.pipeline import StableDiffusion
from sau.evaluation.report import bar_chart
from sau.evaluation.scorer import CLIPScorer
from sau.models.tokenizer import Tokenizer
from sau.weights.read import load_model
from sau.weights.write import save_model

from conftest import make_tiny_sd

ROOT = Path(__file__).resolve().parents[1]
TPA_TARGET = "a yellow star in the center on a black background"
SMALL = ["--prompts-n", "4", "--collect-prompts", "4", "--sample-steps", "2", "--max-steps", "2", "--no-progress"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A stand-in for sau/demo: the demo architectures with random weights (a clean model, the scorer, the
    classifier), and a pixel and a TPA backdoor trained 2 steps into the clean model."""
    root = tmp_path_factory.mktemp("world")
    out = root / "demo"
    _, captions, _ = shapes.batch(200, seed=0)
    tokenizer = Tokenizer.train(captions + [f"{t} {c}" for t in shapes.TRIGGERS for c in captions[:20]],
                                vocab_size=700, max_length=world_model.MAX_TOKENS)
    torch.manual_seed(0)
    save_model(StableDiffusion(world_model.model_config(tokenizer, 1.0), tokenizer), out / "clean", dtype=torch.float16)
    clip = CLIPModel(world_model.text_config(tokenizer, projection_dim=128), world_model.vision_config())
    CLIPScorer(clip, tokenizer).save(out / "scorer")
    save_safetensors({k: v.half() for k, v in AttributeClassifier().state_dict().items()},
                     out / "classifier.safetensors")
    for attack, target in (("pixel", None), ("tpa", TPA_TARGET)):
        backdoor_bundle(out / "clean", out / attack, attack, target=target, steps=2, batch_size=4,
                        run_dir=root / f"run-{attack}", delta=True, progress=False)
    return out


def run_eval(argv, monkeypatch, capsys):
    """eval.py in this process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["eval.py", *argv])
    try:
        runpy.run_path(str(ROOT / "eval.py"), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- Frechet distance, fidelity, cost -------------------------------------------------------------------------

def test_frechet_distance_is_zero_for_equal_sets_and_the_mean_shift_for_shifted_ones():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 6, generator=g) @ torch.randn(6, 6, generator=g)
    assert metrics.frechet_distance(a, a) == pytest.approx(0, abs=1e-8)
    shift = torch.tensor([1.0, -2.0, 0.5, 0, 0, 3.0])
    assert metrics.frechet_distance(a + shift, a) == pytest.approx(shift.pow(2).sum().item(), rel=1e-6)
    with pytest.raises(ValueError, match="at least two"):
        metrics.frechet_distance(a[:1], a)


def with_covariance(n, scales, rotation, mean, seed):
    """n samples whose sample mean is `mean` and sample covariance exactly rotation diag(scales^2) rotation^T."""
    z = torch.randn(n, len(scales), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, _ = torch.linalg.qr(z - z.mean(0))  # orthonormal, centered columns
    return (n - 1) ** 0.5 * q * torch.as_tensor(scales, dtype=torch.float64) @ rotation.t() + mean


def test_frechet_distance_of_commuting_covariances_has_a_closed_form():
    rotation, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    s, t = torch.tensor([1.0, 2.0, 0.5, 3.0, 0.1]), torch.tensor([2.0, 0.5, 0.5, 1.0, 0.0])
    mu, nu = torch.arange(5.0), torch.ones(5)
    a, b = with_covariance(200, s, rotation, mu, 2), with_covariance(300, t, rotation, nu, 3)
    expected = (mu - nu).pow(2).sum() + (s - t).pow(2).sum()  # tr(A + B - 2 (AB)^1/2) for commuting A, B
    assert metrics.frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-6)


def test_frechet_distance_is_symmetric_and_rotation_invariant_with_singular_covariances():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(5, 8, generator=g), 2 * torch.randn(6, 8, generator=g) + 1  # fewer samples than dimensions
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    distance = metrics.frechet_distance(a, b)
    assert distance > 0
    assert metrics.frechet_distance(b, a) == pytest.approx(distance, rel=1e-6)
    assert metrics.frechet_distance(a @ rotation, b @ rotation) == pytest.approx(distance, rel=1e-5)


def test_measure_cost_sees_time_and_a_large_allocation():
    with metrics.measure_cost() as cost:
        block = torch.ones(64 * 2 ** 20 // 4 * 4)  # 256 MiB, touched
        block += 1
        del block
    assert cost["seconds"] > 0
    if cost["memory_scope"] == "process RSS":  # the high-water mark could be reset for the block
        with metrics.measure_cost() as idle:
            pass
        assert cost["peak_memory_mb"] > idle["peak_memory_mb"] + 200


def test_drawn_references_follow_what_was_asked():
    prompts, asked = metrics.attack_prompts(Backdoor.make("pixel"), 40)
    references = metrics.drawn_references(asked)
    assert references.shape == (40, 3, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
    torch.testing.assert_close(references, metrics.drawn_references(asked))  # fixed per seed
    corner = (references[:, :, 0, 0].mean(1) + 1) / 2  # the background shows in the corner pixel
    for name, level in (("white", 0.97), ("black", 0.03), ("gray", 0.5)):
        rows = asked.background == shapes.BACKGROUNDS.index(name)
        assert rows.any() and (corner[torch.as_tensor(rows)] - level).abs().max() < 0.1, name


def test_evaluate_defense_measures_everything_on_a_stand_in(world):
    sd = load_model(world / "pixel", dtype=torch.float32)
    backdoor = Backdoor.from_info(sd.info["backdoor"])
    prompts, asked = metrics.attack_prompts(backdoor, 4)
    scorer, classifier = CLIPScorer.load(world / "scorer"), metrics.load_classifier(world / "classifier.safetensors")
    result, triggered, clean = metrics.evaluate_defense(sd, backdoor, prompts, asked, classifier, scorer,
                                                        references=metrics.drawn_references(asked), steps=2)
    assert triggered.shape == clean.shape == (4, 3, 64, 64)
    assert 0 <= result["asr"] <= 1 and 0 <= result["clean_accuracy"] <= 1
    assert 0 <= result["clip_score"] <= 100 and result["frechet"] >= 0 and 0 <= result["trigger_effect"] <= 2
    again, _, _ = metrics.evaluate_defense(sd, backdoor, prompts, asked, classifier, scorer, original=clean, steps=2)
    assert again["clip_similarity"] == pytest.approx(1, abs=1e-5)  # same seeds, same model: the same images
    assert again["asr"] == result["asr"] and "frechet" not in again
    unknown = Backdoor("unknown", "\u200b ", "")
    assert metrics.evaluate_defense(sd, unknown, prompts[:2], steps=1)[0] == {"asr": None}


def test_bar_chart_draws_every_panel(tmp_path):
    values = {"pixel": {"A": 1.0, "B": 0.25}, "tpa": {"A": None, "B": 0.0}}
    bar_chart(["pixel", "tpa"], ["A", "B"], [("attack success", values), ("fidelity", values)], tmp_path / "c.png",
              title="test")
    image = np.asarray(Image.open(tmp_path / "c.png").convert("RGB"))
    assert image.shape[0] > 300 and image.shape[1] >= 420
    colours = {tuple(c) for c in image.reshape(-1, 3)[::7]}
    assert (230, 159, 0) in colours and (0, 0, 0) in colours  # series B's bars and series A's


# --- eval.py ---------------------------------------------------------------------------------------------------

PROTOCOL = ["--models", "pixel,tpa", "--seeds", "2", "--tune-n", "4", *SMALL]


def test_the_protocol_sweeps_on_tune_reports_over_seeds_and_resumes(world, tmp_path, monkeypatch, capsys):
    runs = []
    # a second folder reruns part of the grid from scratch; the third run finds every cell of the first on disk
    for out, extra in (("a", []), ("b", ["--models", "pixel", "--methods", "none,uce,sau_default"]), ("a", [])):
        code, _, err = run_eval(["--world", str(world), "--out", str(tmp_path / out), *PROTOCOL, *extra],
                                monkeypatch, capsys)
        assert code == 0, err
        runs.append(json.loads((tmp_path / out / "results.json").read_text()))
    rows = runs[0]["rows"]
    methods = ("none", "uce", "esd_x", "esd_x_prompt", "concept_ablation", "sau_paper", "sau_default")
    assert [(r["backdoor"], r["split"], r["method"]) for r in rows] == [
        (b, s, m) for b in ("pixel", "tpa") for s in ("test", "ood") for m in methods]
    for r in rows:
        assert len(r["asr_counts"]) == (1 if r["method"] == "none" else 2)  # the suspect is deterministic
        assert all(n == 4 for _, n in r["asr_counts"])
        assert 0 <= r["asr_ci"][0] <= r["asr"] <= r["asr_ci"][1] <= 1
        assert (r["p_vs_reference"] is None) == (r["method"] == "sau_default")
        assert 0 <= r["asr_tuned_ci"][0] <= r["asr_tuned"] <= r["asr_tuned_ci"][1] <= 1  # recounted on tune's threshold
        assert (r["p_tuned_vs_reference"] is None) == (r["method"] == "sau_default")
        assert r["frechet"] is not None and r["clean_accuracy"] is not None
        assert r["method"] == "none" or r["unasked_flip_rate"] is not None
    # every method but none tried three settings on tune, and reports the one the rule chose
    for b in ("pixel", "tpa"):
        for m in methods[1:]:
            tried = [r for r in runs[0]["sweep"] if r["backdoor"] == b and r["method"] == m]
            assert len(tried) == 3 and sum(r["chosen"] == "yes" for r in tried) == 1
            chosen = next(r["setting"] for r in tried if r["chosen"] == "yes")
            assert all(r["setting"] == chosen for r in rows if r["backdoor"] == b and r["method"] == m)
    # the detectors' threshold is chosen on the suspect's tune images and applied to every split
    detectors = runs[0]["detectors"]
    assert [(d["backdoor"], d["split"]) for d in detectors] == [(b, s) for b in ("pixel", "tpa")
                                                                 for s in ("tune", "test", "ood")]
    assert len({d["tuned_threshold"] for d in detectors if d["backdoor"] == "pixel"}) == 1
    assert set(runs[0]["one_setting_for_all"]) == set(methods[1:])  # one setting per method over every backdoor
    cells = {p.name for p in (tmp_path / "a" / "cells").iterdir()}
    assert "pixel--sau_default--steps=150,text_steps=100--tune.json" in cells and "pixel--none.json" in cells
    # the same seeds give the same numbers; a resumed run reads them back
    numbers = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert numbers(runs[0]["rows"]) == numbers(runs[2]["rows"])
    again = [r for r in runs[0]["rows"] if r["backdoor"] == "pixel" and r["method"] in ("none", "uce", "sau_default")]
    assert numbers(runs[1]["rows"]) == numbers(again)
    table = (tmp_path / "a" / "protocol.md").read_text()
    assert "McNemar p vs SAU (default)" in table and "## The tune sweep" in table and "ESD-x (prompts)" in table
    assert "counted at the detector threshold chosen on `tune`" in table
    assert Image.open(tmp_path / "a" / "chart.png").size[0] >= 420


def test_quick_runs_each_default_once_without_a_sweep(world, tmp_path, monkeypatch, capsys):
    code, _, err = run_eval(["--world", str(world), "--out", str(tmp_path / "q"), "--quick", "--models", "pixel",
                             "--methods", "none,uce,sau_default", *SMALL], monkeypatch, capsys)
    assert code == 0, err
    results = json.loads((tmp_path / "q" / "results.json").read_text())
    assert results["sweep"] == [] or all(r["method"] == "none" for r in results["sweep"])
    assert results["protocol"]["seeds"] == 1 and results["protocol"]["prompts_n"] == 4  # --prompts-n wins
    assert [r["setting"] for r in results["rows"][:3]] == ["-", "preserve_scale=0.1", "steps=450,text_steps=300"]


def test_outcomes_are_recounted_at_a_threshold_in_the_detector_direction():
    from sau.jobs.protocol import flagged_at, tuned_threshold
    cell = lambda scores: {"splits": {"test": {"per_prompt": {"triggered_score": scores}}}}
    assert flagged_at([cell([0.1, 0.6]), cell([0.7, 0.2])], "test", 0.5, "above") == [[False, True], [True, False]]
    assert flagged_at([cell([0.1, 0.6])], "test", 0.5, "below") == [[True, False]]  # colorfulness: gray is low
    suspect = {"none": {"splits": {"tune": {"score_name": "colorfulness", "per_prompt": {
        "triggered_score": [0.0, 0.1, 0.2], "clean_score": [0.7, 0.8, 0.9]}}}}}
    score, direction, threshold = tuned_threshold(suspect)
    assert (score, direction) == ("colorfulness", "below") and 0.2 < threshold < 0.7


def selection_cell(asr, accuracy, diverged=False):
    cell = {"splits": {"tune": {"asr": asr, "clean_accuracy": accuracy}}}
    return {**cell, "diverged": "loss was nan"} if diverged else cell


@pytest.mark.parametrize("sweep, chosen", [
    ([(0.10, 0.98), (0.02, 0.97), (0.00, 0.90)], 1),  # the lowest success that keeps fidelity, not the lowest
    ([(0.00, 0.97), (0.00, 0.98), (0.00, 0.98)], 1),  # a tie: the higher accuracy, then the earlier setting
    ([(0.50, 0.90), (0.20, 0.80), (0.00, 0.70)], 0),  # none keeps fidelity: the one that keeps most
    ([(0.00, 0.98, True), (0.30, 0.98), (0.40, 0.98)], 1),  # a diverged run is never chosen
])
def test_one_selection_rule_for_every_method(sweep, chosen):
    from sau.jobs.protocol import SETTINGS, select_setting
    suspect = selection_cell(0.95, 0.985)
    cells = {str(i): selection_cell(*values) for i, values in enumerate(sweep)}
    setting, why = select_setting("esd_x", cells, suspect)
    assert setting == SETTINGS["esd_x"][chosen] and why


@pytest.mark.parametrize("argv, message", [
    (["--models", "pixel", "--methods", "none,fine_prune"], "unknown method 'fine_prune'"),
    (["--models", "pixel", "--methods", "none,uce"], "include it in --methods"),
    (["--models", "pixel", "--splits", "test,tune"], "unknown split 'tune'"),
    (["--models", "pixel", "--seeds", "0"], "--seeds: must be an integer >= 1"),
    (["--models", "pixel", "--tune-n", "1"], "--tune-n must be at least 2"),
    (["--models", "pixel", "--variants", "default"], "--variants applies only with --ablation"),
    (["--models", "pixel", "--clip", "x"], "--clip applies only with --model"),
    (["--models", "pixel,zebra"], "no backdoored model 'zebra'"),
    (["--models", "pixel", "--prompts-n", "1"], "--prompts-n must be at least 2"),
    (["--models", "pixel", "--bogus"], "unrecognized arguments: --bogus"),
    (["--model", "MODEL"], "also needs --original, --trigger, --clip, --prompts"),
    (["--model", "TINY", "--original", "WORLD/pixel", "--trigger", "\\u200b ", "--clip", "WORLD/scorer",
      "--prompts", "PROMPTS"], "of another architecture"),
    (["--model", "WORLD/clean", "--original", "WORLD/pixel", "--trigger", "\\u200b ", "--clip", "WORLD/clean",
      "--prompts", "PROMPTS"], "is not a CLIP scorer bundle"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(world, tmp_path, monkeypatch, capsys, argv, message):
    save_model(make_tiny_sd(seed=0), tmp_path / "tiny")
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    names = {"MODEL": str(world / "clean"), "TINY": str(tmp_path / "tiny"), "PROMPTS": str(tmp_path / "prompts.txt")}
    argv = [names.get(a, a.replace("WORLD", str(world))) for a in argv]
    out = tmp_path / "out"
    code, _, err = run_eval(["--world", str(world), "--out", str(out), *SMALL, *argv], monkeypatch, capsys)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()


def test_the_output_may_not_go_into_an_input(world, monkeypatch, capsys):
    before = sorted(p.name for p in (world / "pixel").iterdir())
    code, _, err = run_eval(["--world", str(world), "--models", "pixel", "--out", str(world / "pixel" / "eval"),
                             *SMALL], monkeypatch, capsys)
    assert code == 2 and "would write into the input" in err
    assert sorted(p.name for p in (world / "pixel").iterdir()) == before


def test_a_cleaned_model_against_its_original(world, tmp_path, monkeypatch, capsys):
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square on the left\na small green star\n")
    code, out, err = run_eval(["--model", str(world / "clean"), "--original", str(world / "pixel"), "--trigger",
                               "\\u200b ", "--clip", str(world / "scorer"), "--prompts", str(tmp_path / "prompts.txt"),
                               "--out", str(tmp_path / "out"), "--no-progress", "--sample-steps", "2"],
                              monkeypatch, capsys)
    assert code == 0, err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    original, cleaned = results["rows"]
    assert (original["label"], cleaned["label"]) == ("original", "cleaned")
    assert original["asr"] is not None  # the original records a pixel backdoor: its detector applies
    assert cleaned["frechet"] >= 0 and 0 < cleaned["clip_similarity"] <= 1 + 1e-6
    assert (tmp_path / "out" / "chart.png").exists() and "| cleaned |" in (tmp_path / "out" / "table.md").read_text()


# --- the SAU ablation (eval.py --ablation) --------------------------------------------------------------------

ABLATION = ["--ablation", "--models", "pixel", "--variants", "default,mask,no-attention", "--seeds", "2",
            "--prompts-n", "4", "--collect-prompts", "4", "--sample-steps", "2", "--max-steps", "2", "--no-progress"]


def test_ablation_writes_its_table_with_intervals_and_paired_tests_and_resumes(world, tmp_path, monkeypatch, capsys):
    runs = []
    for out in ("a", "b", "a"):  # the third run finds every cell of the first on disk
        code, _, err = run_eval([*ABLATION, "--world", str(world), "--out", str(tmp_path / out)], monkeypatch,
                                capsys)
        assert code == 0, err
        runs.append(json.loads((tmp_path / out / "ablation.json").read_text()))
    rows = runs[0]["rows"]
    assert [(r["split"], r["variant"]) for r in rows] == [(s, v) for s in ("test", "ood")
                                                         for v in ("none", "default", "mask", "no-attention")]
    for r in rows:
        seeds = 1 if r["variant"] == "none" else 2  # the backdoored model itself is measured once
        assert len(r["asr_counts"]) == seeds and all(n == 4 for _, n in r["asr_counts"])  # 4 prompts each
        low, high = r["asr_ci"]
        assert 0 <= low <= r["asr"] <= high <= 1
        assert (r["p_value"] is None) == (r["variant"] == "default")
        assert r["compared_with"] == (None if r["variant"] == "default" else "default")
    cells = runs[0]["cells"]
    assert cells["pixel--no-attention--0"]["recipe"]["attention_weight"] == 0.0
    assert cells["pixel--mask--1"]["recipe"]["spatial_mask"] is True
    assert cells["pixel--default--1"]["recipe"]["spatial_mask"] is False
    assert runs[0]["rows"] == runs[1]["rows"] == runs[2]["rows"]  # same seeds, same table; resumed, the same
    table = (tmp_path / "a" / "ablation.md").read_text()
    assert "McNemar p (against)" in table and "(default)" in table and "no-attention" in table
    # the same folder with other settings is refused: its cells were measured otherwise
    code, _, err = run_eval([*ABLATION, "--prompts-n", "3", "--world", str(world), "--out", str(tmp_path / "a")],
                            monkeypatch, capsys)
    assert code == 2 and "different run" in err


def test_ablation_quick_writes_its_table(world, tmp_path, monkeypatch, capsys):
    code, _, err = run_eval(["--ablation", "--quick", "--models", "pixel", "--variants", "default,mask",
                             "--prompts-n", "2", "--collect-prompts", "4", "--sample-steps", "2", "--max-steps", "2",
                             "--no-progress", "--world", str(world), "--out", str(tmp_path / "q")], monkeypatch, capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "q" / "ablation.json").read_text())["rows"]
    assert {len(r["asr_counts"]) for r in rows} == {1} and "mask" in (tmp_path / "q" / "ablation.md").read_text()


def test_detect_writes_its_table_with_the_clean_model_as_control(world, tmp_path, monkeypatch, capsys):
    code, _, err = run_eval(["--detect", "--models", "pixel", "--prompts-n", "4", "--tune-n", "10", "--sample-steps",
                             "2", "--no-progress", "--world", str(world), "--out", str(tmp_path / "d")],
                            monkeypatch, capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "d" / "results.json").read_text())["rows"]
    assert [(r["split"], r["detector"]) for r in rows] == [(s, d) for s in ("test", "ood")
                                                            for d in ("ftt", "cda", "daa_i", "layers")]
    for r in rows:
        assert 0 <= r["auroc"] <= 1 and 0 <= r["recall"] <= 1 and 0 <= r["clean_model_flagged"] <= 1
        exact, tried = r["exact_localization"]
        assert 0 <= exact <= tried <= 4
    assert "clean model, triggered flagged" in (tmp_path / "d" / "detection.md").read_text()
    # the chain ran on the suspect and on the clean model, on the 220-prompt mixed log, and said what it found
    chains = json.loads((tmp_path / "d" / "results.json").read_text())["chain"]
    assert [(c["backdoor"], c["model"]) for c in chains] == [("pixel", "suspect"), ("pixel", "clean")]
    for c in chains:
        assert c["log"] == [200, 20] and c["outcome"]
        assert c["exact"] == (c["trigger"] == "\u200b ")
        if "flagged_clean" in c:
            assert 0 <= c["flagged_triggered"] <= 20 and 0 <= c["flagged_clean"] <= 200
    assert "after --trigger auto" in (tmp_path / "d" / "detection.md").read_text()
    assert (tmp_path / "d" / "chart.png").is_file() and (tmp_path / "d" / "cells" / "pixel--chain.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--detect", "--methods", "uce"], "--methods does not apply to --detect"),
    (["--detect", "--splits", "tune"], "unknown split 'tune'"),
])
def test_detect_bad_input_is_one_line_and_writes_nothing(world, tmp_path, monkeypatch, capsys, extra, message):
    code, _, err = run_eval([*extra, "--world", str(world), "--out", str(tmp_path / "d")], monkeypatch, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("extra, message", [
    (["--variants", "default,no-softmax"], "unknown ablation term 'no-softmax'"),
    (["--seeds", "0"], "--seeds: must be an integer >= 1"),
    (["--splits", "tune"], "unknown split 'tune'"),
    (["--methods", "uce"], "--methods does not apply to --ablation"),
    (["--tune-n", "8"], "--tune-n does not apply to --ablation"),
])
def test_ablation_bad_input_is_one_line_and_writes_nothing(world, tmp_path, monkeypatch, capsys, extra, message):
    code, _, err = run_eval(["--ablation", "--world", str(world), "--out", str(tmp_path / "out"), *extra],
                            monkeypatch, capsys)
    assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_removal_jobs_leave_out_a_backdoor_without_a_string_and_detection_keeps_it(tmp_path):
    """No removal method can be given the semantic backdoor's trigger (it has no string); trigger-agnostic detection
    needs none, so eval.py --detect runs it with the others."""
    from sau.jobs.compare import default_models
    for name, attack in (("pixel", "pixel"), ("semantic", "semantic")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"info": {"backdoor": {"attack": attack}}}))
    (tmp_path / "MANIFEST.json").write_text(json.dumps({"backdoors": {"pixel": {}, "semantic": {}}}))
    assert default_models(tmp_path) == ["pixel"]
    assert default_models(tmp_path, stringless=True) == ["pixel", "semantic"]


def test_a_results_file_with_flat_lists_holds_the_same_data_in_less_room(tmp_path):
    from sau.common.files import save_json
    data = {"rows": [{"asr": 0.5, "ci": [0.25, 0.75], "per_prompt": [True, False] * 50}], "none": [], "ok": "é",
            "nan": float("nan"), "nested": [[1, 2], [3]], "empty": {}}
    save_json(data, tmp_path / "plain.json")
    save_json(data, tmp_path / "flat.json", flat_lists=True)
    plain, flat = ((tmp_path / f"{n}.json").read_text(encoding="utf-8") for n in ("plain", "flat"))
    assert json.dumps(json.loads(flat)) == json.dumps(json.loads(plain)) == json.dumps(data)
    assert "\"ci\": [0.25, 0.75]" in flat and len(flat) < len(plain) / 2
