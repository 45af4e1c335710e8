"""How the benchmarks measure: interleaved timed runs with their median, peak memory per call, and the table.

Timing. Each row runs one callable per implementation. All of them run once untimed (the warm-up, which is
also where memory is measured), then `repeats` rounds in which each runs once, the order alternating between
rounds so that a slow drift of the machine (heat, another process) is shared fairly. The row reports medians.

Memory. On CUDA: torch's peak allocated bytes during the call, over what was allocated before it. On a CPU:
the growth of the process's resident set during the call, i.e. the kernel's high-water mark (VmHWM, reset
through /proc/self/clear_refs just before the call) minus the resident size before it, after glibc has
returned its cached free memory to the system (malloc_trim). That counts everything the call makes resident:
tensors, allocator slack, kernel workspaces, compiled code. Model weights existing before the call do not count.
"""
import ctypes
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from sau.common.files import save_json

MIB = 2 ** 20


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# --- memory ---------------------------------------------------------------------------------------------

def _status_kib(field):
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)[1])


def resident_mib():
    """This process's resident memory now, in MiB (Linux)."""
    return _status_kib("VmRSS") / 1024


def _trim_malloc():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline may then include cached free memory
        pass


def cpu_memory_supported():
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


_highest_cuda = [0]  # the highest CUDA allocation seen by peak_memory, weights included (its resets hide it)


def highest_cuda_mib():
    return _highest_cuda[0] / MIB


def peak_memory(fn, device):
    """(fn(), peak MiB that the call added), measured as the module docstring says; None where unsupported."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        _highest_cuda[0] = max(_highest_cuda[0], torch.cuda.max_memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device)
        _highest_cuda[0] = max(_highest_cuda[0], peak)
        return result, (peak - before) / MIB
    if not cpu_memory_supported():
        return fn(), None
    _trim_malloc()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    before = _status_kib("VmRSS")
    result = fn()
    return result, (_status_kib("VmHWM") - before) / 1024


# --- timing ---------------------------------------------------------------------------------------------

def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def interleaved(fns, repeats, device, first_call=None):
    """Time each of {name: callable} `repeats` times, interleaved, after one warm-up call each.

    first_call: names whose first call compiles; their first call is timed and reported as compile time
    (it includes one run), and a second warm-up call measures memory.
    Returns {name: {"median_s", "times", "peak_mib", "compile_s", "output"}} (output: the warm-up's result).
    """
    results = {}
    for name, fn in fns.items():
        compile_s = None
        if first_call and name in first_call:
            _, compile_s = timed(fn, device)
        output, peak = peak_memory(fn, device)
        results[name] = {"times": [], "peak_mib": peak, "compile_s": compile_s, "output": output}
    names = list(fns)
    for round_ in range(repeats):
        for name in (names if round_ % 2 == 0 else reversed(names)):
            _, seconds = timed(fns[name], device)
            results[name]["times"].append(seconds)
    for r in results.values():
        r["median_s"] = statistics.median(r["times"])
    return results


def rel_err(ours, ref):
    """max |ours - ref| / max |ref|, in float32: the measure the parity tests use."""
    ours, ref = ours.detach().float(), ref.detach().float()
    return ((ours - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


# --- the machine and the table --------------------------------------------------------------------------

def machine():
    cpu = platform.processor() or platform.machine()
    try:
        model = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = model[1].strip() if model else cpu
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now().astimezone().isoformat("T", "seconds")}
    for package in ("diffusers", "transformers"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


COLUMNS = [("case", "case", "{}"), ("size", "latents", "{}"), ("dtype", "dtype", "{}"),
           ("sau_s", "sau s", "{:.3f}"), ("diffusers_s", "diffusers s", "{:.3f}"), ("ratio", "sau/diffusers", "{:.2f}"),
           ("sau_peak_mib", "sau peak MiB", "{:.0f}"), ("diffusers_peak_mib", "diffusers peak MiB", "{:.0f}"),
           ("rel_diff", "max rel diff", "{:.1e}"), ("sau_compile_s", "sau compile s", "{:.0f}"),
           ("diffusers_compile_s", "diffusers compile s", "{:.0f}")]


def table(rows):
    """A Markdown table of the rows; columns no row has are left out."""
    columns = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |",
             "|" + "|".join("---" if key in ("case", "dtype") else "--:" for key, _, _ in columns) + "|"]
    for r in rows:
        cells = [fmt.format(r[key]) if r.get(key) is not None else "" for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def publish(report, text, path):
    """Print a benchmark's table, then write its report (every timing) as JSON to `path`."""
    print(text)
    save_json(report, path)
    print(f"\nwrote {path} ({report['wall_s']:.0f} s)")


# --- one launch of a benchmark's worker -------------------------------------------------------------------

def launch(module, flags, processes, threads, what):
    """`python -m module FLAGS` as a fresh process, or under `torchrun --standalone` with `processes` of them,
    `threads` torch threads each; the JSON its rank 0 printed on a `RESULT ` line. RuntimeError naming `what`."""
    prefix = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      f"--nproc_per_node={processes}"]
    done = subprocess.run([*prefix, "-m", module, *flags], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)}, cwd=Path(__file__).parent.parent)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{what} at {processes} processes failed:\n{done.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])
