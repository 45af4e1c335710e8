"""The four command-line tools answer bad input the same way: one line `error: ...` on stderr, exit status 2,
no traceback; and they share one dtype vocabulary. Every bad input here fails before any model loads."""
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from sau.common import cli

ROOT = Path(__file__).resolve().parents[1]
CLIS = ("unlearn.py", "eval.py", "train.py", "weights_convert.py")


def run_tool(*args, cwd):
    """A tool as the shell runs it: (exit status, stderr)."""
    result = subprocess.run([sys.executable, str(ROOT / args[0]), *map(str, args[1:])], capture_output=True,
                            text=True, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    return result.returncode, result.stderr


def assert_one_error_line(code, err, phrase):
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert phrase in err, err


@pytest.mark.parametrize("args, phrase", [
    (["unlearn.py", "--model", "MISSING", "--out", "OUT"], "no-such-model"),  # the message names the path
    (["eval.py", "--methods", "none,fine_prune", "--out", "OUT"], "unknown method 'fine_prune'"),
    (["train.py", "backdoor", "--attack", "pixel", "--model", "MISSING", "--out", "OUT", "--device", "cpu"],
     "no-such-model"),
    (["weights_convert.py", "MISSING", "OUT"], "no-such-model"),
    (["unlearn.py", "--dtype", "float64"], "invalid choice: 'float64'"),
    (["train.py", "backdoor", "--attack", "pixel", "--model", "demo", "--out", "OUT", "--dtype", "bf16"],
     "invalid choice: 'bf16'"),
    (["weights_convert.py", "MISSING", "OUT", "--dtype", "fp16"], "invalid choice: 'fp16'"),
    (["train.py", "bogus"], "invalid choice: 'bogus'"),
], ids=["unlearn-missing-model", "eval-unknown-method", "train-missing-model", "convert-missing-input",
        "unlearn-float64", "train-old-dtype-name", "convert-old-dtype-name", "train-unknown-command"])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, args, phrase):
    names = {"MISSING": tmp_path / "no-such-model", "OUT": tmp_path / "out"}
    code, err = run_tool(*[names.get(a, a) for a in args], cwd=tmp_path)
    assert_one_error_line(code, err, phrase)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tool", CLIS)
def test_help_works_and_names_dtypes_as_torch_does(tool, monkeypatch, capsys):
    argv = [tool, "backdoor", "--help"] if tool == "train.py" else [tool, "--help"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / tool), run_name="__main__")
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("usage: ")
    assert "--dtype {float32,bfloat16" in out
    assert not any(old in out for old in ("fp16", "bf16", "fp32", "--bf16")), out


def test_the_tools_are_thin():
    for tool in CLIS:
        assert len((ROOT / tool).read_text().splitlines()) <= 150, tool


def test_run_turns_user_errors_into_one_line_and_ctrl_c_into_130(capsys):
    def raise_(error):
        raise error
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda: raise_(ValueError("first line\nsecond line")))
    assert exit_info.value.code == 2 and capsys.readouterr().err == "error: first line\n"
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda: raise_(KeyboardInterrupt()))
    assert exit_info.value.code == 130 and "run the same command again to resume" in capsys.readouterr().err
    with pytest.raises(RuntimeError):  # a bug is not bad input: its traceback stays
        cli.run(lambda: raise_(RuntimeError("a bug")))


def test_device_names_are_checked_when_parsed(capsys):
    parser = cli.Parser(prog="tool")
    parser.add_argument("--device", type=cli.device)
    assert parser.parse_args(["--device", "cpu"]).device == "cpu"
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--device", "gpu0"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: argument --device:") and err.count("\n") == 1
