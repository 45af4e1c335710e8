"""torchrun with two gloo processes on the CPU (sau/distributed.py): sharded generation equals one process bit for
bit, data-parallel unlearning makes one process's updates, only rank 0 writes, a failing rank stops the launch,
and bad input is refused before any work."""
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from sau.common.run_folder import hold_lock

WORKER = ROOT / "tests" / "distributed_worker.py"
ENV = {"OMP_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def torchrun(*args, processes=2, env=None, timeout=300):
    """`torchrun --standalone --nproc_per_node N ARGS` as the shell runs it: the CompletedProcess."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**ENV, **(env or {})},
                          timeout=timeout)


def python(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env={**ENV, **(env or {})}, timeout=timeout)


def both(mode, tmp_path):
    """The worker's tensors from one plain process and from two torchrun processes."""
    one, two = tmp_path / "one", tmp_path / "two"
    single = python(WORKER, mode, one)
    assert single.returncode == 0, single.stderr[-2000:]
    launched = torchrun(WORKER, mode, two)
    assert launched.returncode == 0, launched.stderr[-3000:]
    return load_file(one / f"{mode}.safetensors"), load_file(two / f"{mode}.safetensors")


def test_sharded_generation_equals_one_process(tmp_path):
    single, sharded = both("generate", tmp_path)
    assert sorted(single) == sorted(sharded) and any(k.startswith("heat.") for k in single)
    for name in single:  # images (7 prompts in chunks of 2), collected latents and heatmaps (chunks of 3)
        assert torch.equal(single[name], sharded[name]), name


def relative(a, b):
    return ((a.double() - b.double()).norm() / a.double().norm().clamp_min(1e-30)).item()


def test_ddp_steps_equal_one_process(tmp_path):
    """5 UNet and 5 text-encoder steps on a global batch of 8, as 2 x 4 rows: the same weights within 1e-5."""
    from conftest import make_tiny_sd
    start = make_tiny_sd()
    single, sharded = both("unlearn", tmp_path)
    for module, model in (("unet", start.unet), ("text", start.text_encoder)):
        names = [k for k in single if k.startswith(module + ".")]
        a = torch.cat([single[k].flatten() for k in names])
        b = torch.cat([sharded[k].flatten() for k in names])
        initial = torch.cat([model.state_dict()[k[len(module) + 1:]].flatten() for k in names])
        assert relative(a, b) <= 1e-5
        assert (a - initial).norm() > 1e3 * (a - b).norm()  # the steps moved the weights far more than they differ
    for name in single:
        # A key projection's bias cannot change any softmax, so its gradient is zero up to float noise, and
        # AdamW's normalised step turns that noise into lr-sized moves of arbitrary sign: left out here.
        if ".k_proj.bias" not in name:
            assert relative(single[name], sharded[name]) <= 1e-5, name


def test_fsdp_steps_equal_one_process_and_resume(tmp_path):
    """--fsdp: the UNet route's 5 steps with the UNet, its gradients and AdamW state sharded over 2 processes;
    a second launch in the same folder resumes from the gathered checkpoint (nothing left to train) to the same
    weights."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert python(WORKER, "unlearn_sharded", one).returncode == 0
    for launch in ("first", "resumed"):
        result = torchrun(WORKER, "unlearn_sharded", two)
        assert result.returncode == 0, result.stderr[-3000:]
        (two / f"{launch}.safetensors").write_bytes((two / "unlearn_sharded.safetensors").read_bytes())
    single, first, resumed = (load_file(p) for p in (one / "unlearn_sharded.safetensors",
                                                      two / "first.safetensors", two / "resumed.safetensors"))
    for name in single:
        assert relative(single[name], first[name]) <= 1e-5, name
        assert torch.equal(first[name], resumed[name]), name


AUDIT = '''
import os, sys
ROOT = os.environ["SAU_AUDIT_ROOT"]
WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def _written(event, args):
    if event == "open":
        path, mode, flags = args
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITING)
    elif event in ("os.rename", "os.mkdir", "os.remove", "shutil.rmtree"):
        path, writes = args[0], True
    else:
        return
    if writes and isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).startswith(ROOT):
        sys.__stderr__.write(f"AUDIT rank={os.environ.get('RANK')} {event} {os.fsdecode(path)}\\n")
sys.addaudithook(_written)
'''


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """A folder holding a sitecustomize.py that reports every write under SAU_AUDIT_ROOT on stderr."""
    folder = tmp_path_factory.mktemp("audit")
    (folder / "sitecustomize.py").write_text(AUDIT)
    return folder


def test_unlearn_under_torchrun_only_rank_zero_writes(tmp_path, tiny_bundle, audited):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"\u200b {p}\n" for p in ["a red circle", "a blue square", "a green star",
                                                             "a yellow cross"]))
    out = tmp_path / "out"
    env = {"PYTHONPATH": str(audited), "SAU_AUDIT_ROOT": str(tmp_path / "out")}
    result = torchrun("unlearn.py", "--model", tiny_bundle, "--trigger", "\\u200b", "--prompts", prompts,
                      "--steps", 2, "--out", out, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    writes = [line.split(" ", 3) for line in result.stderr.splitlines() if line.startswith("AUDIT ")]
    assert writes and all(rank == "rank=0" for _, rank, _, _ in writes), [w for w in writes if w[1] != "rank=0"]
    for name in ("model", "report.json", "report.md", "heatmaps.png", "run.json", "checkpoints"):
        assert (out / name).exists(), name
    assert result.stdout.count("wrote ") == 1  # messages from rank 0 only


def test_a_failing_rank_stops_the_launch_with_its_line(tmp_path):
    started = time.time()
    result = torchrun(WORKER, "fail", tmp_path, timeout=120)
    assert result.returncode != 0 and time.time() - started < 60
    assert "error: rank 1 failed: RuntimeError: rank one's deliberate failure" in result.stderr


def test_bad_launches_are_refused_before_any_work(tmp_path, tiny_bundle):
    out = tmp_path / "out"
    common = ["unlearn.py", "--model", tiny_bundle, "--trigger", "\\u200b", "--out", out]
    for fsdp in (python(*common, "--fsdp"), python("train.py", "backdoor", "--attack", "pixel", "--model", tiny_bundle,
                                                   "--out", tmp_path / "b", "--fsdp")):
        assert fsdp.returncode == 2 and fsdp.stderr.strip().splitlines() == [
            "error: --fsdp shards the UNet across processes: launch with torchrun --nproc_per_node N"]
    nccl = python(*common, "--backend", "nccl")  # this machine has no CUDA
    assert nccl.returncode == 2 and nccl.stderr.strip().splitlines() == [
        "error: the nccl backend needs CUDA, and this machine has no CUDA device; use gloo (the default on the CPU)"]
    uneven = torchrun(*common, processes=3, timeout=120)
    assert uneven.returncode != 0
    errors = [line for line in uneven.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: rank 0 failed: 3 processes cannot split the recipe's batch of 8 evenly; launch a "
                      "number of processes that divides 8"]  # rank 0's line only, whichever rank got there first
    with hold_lock(out):  # another launch writing the same --out
        second = torchrun(*common, timeout=120)
    assert second.returncode != 0 and "rank 0 failed" in second.stderr and "in use" in second.stderr
    assert not (out / "run.json").exists() and not (out / "model").exists() and not (tmp_path / "b").exists()


def test_train_backdoor_under_torchrun_trains_what_one_process_trains(tmp_path, tiny_bundle):
    """BadT2I's pixel backdoor, 3 steps of a global batch of 4 as 2 x 2 rows, with DDP and with --fsdp (the
    trained copy and the frozen teacher sharded): the weights one process makes."""
    from sau import load
    made = {}
    for name, launch, flags in (("one", python, []), ("two", torchrun, []), ("fsdp", torchrun, ["--fsdp"])):
        result = launch("train.py", "backdoor", "--attack", "pixel", "--model", tiny_bundle, "--out", tmp_path / name,
                        "--steps", 3, "--batch-size", 4, "--run-dir", tmp_path / f"run-{name}", "--device", "cpu",
                        *flags)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("backdoored model written") == 1
        made[name] = load(tmp_path / name, dtype=torch.float32).unet.state_dict()
    initial = load(tiny_bundle, dtype=torch.float32).unet.state_dict()
    one, start = (torch.cat([m[k].flatten() for k in sorted(made["one"])]) for m in (made["one"], initial))
    for name in ("two", "fsdp"):
        other = torch.cat([made[name][k].flatten() for k in sorted(made["one"])])
        assert relative(one, other) <= 1e-3, name  # stored in fp16, as the input was: within its rounding
        assert (one - start).norm() > 1e3 * (one - other).norm(), name  # the steps moved it far more than that


@pytest.fixture(scope="module")
def stand_in_world(tmp_path_factory):
    """tests/test_eval.py's stand-in demo world: random weights, 2-step pixel and TPA backdoors."""
    from test_eval import world
    return world.__wrapped__(tmp_path_factory)


EVAL_RUNS = {  # eval.py's jobs, small; the outputs that involve no training must match to the last digit
    "protocol": ["--quick", "--models", "pixel", "--methods", "none,uce,sau_default", "--prompts-n", "4",
                 "--collect-prompts", "4", "--sample-steps", "2", "--max-steps", "2"],
    "ablation": ["--ablation", "--quick", "--models", "pixel", "--variants", "default", "--prompts-n", "4",
                 "--collect-prompts", "4", "--sample-steps", "2", "--max-steps", "2"],
    "detect": ["--detect", "--models", "pixel", "--prompts-n", "4", "--tune-n", "10", "--sample-steps", "2"],
}


@pytest.mark.parametrize("job", list(EVAL_RUNS))
def test_eval_under_torchrun_writes_what_one_process_writes(job, stand_in_world, tmp_path):
    import json
    args = ["eval.py", "--world", stand_in_world, "--no-progress", *EVAL_RUNS[job]]
    one, two = python(*args, "--out", tmp_path / "one"), torchrun(*args, "--out", tmp_path / "two")
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
    files = {name: sorted(str(p.relative_to(tmp_path / name)) for p in (tmp_path / name).rglob("*") if p.is_file())
             for name in ("one", "two")}
    assert files["one"] == files["two"]
    untrained = [f for f in files["one"] if f.endswith(("--none.json", "--uce--preserve_scale=0.1--seed-0.json",
                                                         "pixel.json", "pixel--chain.json"))]
    assert untrained
    for name in untrained:  # no removal, UCE's closed form, the detectors and the chain: generation only
        a, b = (without_timings(json.loads((tmp_path / run / name).read_text())) for run in ("one", "two"))
        assert a == b, name


def without_timings(value):
    """A JSON value with every timing left out (keys naming seconds or wall time)."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if "seconds" not in k and not k.startswith("wall")}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value
