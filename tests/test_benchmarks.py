"""The benchmark commands, at tiny size: they run end to end and their tables have the promised structure.
(No timing is asserted: timings belong to the README's table, not to tests.)"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from benchmarks import __main__ as cpu_benchmark  # noqa: E402
from benchmarks import gpu as gpu_benchmark  # noqa: E402
from benchmarks import memory as memory_benchmark  # noqa: E402
from benchmarks.harness import cpu_memory_supported  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = {"unet forward", "unet forward, attn2 captured", "SAU step (fwd+bwd, attn2)", "VAE decode"}


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "cpu.json"
    report = cpu_benchmark.main(["--quick", "--sample-steps", "2", "--json", str(path)])
    return report, path


def test_cpu_table_has_every_row_for_every_size_and_dtype(quick_report):
    report, _ = quick_report
    rows = report["rows"]
    for dtype in ("float32", "bfloat16"):
        for size in cpu_benchmark.QUICK_SIZES:
            cases = {r["case"] for r in rows if r["dtype"] == dtype and r["size"] == size}
            assert cases - {"sampling, 2 steps + decode"} == CASES
        assert {r["case"] for r in rows if r["dtype"] == dtype and r["size"] == "-"} == {"text encode"}
        assert [r["size"] for r in rows if r["dtype"] == dtype and r["case"].startswith("sampling")] == [8]
    for r in rows:
        assert len(r["sau_times"]) == len(r["diffusers_times"]) == report["repeats"]
        assert r["sau_s"] > 0 and r["diffusers_s"] > 0 and math.isclose(r["ratio"], r["sau_s"] / r["diffusers_s"])
        assert r["sau_peak_mib"] is None or r["sau_peak_mib"] >= 0


def test_both_implementations_compute_the_same_thing(quick_report):
    """Same weights, same inputs: in float32 the outputs agree as closely as the parity tests demand."""
    rows = quick_report[0]["rows"]
    assert all(r["rel_diff"] <= 1e-4 for r in rows if r["dtype"] == "float32")
    captured = [r for r in rows if r["case"] == "unet forward, attn2 captured"]
    assert all(r["layers_captured"] == {"sau": 11, "diffusers": 11} for r in captured)  # the tiny UNet's attn2 layers
    bf16 = [r for r in rows if r["dtype"] == "bfloat16" and r["case"] == "unet forward"]
    assert all(0 < r["vs_fp32_rel_err"] < 0.1 for r in bf16)


def test_report_is_written_and_lists_the_checks(quick_report):
    report, path = quick_report
    written = json.loads(path.read_text())
    assert written["rows"] == json.loads(json.dumps(report["rows"]))
    assert written["machine"]["cores"] >= 1 and written["command"].startswith("python -m benchmarks --quick")
    names = [c["check"] for c in written["checks"]]
    assert sum("sau/diffusers" in n for n in names) == 2 and sum("overhead" in n for n in names) == 2
    assert sum("speed-up" in n for n in names) == 2 and sum("relative error" in n for n in names) == 2
    assert all(isinstance(c["pass"], bool) for c in written["checks"])


@pytest.mark.filterwarnings("ignore:prompt .* tokens long")  # the tiny text encoder has 16 positions
def test_gpu_script_runs_on_a_cpu_at_tiny_size(tmp_path):
    report = gpu_benchmark.main(["--quick", "--device", "cpu", "--repeats", "1", "--batch", "2",
                                 "--json", str(tmp_path / "gpu.json")])
    assert {r["case"] for r in report["rows"]} == CASES | {"text encode", "sampling, 4 steps + decode"}
    assert report["sampling"]["sau_images_per_s"] > 0 and report["sampling"]["diffusers_images_per_s"] > 0
    runs = report["sau_runs"]
    assert list(runs) == ["paper", "default"]
    for recipe, run in runs.items():
        assert run["recipe"] == recipe and run["prompts"] == 12 and run["unlearn_steps"] == 4
        assert math.isfinite(run["final_loss"])
    assert json.loads((tmp_path / "gpu.json").read_text())["sau_runs"] == runs


def test_bad_arguments_are_one_line_errors(tmp_path):
    out = tmp_path / "never.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks", "--sizes", "12", "--json", str(out)],
                         capture_output=True, text=True, cwd=ROOT)  # 12: SD's UNet halves three times
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "error: latent sizes must be multiples of 8 for this model"]
    assert not out.exists()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            gpu_benchmark.parse([])


@pytest.mark.skipif(not cpu_memory_supported(), reason="reads the resident peak from Linux's /proc")
def test_memory_benchmark_projects_the_full_batch_from_two_small_ones(tmp_path):
    report = memory_benchmark.main(["--models", "tiny", "--json", str(tmp_path / "memory.json")])
    group = report["groups"][0]
    assert [c["batch"] for c in group["cases"]] == [1, 2] and all(c["added_mib"] > 0 for c in group["cases"])
    projected, check = group["projection"], group["check"]
    assert projected["batch"] == check["batch"] == memory_benchmark.FULL_BATCH
    measured_total = check["resident_mib"] + check["added_mib"]
    assert abs(projected["total_mib"] - measured_total) < 0.2 * measured_total
    assert json.loads((tmp_path / "memory.json").read_text())["groups"][0]["projection"] == projected


def test_scale_launches_measure_generation_and_unlearning_at_two_processes():
    """benchmarks.scale's launcher, at 2 processes (torchrun) and a few images and steps: positive rates."""
    from argparse import Namespace
    from benchmarks import scale
    args = Namespace(model="demo", prompts=16, chunk=8, steps=2, side=None, unlearn_steps=2, threads=1, device="cpu")
    for work in ("generate", "unlearn"):
        assert scale.launch(2, work, args) > 0


def test_scale_generates_on_a_random_model_of_a_real_topology():
    """--model sd1's path (random weights of SD's topology, everyday prompts), here on the tiny topology."""
    from benchmarks import scale
    assert scale.measure_generation("tiny", prompts=2, steps=2, dtype="float32", compiled=False, chunk=1) > 0


def test_sharding_reports_every_process_of_an_fsdp_launch():
    """benchmarks.sharding on the tiny topology under --fsdp: both processes measured, memory added by each."""
    if not cpu_memory_supported():
        pytest.skip("needs Linux's /proc")
    from benchmarks import sharding
    ranks = sharding.launch("tiny", 2, True, 1)
    assert sorted(r["rank"] for r in ranks) == [0, 1] and all(r["added_mib"] > 0 for r in ranks)
