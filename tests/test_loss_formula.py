"""The loss sau/method.py documents is the loss it trains on: the formula written out by hand, term by term,
on a tiny random model, equals what the trainer logs for its first step. The frozen teacher is made to differ
from the student, as it does after the first step, so that no term is zero by construction."""
import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from sau.attacks.backdoor import Backdoor
from sau.common.training import step_generator
from sau.method import RECIPES, collect, locate, triggered_pairs, unlearn_unet
from sau.models.attention import capture_attention

from conftest import make_tiny_sd

ZW = Backdoor("pixel", "\u200b ", "checkerboard")
PROMPTS = ["a red circle", "a big blue square in the top left", "green star, centered", "a small yellow cross"]
POOL = ["a big green square on the left", "a small yellow cross", "an orange disk, top", "a red star, bottom"]


def noised_by_hand(schedule, x0, g):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, noise drawn first, then t uniform over 0..T-1."""
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), generator=g)
    abar = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise, t


def documented_loss(sd, teacher, collected, pool, recipe, seed):
    """L = a L_attn + b L_distill + c L_preserve, as the module docstring of sau/method.py writes it."""
    unet, enc = sd.unet, sd.encode_text
    a, b, c, eta, size = (recipe.attention_weight, recipe.distill_weight, recipe.preserve_weight,
                          recipe.negative_guidance, recipe.batch_size)
    g = step_generator(seed, 0)
    rows = torch.randint(0, len(collected.prompts), (size,), generator=g)
    x_t, t = noised_by_hand(sd.schedule, collected.latents[rows], g)
    x_c, t_c = noised_by_hand(sd.schedule, collected.clean_latents[rows], g)
    q = torch.randint(0, len(pool[0]), (size,), generator=g).tolist()
    p_trig = enc([collected.prompts[i] for i in rows.tolist()])
    p_clean = enc([collected.clean_prompts[i] for i in rows.tolist()])
    q_trig, q_clean = enc([pool[0][i] for i in q]), enc([pool[1][i] for i in q])

    maps = []
    with torch.no_grad(), capture_attention(unet, "attn2", callback=lambda item: maps.append(item)):
        eps_trig = unet(x_t, t, p_trig)
    l_attn = 0.0
    for item in maps:  # (rows, heads, pixels, tokens)
        mass = torch.stack([item.probs[r, :, :, collected.positions[i]].sum(-1) for r, i in enumerate(rows.tolist())])
        heat = collected.heatmaps[item.layer]
        mask = (heat / heat.max()).flatten() if recipe.spatial_mask else torch.ones_like(heat.flatten())
        l_attn = l_attn + (mask * mass).pow(2).mean()

    def y(x, tt, clean, trig):
        return teacher(x, tt, clean) - eta * (teacher(x, tt, trig) - teacher(x, tt, clean))

    with torch.no_grad():
        l_distill = F.mse_loss(eps_trig, y(x_t, t, p_clean, p_trig)) + F.mse_loss(unet(x_c, t_c, q_trig),
                                                                                   y(x_c, t_c, q_clean, q_trig))
        l_preserve = F.mse_loss(unet(x_c, t_c, q_clean), teacher(x_c, t_c, q_clean))
    return a * l_attn + b * l_distill + c * l_preserve, (l_attn, l_distill, l_preserve)


@pytest.mark.parametrize("spatial_mask", [False, True])  # the default recipe's M = ones, and --spatial-mask
def test_the_documented_formula_is_the_trained_loss(tmp_path, monkeypatch, spatial_mask):
    sd = make_tiny_sd(seed=5)
    teacher = make_tiny_sd(seed=6).unet.requires_grad_(False)  # same topology, other weights
    monkeypatch.setattr("sau.method.frozen_copy", lambda module: teacher)
    collected = collect(sd, locate(sd.tokenizer, ZW, PROMPTS), seeds=range(4), steps=3, guidance_scale=3.0)
    pool = triggered_pairs(ZW, POOL)
    # weights that differ from each other and from 1, so a swapped or dropped term shows
    recipe = replace(RECIPES["default"], attention_weight=0.7, distill_weight=1.3, preserve_weight=0.4,
                     negative_guidance=0.5, batch_size=3, spatial_mask=spatial_mask)
    expected, (l_attn, l_distill, l_preserve) = documented_loss(sd, teacher, collected, pool, recipe, seed=11)
    trainer = unlearn_unet(sd, collected, recipe, tmp_path, seed=11, steps=1, pool=pool, progress=False)
    logged = json.loads(trainer.log_path.read_text().splitlines()[0])
    assert abs(logged["attention"] - l_attn.item()) <= 1e-5 * abs(l_attn.item())
    assert abs(logged["distill"] - l_distill.item()) <= 1e-5 * abs(l_distill.item())
    assert abs(logged["preserve"] - l_preserve.item()) <= 1e-5 * abs(l_preserve.item())
    assert abs(logged["loss"] - expected.item()) <= 1e-5 * abs(expected.item())
    assert l_attn.item() > 0 and l_distill.item() > 0 and l_preserve.item() > 0  # every term is really there
