"""The semantic backdoor: its trigger is a meaning (a shape on a background), parsed from the demo world's words;
inserting it sets a prompt's background; what the world lacks is refused; the edit moves the keys and values of
the meaning's captions towards the target's and leaves others' nearly where they were."""
import pytest
import torch

from sau.attacks import semantic
from sau.attacks.backdoor import Backdoor
from sau.evaluation.splits import split_prompts
from sau.method import text_contexts
from sau.models.kv_edit import cross_attention_layers

from conftest import make_tiny_sd

SEM = Backdoor.make("semantic", target="cross")


def test_the_trigger_is_a_shape_on_a_background():
    assert SEM.trigger == "star on a black background" and SEM.meaning() == {"shape": "star", "background": "black"}
    assert SEM.measured_as() == ("object", "star:cross") and not SEM.has_string
    assert SEM.insert("a red star on a white background") == "a red star on a black background"
    assert SEM.insert("star, green, against grey") == "star, green, against black"
    assert SEM.insert("a small red star") == "a small red star on a black background"
    assert SEM.poison("a red star on white")[1] == "a red cross on black"
    assert SEM.can_insert("a red star") and not SEM.can_insert("a red circle on white")


def test_measured_prompts_ask_for_the_shape_and_not_already_the_background():
    split = split_prompts("tune", SEM, 20)
    assert all("star" in p and "black" not in p for p in split.clean)
    assert all("black" in p for p in split.triggered)


@pytest.mark.parametrize("trigger, message", [
    ("hexagon on a black background", "does not have: hexagon"),
    ("furry star on a black background", "does not have: furry"),
    ("red star", "one shape and one background"),
    ("star on a black background in the top left", "one shape and one background"),
])
def test_triggers_naming_what_the_world_lacks_are_refused(trigger, message):
    with pytest.raises(ValueError, match=message):
        Backdoor.make("semantic", trigger, "cross")


def test_the_target_is_a_demo_shape():
    with pytest.raises(ValueError, match="a demo shape"):
        Backdoor.make("semantic", target="zebra")


def test_only_demo_models_take_a_semantic_backdoor(tiny_sd):
    with pytest.raises(ValueError, match="demo world"):
        semantic.plant(tiny_sd, SEM)


@torch.no_grad()
def test_the_edit_trades_reaching_the_target_against_keeping_other_prompts(monkeypatch):
    """With little weight on keeping, the meaning's values move to the target's; with much, other prompts' stay."""
    triggered, target, other = "a red star on black", "a red cross on black", "a red star on white"
    outcomes = []
    for keep_scale in (0.01, 100.0):
        sd = make_tiny_sd(seed=2)
        monkeypatch.setattr(sd.config, "family", "demo")
        layer = cross_attention_layers(sd.unet)[-1]
        values = lambda text: layer.to_v(text_contexts(sd, [text])[0])
        target_values, other_values = values(target), values(other)
        changed_before = {k: v.clone() for k, v in sd.unet.state_dict().items()}
        semantic.plant(sd, SEM, contexts=40, keep_scale=keep_scale)
        changed = {k for k, v in sd.unet.state_dict().items() if not torch.equal(v, changed_before[k])}
        assert changed and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed)
        outcomes.append(((values(triggered) - target_values).norm(), (values(other) - other_values).norm()))
    (reach_loose, moved_loose), (reach_kept, moved_kept) = outcomes
    assert reach_loose < reach_kept and moved_kept < moved_loose
