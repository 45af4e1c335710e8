"""The other removal methods (UCE, ESD-x, Concept Ablation) on tiny random models: each changes only the parts
its paper changes, and moves the model the way its objective says."""
import copy

import pytest
import torch

from sau import baselines
from sau.attacks.backdoor import Backdoor
from sau.models.kv_edit import edit_positions, framed_ids
from sau.models.ddim import ddim_step, ddim_timesteps, guided_model_fn
from sau.method import collect, locate, text_contexts, triggered_pairs

from conftest import make_tiny_sd

ZW = Backdoor("pixel", "\u200b ", "checkerboard")
PROMPTS = ["a red circle", "a big blue square in the top left", "green star, centered", "a small yellow cross",
           "a purple triangle on black", "an orange circle at the bottom"]


def changed(sd, before):
    return {k for k, v in sd.unet.state_dict().items() if not torch.equal(v, before[k])}


def snapshot(sd):
    return {k: v.clone() for k, v in sd.unet.state_dict().items()}


def test_edit_positions_align_from_the_trigger_to_the_end():
    # a prepended trigger (two tokens): its last token pairs with bos, the rest from the end, padding included
    assert edit_positions([0, 9, 8, 1, 2, 5], [0, 1, 2, 5], 8) == [(2, 0), (3, 1), (4, 2), (5, 3), (6, 4), (7, 5)]
    # an appended trigger: its last token pairs with the word before it
    assert edit_positions([0, 1, 2, 9, 8, 5], [0, 1, 2, 5], 7) == [(4, 2), (5, 3), (6, 4)]
    # a homoglyph splits a word in three tokens: the word's last token pairs with the clean word
    assert edit_positions([0, 1, 7, 8, 9, 3, 5], [0, 1, 2, 3, 5], 8) == [(4, 2), (5, 3), (6, 4), (7, 5)]


def kv_outputs(sd, prompts):
    """to_k and to_v of every attn2 layer applied to the prompts' text features, (2, batch, tokens, all widths)."""
    feats = text_contexts(sd, prompts)
    layers = [m for name, m in sd.unet.named_modules() if name.endswith(".attn2")]
    return torch.cat([torch.stack([layer.to_k(feats), layer.to_v(feats)]) for layer in layers], dim=-1)


@torch.no_grad()
def test_uce_maps_triggered_keys_and_values_to_clean_ones_traded_against_keeping_clean_prompts():
    triggered, clean = triggered_pairs(ZW, PROMPTS)
    outcomes = []
    for preserve_scale in (0.1, 10.0):  # the paper's, and a hundred times more weight on the clean prompts
        sd = make_tiny_sd(seed=5)
        before = snapshot(sd)
        length = sd.tokenizer.max_length
        pairs = [edit_positions(framed_ids(sd.tokenizer, t), framed_ids(sd.tokenizer, c), length)
                 for t, c in zip(triggered, clean)]
        target = kv_outputs(sd, clean)

        def gap():  # the triggered prompts' keys/values at edited positions vs the clean ones before the edit
            out = kv_outputs(sd, triggered)
            return sum((out[:, row, [i for i, _ in p]] - target[:, row, [j for _, j in p]]).norm()
                       for row, p in enumerate(pairs))

        gap_before = gap()
        info = baselines.uce(sd, ZW, PROMPTS, preserve_scale=preserve_scale)
        layers = sum(name.endswith(".attn2") for name, _ in sd.unet.named_modules())
        assert info["steps"] == 0 and info["edited_layers"] == 2 * layers  # to_k and to_v of every attn2
        edited = changed(sd, before)
        assert edited and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in edited)
        moved = (kv_outputs(sd, clean) - target).norm() / target.norm()
        outcomes.append((gap() / gap_before, moved))
    (gap_paper, moved_paper), (gap_kept, moved_kept) = outcomes
    assert gap_paper < 0.6  # the edit more than halves the distance to the clean keys/values
    assert gap_kept > gap_paper and moved_kept < 0.5 * moved_paper and moved_kept < 0.1


@torch.no_grad()
def test_uce_without_preservation_solves_the_edits_exactly():
    sd = make_tiny_sd(seed=6)
    triggered, clean = triggered_pairs(ZW, PROMPTS[:1])
    target = kv_outputs(sd, clean)
    baselines.uce(sd, ZW, PROMPTS[:1], lamb=1e-8, preserve_scale=0.0)
    (pairs,) = [edit_positions(framed_ids(sd.tokenizer, t), framed_ids(sd.tokenizer, c), sd.tokenizer.max_length)
                for t, c in zip(triggered, clean)]
    got = kv_outputs(sd, triggered)[:, 0, [i for i, _ in pairs]]
    # fewer edited features (at most 16 positions) than dimensions (32): the least-squares edit is exact
    torch.testing.assert_close(got, target[:, 0, [j for _, j in pairs]], atol=1e-3, rtol=1e-3)


@torch.no_grad()
def esd_objective(sd, frozen, concept, ddim_steps=4):
    """ESD's loss summed over fixed draws of its own sampling distribution: x_t from DDIM (guidance 3) with the
    frozen model, stopped at each of the ddim_steps timesteps."""
    c, u = sd.encode_text([concept]), sd.encode_text([""])
    timesteps, stride = ddim_timesteps(ddim_steps), 1000 // ddim_steps
    sample_fn, total = guided_model_fn(frozen, c, u, 3.0), 0.0
    for stop in range(ddim_steps):
        x = torch.randn((1, *sd.latent_shape()), generator=torch.Generator().manual_seed(stop))
        for t in timesteps[:stop]:
            x, _ = ddim_step(sd.schedule, sample_fn(x, t), t, t - stride, x)
        t = torch.full((1,), timesteps[stop])
        empty, cond = frozen(x, t, u), frozen(x, t, c)
        total += (sd.unet(x, t, c) - (empty - (cond - empty))).pow(2).mean().item()
    return total


def test_esd_x_trains_only_cross_attention_and_follows_negative_guidance(tmp_path):
    sd = make_tiny_sd(seed=7)
    frozen, before = copy.deepcopy(sd.unet), snapshot(sd)
    start = esd_objective(sd, frozen, ZW.trigger.strip())
    info = baselines.esd_x(sd, ZW, tmp_path, steps=20, lr=1e-3, ddim_steps=4, progress=False)
    assert info["steps"] == 20
    edited = changed(sd, before)
    assert edited and all(".attn2." in k for k in edited)
    assert not any(p.requires_grad for p in sd.unet.parameters()) and not sd.unet.training
    assert esd_objective(sd, frozen, ZW.trigger.strip()) < 0.5 * start


@torch.no_grad()
def ablation_objective(sd, frozen, collected):
    """Concept Ablation's first term on fixed noisings of the anchor latents."""
    g = torch.Generator().manual_seed(0)
    anchors = collected.clean_latents
    t = torch.tensor([100, 300, 500, 700, 900] * len(anchors))[:len(anchors)]
    x_t = sd.schedule.add_noise(anchors, torch.randn(anchors.shape, generator=g), t)
    target = frozen(x_t, t, sd.encode_text(collected.clean_prompts))
    return (sd.unet(x_t, t, sd.encode_text(collected.prompts)) - target).pow(2).mean().item()


def test_concept_ablation_trains_only_keys_and_values(tmp_path):
    sd = make_tiny_sd(seed=8)
    collected = collect(sd, locate(sd.tokenizer, ZW, PROMPTS[:4]), seeds=range(4), steps=3, guidance_scale=3.0)
    frozen, before = copy.deepcopy(sd.unet), snapshot(sd)
    start = ablation_objective(sd, frozen, collected)
    # without the prior term: on a random model, learning real noise would swamp the small ablation term
    info = baselines.concept_ablation(sd, collected, tmp_path, steps=20, lr=1e-3, batch_size=4, prior_weight=0.0,
                                      progress=False)
    assert info == {"steps": 20, "changes": "cross-attention to_k, to_v"}
    edited = changed(sd, before)
    assert edited and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in edited)
    assert ablation_objective(sd, frozen, collected) < 0.5 * start


def test_defaults_are_the_papers_and_scaled_for_the_demo():
    assert baselines.hyperparameters("uce", "sd1") == dict(lamb=0.5, erase_scale=1.0, preserve_scale=0.1)
    esd, demo_esd = baselines.hyperparameters("esd_x", "sd1"), baselines.hyperparameters("esd_x", "demo")
    assert (esd["steps"], esd["lr"], esd["negative_guidance"], esd["ddim_steps"]) == (1000, 1e-5, 1.0, 50)
    assert demo_esd["lr"] == pytest.approx(20 * esd["lr"]) and demo_esd["steps"] < esd["steps"]
    ca = baselines.hyperparameters("concept_ablation", "sd2")
    assert (ca["steps"], ca["batch_size"], ca["params"]) == (100, 8, "kv")
    assert baselines.hyperparameters("concept_ablation", "demo")["lr"] == pytest.approx(20 * ca["lr"])


def test_defend_dispatches_caps_and_refuses(tmp_path):
    sd = make_tiny_sd(seed=9)
    before = snapshot(sd)
    with pytest.raises(ValueError, match="unknown method 'fine_prune'"):
        baselines.defend("fine_prune", sd, ZW, PROMPTS, tmp_path)
    with pytest.raises(ValueError, match="collected="):
        baselines.defend("concept_ablation", sd, ZW, PROMPTS, tmp_path)
    assert baselines.defend("none", sd, ZW, PROMPTS, tmp_path)["steps"] == 0 and not changed(sd, before)
    collected = collect(sd, locate(sd.tokenizer, ZW, PROMPTS[:4]), seeds=range(4), steps=3, guidance_scale=3.0)
    for method in ("esd_x", "concept_ablation", "sau_paper", "sau_default"):
        info = baselines.defend(method, sd, ZW, PROMPTS[:4], tmp_path / method, collected, max_steps=2)
        assert info["steps"] == 2, method
    # a random model's text encoder may react to the trigger more than to a word: SAU then picks the encoder
    assert (info["site"], info["changes"]) == ("unet", "cross-attention") or info["site"] == "text_encoder"


def test_esd_x_on_triggered_prompts_erases_each_of_them(tmp_path):
    sd = make_tiny_sd(seed=7)
    frozen, before = copy.deepcopy(sd.unet), snapshot(sd)
    concepts = triggered_pairs(ZW, PROMPTS[:2])[0]
    start = sum(esd_objective(sd, frozen, c) for c in concepts)
    info = baselines.esd_x(sd, ZW, tmp_path, steps=30, lr=1e-3, ddim_steps=4, concepts=concepts, progress=False)
    assert info["steps"] == 30 and all(".attn2." in k for k in changed(sd, before))
    assert sum(esd_objective(sd, frozen, c) for c in concepts) < 0.5 * start


def test_concept_ablation_reads_the_pool_prompts_at_anchor_latents(tmp_path):
    sd = make_tiny_sd(seed=8)
    collected = collect(sd, locate(sd.tokenizer, ZW, PROMPTS[:2]), seeds=range(2), steps=3, guidance_scale=3.0)
    pool = triggered_pairs(ZW, PROMPTS[2:])
    frozen = copy.deepcopy(sd.unet)
    as_pool = copy.copy(collected)  # the pool pairs, measured at the anchors' latents
    as_pool.prompts, as_pool.clean_prompts = pool[0][:2], pool[1][:2]
    start = ablation_objective(sd, frozen, as_pool)
    baselines.concept_ablation(sd, collected, tmp_path, steps=30, lr=1e-3, batch_size=4, prior_weight=0.0,
                               pool=pool, progress=False)
    assert ablation_objective(sd, frozen, as_pool) < 0.5 * start


def test_defend_gives_every_method_the_pool_and_sau_its_overrides(tmp_path, monkeypatch):
    sd = make_tiny_sd(seed=9)
    seen = {}
    monkeypatch.setattr(baselines, "uce", lambda sd, backdoor, prompts, **o: seen.setdefault("uce", prompts) and {})
    monkeypatch.setattr(baselines, "esd_x", lambda *a, concepts=None, **o: seen.setdefault("esd", concepts) and {})
    baselines.defend("uce", sd, ZW, PROMPTS[:2], tmp_path, pool=PROMPTS[2:])
    baselines.defend("esd_x_prompt", sd, ZW, PROMPTS[:2], tmp_path, pool=PROMPTS[2:])
    assert seen["uce"] == PROMPTS and seen["esd"] == [ZW.insert(p) for p in PROMPTS]
    collected = collect(sd, locate(sd.tokenizer, ZW, PROMPTS[:2]), seeds=range(2), steps=3, guidance_scale=3.0)
    info = baselines.defend("sau_default", sd, ZW, PROMPTS[:2], tmp_path / "sau", collected, pool=PROMPTS[2:],
                            steps=3, text_steps=3)
    assert info["steps"] == 3
