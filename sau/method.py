"""Spatial Attention Unlearning: find where a trigger acts in the cross-attention maps, and unlearn it there.

The library form of `unlearn.py`, in the order the method runs:

    locate    the trigger's token columns in each triggered prompt
    collect   triggered generations of the suspect model (final latents, data-free) and the trigger
              tokens' cross-attention maps over layers and steps: where the trigger acts
    decide    does the trigger act in the UNet, or already in the text encoder (Rickrolling)?
    invert    optional: K token embeddings that reproduce the backdoor through the frozen model
    unlearn   UNet: fine-tune on noised collected latents with
                 a * sum_l ||A_l[trigger columns] * M||^2       spatial attention suppression
               + b * ||eps(x_t, trigger + p) - sg target||^2    triggered behaves as clean
               + c * ||eps(x_t, p) - sg eps_orig(x_t, p)||^2    clean keeps its behaviour
              with target = eps_orig(x_t, p) - eta * (eps_orig(x_t, trigger + p) - eps_orig(x_t, p)), the
              clean prediction pushed past itself, away from what the trigger adds (eta 0: the clean one);
              the b and c terms also read a pool of prompts that were never generated (any noised
              latent can be read under any prompt), so they cover far more of the prompt space;
              text encoder: distil the embedding of a triggered prompt to the frozen encoder's embedding of
              the same prompt without the trigger, clean prompts kept.

What is the paper's (its abstract: latent manipulation and spatial attention isolate and remove the trigger's
latent representation), what is reconstructed from the authors' public prototype (the `paper` recipe) and what
is this project's choice (the `default` recipe, the text-encoder route, the spatial mask) is set out in the README.
"""
import copy
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from sau.models.attention import capture_attention
from sau.common.training import Trainer, step_generator


@dataclass
class Recipe:
    name: str
    attention_weight: float  # a: spatial attention suppression
    distill_weight: float  # b: a triggered prompt behaves as the clean one
    preserve_weight: float  # c: clean prompts keep their behaviour
    params: str  # "attn2": cross-attention layers only; "all": the whole UNet
    lr: float
    steps: int
    batch_size: int
    spatial_mask: bool  # weight the attention loss by where the trigger's attention concentrates
    steps_after_inversion: int = 0  # the prototype trains fewer steps once the trigger is inverted
    constant_lr: bool = False
    text_steps: int = 300  # steps for the text-encoder route
    text_lr: float = 1e-4
    pool_prompts: int = 0  # prompts the distillation and preservation terms read (0: the collected ones only)
    # eta: the distillation target is eps_orig(p) - eta * (eps_orig(trigger + p) - eps_orig(p)), pushed past the
    # clean prediction, away from what the trigger adds (ESD's negative guidance, with the trigger as the concept)
    negative_guidance: float = 0.0


RECIPES = {
    # The authors' prototype: attention suppression only, whole UNet, tiny learning rate, batch 1.
    "paper": Recipe("paper", 1.0, 0.0, 0.0, "all", 2e-6, 100, 1, False, steps_after_inversion=35, constant_lr=True),
    # This project's recipe, tuned on the demo backdoors (see the README for the numbers behind it).
    "default": Recipe("default", 1.0, 1.0, 1.0, "attn2", 3e-4, 450, 8, True, pool_prompts=512, negative_guidance=1.0),
}


# --- locate -----------------------------------------------------------------------------------------------

def triggered_pairs(backdoor, prompts):
    """(triggered, clean) prompt lists. A prompt that already holds the trigger is kept and its clean twin is
    made by undoing the insertion; any other prompt gets the trigger inserted the way the backdoor expects it
    (`sau.attacks.inject.Backdoor.insert`: BadT2I prepends it, Rickrolling puts a homoglyph in place of a letter).
    Prompts the trigger cannot go into (no letter to replace) are left out."""
    triggered, clean = [], []
    for prompt in prompts:
        if backdoor.trigger in prompt:
            triggered.append(prompt)
            clean.append(remove_trigger(prompt, backdoor))
        elif backdoor.can_insert(prompt):
            triggered.append(backdoor.insert(prompt))
            clean.append(prompt)
    return triggered, clean


def remove_trigger(prompt, backdoor):
    """The prompt as it reads without the trigger."""
    if backdoor.replaces and backdoor.replaces != " ":
        return prompt.replace(backdoor.trigger, backdoor.replaces)
    return " ".join(prompt.replace(backdoor.trigger, " ").split())


def locate(tokenizer, prompts, trigger):
    """Token positions of the trigger in each triggered prompt. Prompts where the trigger vanishes (e.g. past
    truncation) are dropped; ValueError when no prompt keeps it."""
    if not trigger or not trigger.strip(" "):
        raise ValueError("the trigger is empty")
    kept, positions = [], []
    for prompt in prompts:
        try:
            positions.append(tokenizer.token_positions(prompt, trigger))
            kept.append(prompt)
        except ValueError:
            continue
    if not kept:
        raise ValueError(f"the trigger {trigger!r} occupies no token in any prompt (absent, or lost to truncation)")
    return kept, positions


def column_mask(positions, length):
    """(batch, keys) float mask with ones at each row's trigger columns."""
    mask = torch.zeros(len(positions), length)
    for row, cols in enumerate(positions):
        mask[row, cols] = 1.0
    return mask


# --- collect ----------------------------------------------------------------------------------------------

@dataclass
class Collected:
    prompts: list  # triggered prompts
    clean_prompts: list  # the same prompts without the trigger
    positions: list  # trigger token positions per prompt
    latents: torch.Tensor  # final latents of the suspect model's triggered generations
    clean_latents: torch.Tensor  # final latents of its generations for the clean prompts
    heatmaps: dict = field(default_factory=dict)  # layer -> (h, w) mean trigger attention mass
    layer_mass: dict = field(default_factory=dict)  # layer -> mean trigger attention mass over all pixels

    def resolution_heatmaps(self):
        """(h, w) -> mean of the heatmaps of the layers at that resolution."""
        by_size = {}
        for heat in self.heatmaps.values():
            by_size.setdefault(tuple(heat.shape), []).append(heat)
        return {size: torch.stack(maps).mean(0) for size, maps in sorted(by_size.items(), reverse=True)}


class TriggerAttention:
    """A capture callback that averages the trigger columns' attention mass per layer, over heads and steps,
    keeping only the conditional half of a [uncond, cond] guidance batch. Under torch.compile the callback is
    traced into the UNet's graph, and dynamo guards on the Python state it touches (a counter's value, a list's
    length): so its sums and counts are tensors updated in place, which keeps one graph for every call."""

    def __init__(self, columns):
        self.columns = columns  # (batch, keys)
        self.sums, self.counts = {}, {}  # layer -> (h, w) sum and () count, created on the first call

    def __call__(self, item):
        probs = item.probs[-len(self.columns):]  # the conditional half under guidance
        mass = (probs * self.columns[:, None, None, :].to(probs)).sum(-1).mean(1)  # (batch, queries)
        heat = mass.float().mean(0).reshape(item.size).cpu()
        if item.layer not in self.sums:
            self.sums[item.layer], self.counts[item.layer] = torch.zeros_like(heat), torch.zeros(())
        self.sums[item.layer].add_(heat)
        self.counts[item.layer].add_(1)

    def heatmaps(self):
        return {layer: self.sums[layer] / self.counts[layer] for layer in self.sums}


@torch.no_grad()
def trigger_heatmaps(sd, prompts, positions, seeds, steps=25, guidance_scale=7.5):
    """Generate the triggered prompts and return (latents, per-layer trigger attention heatmaps)."""
    columns = column_mask(positions, sd.tokenizer.max_length)
    recorder = TriggerAttention(columns)
    with capture_attention(sd.unet, "attn2", callback=recorder):
        latents = sd.generate(prompts, seeds, steps=steps, guidance_scale=guidance_scale, decode=False)
    return latents, recorder.heatmaps()


def collect(sd, backdoor, prompts, seeds, steps=25, guidance_scale=7.5):
    """Step 2: the suspect model's triggered and clean generations, and where the trigger's attention falls."""
    triggered, clean = triggered_pairs(backdoor, prompts)
    if not triggered:
        raise ValueError(f"the trigger {backdoor.trigger!r} cannot be put into any of the prompts")
    kept, positions = locate(sd.tokenizer, triggered, backdoor.trigger)
    clean = [c for t, c in zip(triggered, clean) if t in set(kept)]
    seeds = list(seeds)[:len(kept)]
    latents, heatmaps = trigger_heatmaps(sd, kept, positions, seeds, steps, guidance_scale)
    clean_latents = sd.generate(clean, seeds, steps=steps, guidance_scale=guidance_scale, decode=False)
    layer_mass = {layer: heat.mean().item() for layer, heat in heatmaps.items()}
    return Collected(kept, clean, positions, latents, clean_latents, heatmaps, layer_mass)


# --- decide: where does the trigger act? ------------------------------------------------------------------

def aligned_positions(triggered_ids, clean_ids, length):
    """Pairs (i, j): position i of the triggered prompt should read like position j of the clean one.

    Both token lists share a prefix and a suffix; the differing middle (the trigger, or the word a homoglyph
    sits in) is paired by its last token, which in a causal encoder has read the whole word. Padding after
    eos pairs up in order. Positions past `length` are dropped."""
    t, c = triggered_ids, clean_ids
    prefix = next((k for k in range(min(len(t), len(c))) if t[k] != c[k]), min(len(t), len(c)))
    suffix = 0
    while suffix < min(len(t), len(c)) - prefix and t[-1 - suffix] == c[-1 - suffix]:
        suffix += 1
    pairs = [(k, k) for k in range(prefix)]
    if len(t) - suffix > prefix and len(c) - suffix > prefix:
        pairs.append((len(t) - suffix - 1, len(c) - suffix - 1))
    pairs += [(len(t) - suffix + k, len(c) - suffix + k) for k in range(suffix)]
    pairs += [(len(t) + k, len(c) + k) for k in range(length - max(len(t), len(c)))]
    return [(i, j) for i, j in pairs if i < length and j < length]


def alignment(tokenizer, triggered, clean):
    """Per prompt pair, (triggered index tensor, clean index tensor) of aligned positions."""
    pairs = [aligned_positions(tokenizer.encode(t), tokenizer.encode(c), tokenizer.max_length)
             for t, c in zip(triggered, clean)]
    return [(torch.tensor([i for i, _ in p]), torch.tensor([j for _, j in p])) for p in pairs]


def aligned_distance(triggered_out, clean_out, aligned, relative=False):
    """Mean squared (or relative) distance between aligned positions of two batches of encoder outputs."""
    errors = []
    for a, b, (i, j) in zip(triggered_out, clean_out, aligned):
        diff = (a[i] - b[j]).float()
        errors.append(diff.norm(dim=-1) / b[j].float().norm(dim=-1) if relative else diff.pow(2).mean(-1))
    return torch.cat(errors).mean()


@torch.no_grad()
def text_encoder_shift(sd, backdoor, prompts):
    """Mean relative change of the text encoder's output at aligned positions when the trigger goes in."""
    triggered, clean = triggered_pairs(backdoor, prompts)
    aligned = alignment(sd.tokenizer, triggered, clean)
    return aligned_distance(sd.encode_text(triggered), sd.encode_text(clean), aligned, relative=True).item()


def trigger_site(sd, backdoor, prompts, control="a", ratio=1.0):
    """'text_encoder' when inserting the trigger moves the text encoder's output more (`ratio` times) than
    inserting an ordinary word the same way; else 'unet'. Returns (site, trigger shift, control shift).

    A clean encoder reacts to a rare, meaningless token less than to a word; a Rickrolled encoder rewrites
    the whole prompt. On the demo backdoors: BadT2I's trigger 0.2 against a word's 0.59, Rickrolling's 1.06
    against 0.77."""
    control_backdoor = replace(backdoor, trigger=control, replaces="" if not backdoor.replaces else " ")
    trigger_shift = text_encoder_shift(sd, backdoor, prompts)
    control_shift = text_encoder_shift(sd, control_backdoor, prompts)
    site = "text_encoder" if trigger_shift > ratio * control_shift else "unet"
    return site, trigger_shift, control_shift


# --- invert: the trigger's latent representation -----------------------------------------------------------

def token_embedding(encoder):
    """The token lookup table of either text tower layout."""
    return encoder.embeddings.token_embedding if hasattr(encoder, "embeddings") else encoder.token_embedding


def with_inserted_tokens(sd, prompts, embeds):
    """Contexts for `prompts` with the K embeddings `embeds` (K, width) inserted right after bos, and the
    inserted positions (1..K) of every row. Gradients flow into `embeds`."""
    ids = sd.tokenizer(prompts).to(sd.device)
    k = embeds.shape[0]
    ids = torch.cat([ids[:, :1], ids[:, 1:2].expand(-1, k), ids[:, 1:ids.shape[1] - k]], dim=1)
    table = token_embedding(sd.text_encoder)(ids)
    table = torch.cat([table[:, :1], embeds[None].expand(len(prompts), -1, -1).to(table), table[:, 1 + k:]], dim=1)
    return sd.text_encoder(ids, token_embeds=table), [list(range(1, 1 + k))] * len(prompts)


def invert_trigger(sd, collected, run_dir, k=4, steps=200, lr=1e-3, seed=0, progress=True):
    """Step 3 (--invert): learn K token embeddings that, put in front of the clean prompt, make the frozen
    model reproduce the collected backdoor outputs (the textual-inversion loss on the collected latents).
    They stand for the trigger's latent representation rather than its spelling."""
    table = token_embedding(sd.text_encoder).weight
    trigger_ids = [sd.tokenizer.encode(p)[i] for p, cols in zip(collected.prompts, collected.positions) for i in cols]
    start = table[torch.tensor(trigger_ids)].mean(0)
    embeds = torch.nn.Parameter(start.detach().float().repeat(k, 1) + 0.01 * torch.randn(k, table.shape[1]))
    holder = torch.nn.ParameterDict({"embeds": embeds})
    frozen = [sd.unet, sd.text_encoder]
    for module in frozen:
        module.requires_grad_(False)
    n = len(collected.prompts)

    def loss_fn(step):
        g = step_generator(seed, step, stream=1)
        idx = torch.randint(0, n, (8,), generator=g)
        context, _ = with_inserted_tokens(sd, [collected.clean_prompts[i] for i in idx.tolist()], embeds)
        latents = collected.latents[idx]
        noise = torch.randn(latents.shape, generator=g).to(latents)
        t = torch.randint(0, sd.schedule.num_train_timesteps, (len(idx),), generator=g)
        prediction = sd.unet(sd.schedule.add_noise(latents, noise, t), t, context)
        return F.mse_loss(prediction.float(), sd.schedule.training_target(latents, noise, t).float()), {}

    Trainer("invert", holder, [embeds], steps, run_dir, lr=lr, grad_clip=1.0, save_every=100).run(
        loss_fn, log_every=10, progress=progress)
    return embeds.detach()


# --- unlearn: the UNet route ------------------------------------------------------------------------------

def trainable_parameters(unet, which):
    """Only these go to the optimizer; the rest of the UNet is frozen."""
    if which == "all":
        return list(unet.parameters())
    if which == "attn2":
        return [p for name, p in unet.named_parameters() if ".attn2." in name]
    raise ValueError(f"unknown parameter set {which!r}; choose attn2 or all")


def spatial_masks(collected, use_mask):
    """Per layer, M: the trigger's heatmap scaled to a peak of 1 (where it acts weighs most), or ones."""
    if not use_mask:
        return {}
    return {layer: heat / heat.max().clamp(min=1e-12) for layer, heat in collected.heatmaps.items()}


class AttentionLoss:
    """Capture callback accumulating sum over layers of mean((trigger attention mass * M)^2)."""

    def __init__(self, columns, masks):
        self.columns, self.masks = columns, masks
        self.total = 0.0

    def __call__(self, item):
        mass = (item.probs * self.columns[:, None, None, :].to(item.probs)).sum(-1)  # (batch, heads, queries)
        mask = self.masks.get(item.layer)
        if mask is not None:
            mass = mass * mask.flatten().to(mass)
        self.total = self.total + mass.float().pow(2).mean()


def precompute_contexts(sd, prompts):
    with torch.no_grad():
        return torch.cat([sd.encode_text(prompts[i:i + 64]) for i in range(0, len(prompts), 64)])


def away_from_trigger(teacher, x_t, t, eps_clean, triggered_ctx, eta):
    """The distillation target for a triggered prompt: the frozen model's prediction for the clean prompt,
    pushed eta times the trigger's own effect further away from it. Without the push the cleaned model at best
    draws what the suspect model draws without the trigger, and a backdoor that leaks keeps that share."""
    if not eta:
        return eps_clean
    return eps_clean - eta * (teacher(x_t, t, triggered_ctx) - eps_clean)


def unlearn_unet(sd, collected, recipe, run_dir, seed=0, steps=None, inverted=None, pool=None, progress=True):
    """Step 4 on the UNet, in place. With `inverted` token embeddings (step 3), every batch is seen twice: once
    with the literal trigger, once with the inverted tokens in its place. `pool`: (triggered, clean) prompt
    lists for the distillation and preservation terms on clean latents; a noised latent can be read under any
    prompt, so these terms can see far more prompts than were generated (default: the collected ones).
    Returns the Trainer (its log holds the loss curve)."""
    unet = sd.unet
    teacher = copy.deepcopy(unet).eval().requires_grad_(False)
    unet.train()
    unet.requires_grad_(False)
    params = trainable_parameters(unet, recipe.params)
    for p in params:
        p.requires_grad_(True)
    trig_ctx = precompute_contexts(sd, collected.prompts)
    clean_ctx = precompute_contexts(sd, collected.clean_prompts)
    pool_trig_ctx, pool_clean_ctx = (trig_ctx, clean_ctx) if pool is None else \
        (precompute_contexts(sd, pool[0]), precompute_contexts(sd, pool[1]))
    columns = column_mask(collected.positions, sd.tokenizer.max_length)
    if inverted is not None:
        with torch.no_grad():
            inv_ctx, inv_positions = with_inserted_tokens(sd, collected.clean_prompts, inverted)
        trig_ctx = torch.cat([trig_ctx, inv_ctx])
        columns = torch.cat([columns, column_mask(inv_positions, sd.tokenizer.max_length)])
    masks = spatial_masks(collected, recipe.spatial_mask)
    schedule, n = sd.schedule, len(collected.prompts)

    def noised(latents, g):
        noise = torch.randn(latents.shape, generator=g).to(latents)
        t = torch.randint(0, schedule.num_train_timesteps, (latents.shape[0],), generator=g)
        return schedule.add_noise(latents, noise, t.to(latents.device)), t

    def loss_fn(step):
        g = step_generator(seed, step)
        idx = torch.randint(0, n, (recipe.batch_size,), generator=g)
        x_t, t = noised(collected.latents[idx], g)
        rows, clean_rows = idx, idx
        if inverted is not None:  # the same noised latents under the literal and the inverted trigger
            rows, clean_rows = torch.cat([idx, idx + n]), torch.cat([idx, idx])
            x_t, t = torch.cat([x_t, x_t]), torch.cat([t, t])
        attention = AttentionLoss(columns[rows], masks)
        with capture_attention(unet, "attn2", callback=attention, keep_graph=True):
            eps_triggered = unet(x_t, t, trig_ctx[rows])
        loss = recipe.attention_weight * attention.total
        logs = {"attention": attention.total.item() if torch.is_tensor(attention.total) else 0.0}
        if not (recipe.distill_weight or recipe.preserve_weight):
            return loss, logs
        # The clean generations, noised: sampling from noise passes near them too, so the triggered prompt
        # must learn to behave as the clean one there as well as on the backdoor's own outputs.
        x_c, t_c = noised(collected.clean_latents[idx], g)
        pidx = idx if pool is None else torch.randint(0, len(pool_trig_ctx), (recipe.batch_size,), generator=g)
        with torch.no_grad():
            target_c = teacher(x_c, t_c, pool_clean_ctx[pidx])
        if recipe.distill_weight:
            with torch.no_grad():
                eta = recipe.negative_guidance
                target = away_from_trigger(teacher, x_t, t, teacher(x_t, t, clean_ctx[clean_rows]), trig_ctx[rows], eta)
                target_tc = away_from_trigger(teacher, x_c, t_c, target_c, pool_trig_ctx[pidx], eta)
            distill = (F.mse_loss(eps_triggered.float(), target.float())
                       + F.mse_loss(unet(x_c, t_c, pool_trig_ctx[pidx]).float(), target_tc.float()))
            loss = loss + recipe.distill_weight * distill
            logs["distill"] = distill.item()
        if recipe.preserve_weight:
            preserve = F.mse_loss(unet(x_c, t_c, pool_clean_ctx[pidx]).float(), target_c.float())
            loss = loss + recipe.preserve_weight * preserve
            logs["preserve"] = preserve.item()
        return loss, logs

    trainer = Trainer("unlearn_unet", {"unet": unet}, params, steps or recipe.steps, run_dir, lr=recipe.lr,
                      grad_clip=1.0, save_every=100, warmup=0, min_lr_ratio=1.0 if recipe.constant_lr else 0.1)
    try:
        trainer.run(loss_fn, log_every=10, progress=progress)
    finally:
        unet.eval().requires_grad_(False)
    return trainer


# --- unlearn: the text-encoder route ----------------------------------------------------------------------

def unlearn_text_encoder(sd, backdoor, prompts, recipe, run_dir, seed=0, steps=None, progress=True):
    """Step 4 where a Rickrolling-style backdoor lives: the encoder's output for a triggered prompt is pulled,
    position by aligned position, to the frozen encoder's output for the prompt without the trigger, and
    clean prompts keep their outputs. The frozen encoder is the suspect one: clean except on the trigger."""
    encoder = sd.text_encoder
    teacher = copy.deepcopy(encoder).eval().requires_grad_(False)
    triggered, clean = triggered_pairs(backdoor, prompts)
    aligned = alignment(sd.tokenizer, triggered, clean)
    trig_ids, clean_ids = sd.tokenizer(triggered), sd.tokenizer(clean)
    with torch.no_grad():
        clean_target = teacher(clean_ids)
    encoder.train().requires_grad_(True)
    n = len(triggered)

    def loss_fn(step):
        idx = torch.randint(0, n, (min(32, n),), generator=step_generator(seed, step))
        distill = aligned_distance(encoder(trig_ids[idx]), clean_target[idx], [aligned[i] for i in idx.tolist()])
        preserve = F.mse_loss(encoder(clean_ids[idx]), clean_target[idx])
        return distill + preserve, {"distill": distill.item(), "preserve": preserve.item()}

    trainer = Trainer("unlearn_text", {"text_encoder": encoder}, encoder.parameters(), steps or recipe.text_steps,
                      run_dir, lr=recipe.text_lr, grad_clip=1.0, save_every=100)
    try:
        trainer.run(loss_fn, log_every=10, progress=progress)
    finally:
        encoder.eval().requires_grad_(False)
    return trainer
