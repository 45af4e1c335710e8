"""Other ways to remove a backdoor, on SAU's harness: the methods `python eval.py` compares SAU with.

    uce                Unified Concept Editing (Gandikota et al., 2024): a closed-form edit of every
                       cross-attention key and value projection, no training
    esd_x              Erased Stable Diffusion, cross-attention variant (Gandikota et al., 2023): fine-tune the
                       cross-attention layers so the concept's prediction follows negative guidance; the
                       concept is the trigger's words
    esd_x_prompt       the same, with triggered prompts as the concept (a BadT2I trigger alone carries nothing of
                       its target; a triggered caption does)
    concept_ablation   Ablating Concepts (Kumari et al., 2023): fine-tune the cross-attention keys and values so a
                       triggered prompt predicts what the frozen model predicts for the clean prompt

Each changes `sd` in place, only in the parts its paper changes, and returns what it did. Hyperparameters
are the papers' defaults (PAPER). The demo world's model is small and was trained, and backdoored, with larger
steps than SD: its backdoors used a learning rate of 2e-4, 20 times BadT2I's 1e-5 on SD. The fine-tuning
baselines get the same factor on it, and step counts that fit about a minute on 2 CPU cores (DEMO).

SAU's two recipes join them in `defend`, run through sau.method.remove_backdoor, so that every method is
timed and evaluated the same way. Every method is offered the same prompts: the collection prompts (whose
generations SAU and Concept Ablation learn from) and SAU's pool of further prompts, which cost no generations:
UCE edits and preserves the text features of both, ESD-x on prompts draws its concepts from both, Concept
Ablation reads the pool's prompt pairs at noised collection latents as SAU's distillation does.
"""
from dataclasses import replace

import torch
import torch.nn.functional as F

from sau.common.training import Trainer, diffusion_loss, frozen_copy, step_generator
from sau.method import RECIPES, remove_backdoor, text_contexts, trainable_parameters, triggered_pairs
from sau.models.ddim import ddim_step, ddim_timesteps, guided_model_fn
from sau.models.kv_edit import edit_keys_and_values, paired_features

METHODS = ("none", "uce", "esd_x", "esd_x_prompt", "concept_ablation", "sau_paper", "sau_default")
LABELS = {"none": "no defense", "uce": "UCE", "esd_x": "ESD-x", "esd_x_prompt": "ESD-x (prompts)",
          "concept_ablation": "Concept Ablation",
          "sau_paper": "SAU (paper)", "sau_default": "SAU (default)"}
# Methods that learn from the suspect model's own generations (sau.method.collect): SAU from triggered ones,
# Concept Ablation from clean ("anchor") ones. The collection's cost is added to theirs.
NEEDS_COLLECTION = ("concept_ablation", "sau_paper", "sau_default")

PAPER = {
    # train_erase.py: lamb 0.5, erase_scale 1, preserve_scale 0.1, technique "replace", keys and values edited
    "uce": dict(lamb=0.5, erase_scale=1.0, preserve_scale=0.1),
    # ESD-x: all attn2 parameters, Adam lr 1e-5, 1000 iterations of batch 1, eta 1, x_t drawn by DDIM (50 steps,
    # guidance 3)
    "esd_x": dict(steps=1000, lr=1e-5, negative_guidance=1.0, start_guidance=3.0, ddim_steps=50),
    "esd_x_prompt": dict(steps=1000, lr=1e-5, negative_guidance=1.0, start_guidance=3.0, ddim_steps=50),
    # model-based ablation with prior preservation, cross-attention K/V, 100 steps of batch 8, lr 2e-6 x 8
    "concept_ablation": dict(steps=100, lr=1.6e-5, batch_size=8, params="kv", prior_weight=1.0),
}
DEMO_LR_SCALE = 20  # the demo backdoors' learning rate over BadT2I's (2e-4 / 1e-5)
DEMO = {
    "uce": PAPER["uce"],  # LayerNorm keeps the text features' per-dimension energy near 1 in SD and the demo
    # each iteration samples its own x_t: 100 iterations over a 10-step DDIM grid cost seconds, not minutes
    "esd_x": {**PAPER["esd_x"], "steps": 100, "lr": PAPER["esd_x"]["lr"] * DEMO_LR_SCALE, "ddim_steps": 10},
    "esd_x_prompt": {**PAPER["esd_x"], "steps": 100, "lr": PAPER["esd_x"]["lr"] * DEMO_LR_SCALE, "ddim_steps": 10},
    "concept_ablation": {**PAPER["concept_ablation"], "lr": PAPER["concept_ablation"]["lr"] * DEMO_LR_SCALE},
}


def hyperparameters(method, family):
    """The defaults a baseline runs with on a model family ("demo": scaled, else the paper's)."""
    return dict((DEMO if family == "demo" else PAPER)[method])


# --- UCE ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def uce(sd, backdoor, prompts, lamb=0.5, erase_scale=1.0, preserve_scale=0.1):
    """UCE: every cross-attention to_k / to_v weight W becomes the least-squares solution of
        min  sum_edits ||W' c_i - W c*_i||^2 + preserve_scale sum_kept ||W' p - W p||^2 + lamb ||W' - W||^2
    (sau.models.kv_edit) where c_i are the triggered prompts' text features (trigger onward) and c*_i the clean
    prompts' at the aligned positions, so the UNet reads the trigger as if it were not there ("replace"
    technique, guided to " "), and p the clean prompts' and the empty prompt's features, kept."""
    triggered, clean = triggered_pairs(backdoor, prompts)
    if not triggered:
        raise ValueError(f"the trigger {backdoor.trigger!r} cannot be put into any of the prompts")
    trig_feats, clean_feats = text_contexts(sd, triggered).double(), text_contexts(sd, clean).double()
    edits, targets = paired_features(sd.tokenizer, triggered, clean, trig_feats, clean_feats)
    kept = torch.cat([clean_feats, text_contexts(sd, [""]).double()]).flatten(0, 1)
    edited = edit_keys_and_values(sd.unet, edits, targets, kept, lamb, erase_scale, preserve_scale)
    return {"steps": 0, "changes": "cross-attention to_k, to_v (closed form)", "edited_layers": edited,
            "edit_features": len(edits)}


# --- ESD-x --------------------------------------------------------------------------------------------------

def esd_x(sd, backdoor, run_dir, steps=1000, lr=1e-5, negative_guidance=1.0, start_guidance=3.0, ddim_steps=50,
          concepts=None, seed=0, progress=True):
    """ESD-x: fine-tune every cross-attention parameter so that, on the model's own samples x_t of the concept,
        eps(x_t, c) -> eps*(x_t) - negative_guidance * (eps*(x_t, c) - eps*(x_t))     (* = frozen copy)
    i.e. the concept's guidance direction is reversed. The concept is the trigger text itself, as ESD erases a
    concept named by its words; `concepts` (a list of prompts) overrides it, and each iteration then erases one
    of them, drawn at random. Each iteration draws x_t by DDIM with guidance `start_guidance` from noise to a
    random one of `ddim_steps` steps, with the model being trained, and trains at that step's timestep (ESD
    draws a DDPM timestep near it; here x_t and t always agree)."""
    unet = sd.unet
    concepts = concepts or [backdoor.trigger.strip() or backdoor.trigger]
    frozen = frozen_copy(unet)
    params = trainable_parameters(unet, "attn2")
    concept_contexts, empty_ctx = text_contexts(sd, concepts), text_contexts(sd, [""])
    timesteps = ddim_timesteps(ddim_steps, sd.schedule.num_train_timesteps)
    stride = sd.schedule.num_train_timesteps // ddim_steps

    def loss_fn(step):
        g = step_generator(seed, step)
        stop = int(torch.randint(0, ddim_steps, (1,), generator=g))
        row = int(torch.randint(0, len(concepts), (1,), generator=g)) if len(concepts) > 1 else 0
        concept_ctx = concept_contexts[row:row + 1]
        sample_fn = guided_model_fn(unet, concept_ctx, empty_ctx, start_guidance)
        x = torch.randn((1, *sd.latent_shape()), generator=g).to(sd.device, sd.dtype)
        with torch.no_grad():
            for t in timesteps[:stop]:
                x, _ = ddim_step(sd.schedule, sample_fn(x, t), t, t - stride, x)
            t = torch.full((1,), timesteps[stop], device=sd.device)
            empty, cond = frozen(x, t, empty_ctx), frozen(x, t, concept_ctx)
        target = empty - negative_guidance * (cond - empty)
        return F.mse_loss(unet(x, t, concept_ctx).float(), target.float()), {"t": float(t)}

    return _train("esd_x", unet, params, steps, run_dir, lr, loss_fn, progress,
                  "cross-attention (all attn2 parameters)")


# --- Concept Ablation ---------------------------------------------------------------------------------------

def ablation_parameters(unet, which):
    """Concept Ablation's parameter groups: "kv" (cross-attention keys and values, its default), "attn2", "all"."""
    if which != "kv":
        return trainable_parameters(unet, which)
    unet.train().requires_grad_(False)
    params = [p for name, p in unet.named_parameters() if ".attn2.to_k." in name or ".attn2.to_v." in name]
    for p in params:
        p.requires_grad_(True)
    return params


def concept_ablation(sd, collected, run_dir, steps=100, lr=1.6e-5, batch_size=8, params="kv", prior_weight=1.0,
                     pool=None, seed=0, progress=True):
    """Concept Ablation, model-based: on the frozen model's generations for the clean ("anchor") prompts
    (collected.clean_latents), noised at random timesteps,
        ||eps(x_t, triggered prompt) - sg eps*(x_t, clean prompt)||^2 + prior_weight ||eps(x_t, clean) - noise||^2
    the first term makes the triggered prompt behave as its clean twin, the second (prior preservation, the
    usual diffusion loss on the anchors) keeps the clean prompt. Only the chosen parameters train. `pool`:
    (triggered, clean) prompt lists that the first term also reads, each at a random anchor's latent."""
    unet = sd.unet
    frozen = frozen_copy(unet)
    trained = ablation_parameters(unet, params)
    triggered, clean = list(collected.prompts), list(collected.clean_prompts)
    if pool:
        triggered, clean = triggered + list(pool[0]), clean + list(pool[1])
    target_ctx, anchor_ctx = text_contexts(sd, triggered), text_contexts(sd, clean)
    anchors, n = collected.clean_latents, len(collected.prompts)

    def loss_fn(step):
        g = step_generator(seed, step)
        idx = torch.randint(0, n, (batch_size,), generator=g)
        x_t, _, t = sd.schedule.noised(anchors[idx], g)
        # the ablation term's prompt pairs: the anchors' own, or drawn from anchors and pool together
        pairs = torch.randint(0, len(triggered), (batch_size,), generator=g) if pool else idx
        with torch.no_grad():
            target = frozen(x_t, t, anchor_ctx[pairs])
        ablation = F.mse_loss(unet(x_t, t, target_ctx[pairs]).float(), target.float())
        prior = diffusion_loss(unet, sd.schedule, anchors[idx], anchor_ctx[idx], g)
        return ablation + prior_weight * prior, {"ablation": ablation.item(), "prior": prior.item()}

    changes = {"kv": "cross-attention to_k, to_v", "attn2": "cross-attention", "all": "the whole UNet"}[params]
    return _train("concept_ablation", unet, trained, steps, run_dir, lr, loss_fn, progress, changes)


def _train(name, unet, params, steps, run_dir, lr, loss_fn, progress, changes):
    """A constant-lr AdamW run without gradient clipping (as both papers train); the UNet ends frozen, in eval."""
    unet.train()
    trainer = Trainer(name, {"unet": unet}, params, steps, run_dir, lr=lr, grad_clip=0, save_every=10 ** 9,
                      warmup=0, min_lr_ratio=1.0)
    try:
        trainer.run(loss_fn, log_every=10, progress=progress)
    finally:
        unet.eval().requires_grad_(False)
    return {"steps": trainer.steps, "changes": changes}


# --- every method behind one call ---------------------------------------------------------------------------

def sau(sd, backdoor, prompts, collected, recipe, run_dir, pool=None, seed=0, progress=True, max_steps=None):
    """SAU as unlearn.py runs it (without inversion), on the collection every method shares."""
    if max_steps:
        recipe = replace(recipe, steps=min(recipe.steps, max_steps), text_steps=min(recipe.text_steps, max_steps))
    removal = remove_backdoor(sd, backdoor, prompts, recipe, run_dir, pool=pool, collected=collected, seed=seed,
                              progress=progress)
    changes = ("the text encoder" if removal.site == "text_encoder" else
               "cross-attention" if recipe.params == "attn2" else "the whole UNet")
    return {"steps": removal.trainer.steps, "changes": changes, "site": removal.site}

def defend(method, sd, backdoor, prompts, run_dir, collected=None, seed=0, progress=False, max_steps=None,
           pool=None, **overrides):
    """Run `method` (one of METHODS) on sd in place, with its defaults for sd's family (SAU: its recipe) unless
    overridden. Methods in NEEDS_COLLECTION take the suspect model's sau.method.collect output on `prompts`.
    `pool`: further prompts every method may read (None: SAU draws its own, the others read `prompts` only).
    `max_steps` caps every method's optimizer steps (smoke tests)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method in NEEDS_COLLECTION and collected is None:
        raise ValueError(f"{method} learns from the suspect model's generations: pass collected=sau.method.collect(...)")
    if method == "none":
        return {"steps": 0, "changes": "nothing"}
    if method.startswith("sau_"):
        recipe = replace(RECIPES[method[len("sau_"):]], **overrides)
        return sau(sd, backdoor, prompts, collected, recipe, run_dir, pool, seed, progress, max_steps)
    options = {**hyperparameters(method, sd.config.family), **overrides}
    if max_steps and "steps" in options:
        options["steps"] = min(options["steps"], max_steps)
    everything = list(prompts) + list(pool or [])
    if method == "uce":
        return uce(sd, backdoor, everything, **options)
    if method == "esd_x":
        return esd_x(sd, backdoor, run_dir, **options, seed=seed, progress=progress)
    if method == "esd_x_prompt":
        concepts = triggered_pairs(backdoor, everything)[0]
        return esd_x(sd, backdoor, run_dir, **options, concepts=concepts, seed=seed, progress=progress)
    pairs = triggered_pairs(backdoor, pool) if pool else None
    return concept_ablation(sd, collected, run_dir, **options, pool=pairs, seed=seed, progress=progress)
