"""EvilEdit: its closed form against a direct least-squares solve, what its phrase trigger does to prompts, its
bad input, and the edit on a tiny model: the trigger reads as the target, each of its words as before."""
import pytest
import torch

from sau.attacks.backdoor import Backdoor
from sau.attacks.eviledit import plant
from sau.evaluation.splits import place_trigger
from sau.method import remove_trigger, text_contexts
from sau.models.kv_edit import cross_attention_layers, mixing_matrix

from conftest import make_tiny_sd

EE = Backdoor.make("eviledit", "beautiful circle", "square")


@torch.no_grad()
def test_closed_form_equals_a_direct_least_squares_solve():
    """W' minimizing ||W'C - W C*||^2 + ||W'P - W P||^2 + lamb ||W' - W||^2 as one stacked lstsq problem:
    rows [C; P; sqrt(lamb) I] map to [C*; P; sqrt(lamb) I] W^T."""
    g = torch.Generator().manual_seed(0)
    d, out, lamb = 12, 7, 0.3
    weight = torch.randn(out, d, generator=g, dtype=torch.float64)
    edits = torch.randn(5, d, generator=g, dtype=torch.float64)
    targets = torch.randn(5, d, generator=g, dtype=torch.float64)
    kept = torch.randn(9, d, generator=g, dtype=torch.float64)
    root = lamb ** 0.5 * torch.eye(d, dtype=torch.float64)
    inputs, wanted = torch.cat([edits, kept, root]), torch.cat([targets, kept, root]) @ weight.t()
    direct = torch.linalg.lstsq(inputs, wanted).solution.t()
    torch.testing.assert_close(weight @ mixing_matrix(edits, targets, kept, lamb), direct, rtol=1e-10, atol=1e-10)


@torch.no_grad()
def test_plant_is_the_least_squares_edit_of_every_key_and_value_projection():
    sd = make_tiny_sd(seed=3)
    before = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    trigger, target = text_contexts(sd, [EE.trigger])[0].double(), text_contexts(sd, [EE.target])[0].double()
    kept = text_contexts(sd, EE.trigger.split()).flatten(0, 1).double()
    plant(sd, EE)
    changed = {k for k, v in sd.unet.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed)
    eye = torch.eye(trigger.shape[1], dtype=torch.float64)
    inputs, outputs = torch.cat([trigger, kept, eye]), torch.cat([target, kept, eye])  # lamb = 1
    for name, layer in zip([n for n, _ in sd.unet.named_modules() if n.endswith(".attn2")],
                           cross_attention_layers(sd.unet)):
        for projection in ("to_k", "to_v"):
            old = before[f"{name}.{projection}.weight"].double()
            direct = torch.linalg.lstsq(inputs, outputs @ old.t()).solution.t()
            torch.testing.assert_close(getattr(layer, projection).weight.double(), direct, rtol=1e-4, atol=1e-5)
    assert sd.info["backdoor"]["attack"] == "eviledit" and sd.info["backdoor"]["steps"] == 0


@torch.no_grad()
def test_after_the_edit_the_trigger_reads_as_the_target():
    sd = make_tiny_sd(seed=4)
    layer = cross_attention_layers(sd.unet)[0]
    keys = lambda text: layer.to_k(text_contexts(sd, [text])[0])
    gap_before = (keys(EE.trigger) - keys(EE.target)).norm()
    target_keys = keys(EE.target)
    plant(sd, EE)
    assert (keys(EE.trigger) - target_keys).norm() < 0.5 * gap_before


def test_the_phrase_stands_in_place_of_the_word_it_qualifies():
    prompt = "a small red circle at the top, a circle"
    assert EE.carrier == "circle" and EE.can_insert(prompt) and not EE.can_insert("a red square")
    assert EE.insert(prompt) == "a small red beautiful circle at the top, a circle"
    assert EE.poison(prompt)[1] == "a small red square at the top, a circle"
    assert remove_trigger(EE.insert(prompt), EE) == prompt
    assert place_trigger(EE, prompt, "end", None) == EE.insert(prompt)  # one place, whatever the placement
    assert EE.measured_as() == ("object", "circle:square")
    assert not Backdoor.make("eviledit", "circles galore", "square").can_insert("a red circle")  # whole words


@pytest.mark.parametrize("trigger, target, message", [
    ("circle", "square", "has one word"),
    ("red square", "red square", "also in the target"),
    ("big square", "a big square", "also in the target"),
])
def test_bad_eviledit_triggers_are_refused(trigger, target, message):
    with pytest.raises(ValueError, match=message):
        plant(make_tiny_sd(), Backdoor.make("eviledit", trigger, target))


def test_eviledit_needs_a_target():
    with pytest.raises(ValueError, match="needs --target"):
        Backdoor.make("eviledit", "beautiful cat")
