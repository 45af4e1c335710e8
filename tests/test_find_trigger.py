"""The trigger-agnostic chain (sau/find_trigger.py, `unlearn.py --trigger auto`): flagging, the vote and its
refusals on scores with a known answer, readable tokens, the built-in mixed log, and on the shipped
hidden-trigger demo model the whole chain, which must recover the zero-width-space trigger byte for byte."""
import json

import pytest
import torch

from sau import find_trigger as ft
from sau.attacks.backdoor import Backdoor
from sau.common.files import DEMO_DIR
from sau.evaluation.splits import mixed_log, split_prompts
from sau.models.tokenizer import Tokenizer, readable

from conftest import unlearn

PIXEL = Backdoor("pixel", "\u200b ", "checkerboard", "")


# --- flag, vote, check ------------------------------------------------------------------------------------------

def test_flagged_prompts_come_highest_score_first():
    assert ft.flag([0.5, 3.0, 2.0, 0.1], threshold=1.0) == [1, 2]


def test_nothing_flagged_is_an_answer_and_everything_flagged_is_refused():
    with pytest.raises(ft.NoTriggerFound, match="no prompt of the 3 in the log is flagged"):
        ft.flag([0.1, 0.2, 0.3], threshold=1.0)
    with pytest.raises(ValueError, match=r"every prompt of the log is flagged \(3 of 3\): the detector cannot "):
        ft.flag([2.0, 3.0, 4.0], threshold=1.0)


def test_the_string_most_flagged_prompts_agree_on_wins():
    votes = {"\u200b ": [4, 9, 12], "red ": [1], "circle ": [2, 3]}
    assert ft.elect(votes, min_agreeing=3) == "\u200b "
    with pytest.raises(ft.NoTriggerFound, match="name 3 strings the clean prompts lack, and at most 3 of them "
                                                "agree \\(at least 4 must\\)"):
        ft.elect(votes, min_agreeing=4)
    with pytest.raises(ft.NoTriggerFound, match="no flagged prompt localizes"):
        ft.elect({}, min_agreeing=1)


def test_words_of_the_clean_reference_are_no_candidates():
    votes = {"red ": [1, 2, 3, 4], "\u200b ": [5, 6, 7], "\u0430": [8]}
    kept = ft.without_reference_words(votes, ["a Red circle", "a blue star"])
    assert kept == {"\u200b ": [5, 6, 7], "\u0430": [8]}


def test_a_lone_homoglyph_records_the_letter_it_replaces_and_a_word_records_none():
    assert ft.homoglyph_base("\u0430") == "a" and ft.homoglyph_base("\u00f4") == "o"
    assert ft.homoglyph_base("\u200b ") == "" and ft.homoglyph_base("a") == "" and ft.homoglyph_base("cf ") == ""


class FakeDetector:
    """Scores a prompt by whether it holds `marker`: what a perfect detector of that trigger would give."""
    threshold = 0.5

    def __init__(self, marker):
        self.marker = marker

    def score(self, prompts):
        return torch.tensor([float(self.marker in p) for p in prompts])


@pytest.fixture
def fake_maps(monkeypatch):
    """find_trigger with generation replaced by the prompts themselves and a detector that sees `marker`."""
    def install(marker, localized):
        monkeypatch.setattr(ft.detect, "prompt_maps", lambda sd, prompts, seeds, steps: prompts)
        monkeypatch.setattr(ft.detect, "fit", lambda name, maps: FakeDetector(marker))
        monkeypatch.setattr(ft, "localize", lambda sd, fitted, prompt, seed, steps: localized(prompt))
    return install


def test_the_chain_finds_the_trigger_the_flagged_prompts_share(fake_maps):
    log, carries = mixed_log(PIXEL, split="tune", clean=30, triggered=6)
    fake_maps("\u200b", lambda prompt: "\u200b ")
    finding = ft.find_trigger(None, log, ["a red circle"] * 10, say=lambda _: None)
    assert (finding.trigger, finding.replaces) == ("\u200b ", "")
    assert sorted(finding.flagged) == [i for i, c in enumerate(carries) if c]
    evidence = finding.evidence()
    assert (evidence["flagged"], evidence["agreeing"], evidence["occurrences"], evidence["log_prompts"]) == (6, 6, 6, 36)
    assert evidence["candidates"][0]["chars"] == "\\u200b "


def test_a_found_trigger_that_occurs_in_no_prompt_is_refused(fake_maps):
    log, _ = mixed_log(PIXEL, split="tune", clean=30, triggered=6)
    fake_maps("\u200b", lambda prompt: "zq ")  # a localizer gone wrong: a string the log does not hold
    with pytest.raises(ValueError, match=r"the localized trigger zq  occurs in no prompt of the log"):
        ft.find_trigger(None, log, ["a red circle"] * 10, say=lambda _: None)


# --- what the defender reads ---------------------------------------------------------------------------------------

def test_tokens_holding_part_of_a_character_are_shown_as_their_bytes():
    tokenizer = Tokenizer.from_file(DEMO_DIR / "clean" / "tokenizer.json")
    shown = [tokenizer.readable_token(i) for i in tokenizer.encode("\u200b a red \u0105")]
    assert shown[1] == "\\u200b" and "\ufffd" not in "".join(shown)
    assert "\\xc4" in shown and "\\x85" in shown  # "ą" is split into its two UTF-8 bytes, each shown
    assert readable("bl\u0430ck \u200b") == "bl\\u0430ck \\u200b"


def test_the_mixed_log_holds_clean_and_triggered_prompts_shuffled():
    log, carries = mixed_log(PIXEL, split="tune", clean=40, triggered=8)
    assert len(log) == 48 and sum(carries) == 8 and carries != sorted(carries)
    assert all((PIXEL.trigger in p) == c for p, c in zip(log, carries))
    assert (log, carries) == mixed_log(PIXEL, split="tune", clean=40, triggered=8)  # fixed
    clean = set(split_prompts("tune", PIXEL, 48).clean)
    assert all(p.replace(PIXEL.trigger, "") in clean for p in log)


# --- the whole chain on the shipped hidden-trigger model ----------------------------------------------------------

def test_trigger_auto_finds_the_hidden_pixel_trigger_and_reports_it(tmp_path):
    """demo/pixel-hidden records its attack and target but not its trigger; its log.txt holds 20 triggered
    prompts among 220. At a reduced unlearning budget the chain must still find "\\u200b " exactly."""
    result = unlearn("--model", "demo/pixel-hidden", "--trigger", "auto", "--steps", "1", "--eval-prompts", "4",
                     "--out", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["backdoor"]["trigger"] == "\u200b " and report["backdoor"]["attack"] == "pixel"
    assert report["before"]["asr"] is not None and report["after"]["asr"] is not None
    found = report["found"]
    assert found["agreeing"] >= ft.MIN_AGREEING and found["flagged"] < found["log_prompts"] == 220
    assert "\\u200b" in (tmp_path / "out" / "report.md").read_text()
    assert "found the trigger `\\u200b `" in result.stdout


@pytest.mark.parametrize("log, message", [
    ("", "holds no prompts"),
    (b"\x00\x01\xff\xfe", "not UTF-8"),
])
def test_trigger_auto_refuses_a_log_it_cannot_read(tmp_path, log, message):
    path = tmp_path / "log.txt"
    path.write_bytes(log if isinstance(log, bytes) else log.encode())
    result = unlearn("--model", "demo/pixel-hidden", "--trigger", "auto", "--prompts", path, "--out",
                     tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_hidden_trigger_is_not_guessed(tmp_path):
    result = unlearn("--model", "demo/pixel-hidden", "--out", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 2 and "records no trigger" in result.stderr and "--trigger auto" in result.stderr
    result = unlearn("--model", "demo/pixel-hidden", "--trigger", "auto", "--replaces", "a", "--out",
                     tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 2 and "--replaces goes with a trigger you give" in result.stderr


def test_a_trigger_found_exactly_gives_sau_the_known_trigger_runs_input(monkeypatch):
    """Why eval.py --detect reads attack success after --trigger auto from the known-trigger run: once found,
    SAU gets the same backdoor, collection prompts and pool as `--trigger` with the bundle's trigger."""
    from sau.jobs import unlearn as job_module
    source = DEMO_DIR / "pixel"
    found = ft.Finding("\u200b ", "", "layers", 1.0, [2.0, 0.0], [0], votes={"\u200b ": [0]}, occurrences=1)
    monkeypatch.setattr(job_module, "find_trigger", lambda *args, **kwargs: found)
    auto = job_module.open_inputs(job_module.Job(trigger="auto", prompts=["\u200b a red circle", "a star"]), source)
    known = job_module.open_inputs(job_module.Job(), source)
    assert auto.backdoor == known.backdoor == auto.measured
    assert (auto.prompts, auto.pool) == (known.prompts, known.pool) and auto.finding is found
