"""Spatial Attention Unlearning (SAU): find where a trigger acts in the cross-attention maps, and unlearn it there.

Read `remove_backdoor` first: it runs the method's five stages in order, and each stage is a section below.

    1. locate    the trigger's token columns in each triggered prompt
    2. collect   the suspect model's generations for the triggered prompts and their clean twins (final
                 latents: data-free), and the trigger columns' cross-attention maps over layers and steps
    3. decide    does the trigger act in the UNet, or already in the text encoder (Rickrolling)?
    4. invert    optional: K token embeddings that reproduce the backdoor through the frozen model
    5. unlearn   fine-tune where it acts. In the UNet, on a batch of B rows, with eps the trained UNet and
                 eps_o its frozen copy:

        L = a * L_attn + b * L_distill + c * L_preserve

        L_attn     = sum_l mean_{rows, heads, pixels} ( M_l * sum_{k in trigger columns} A_l[k] )^2
                     A_l the softmax probabilities of cross-attention layer l under the triggered prompt at
                     x_t; M_l the trigger's collected heatmap at that layer scaled to a peak of 1 (or ones)
        L_distill  = mse( eps(x_t, T+p),  sg y(x_t; p, T+p) )  +  mse( eps(x_c, T+q),  sg y(x_c; q, T+q) )
        L_preserve = mse( eps(x_c, q),  sg eps_o(x_c, q) )
        y(x; p, T+p) = eps_o(x, p) - eta * ( eps_o(x, T+p) - eps_o(x, p) )

                 x_t: a collected triggered latent noised at a random timestep; p its prompt without the
                 trigger, T+p with it. x_c: the collected clean latent of the same row, noised afresh. q: a
                 prompt from the pool (any prompt can be read at any noised latent, so the pool reaches far
                 more prompts than were generated; without a pool q = p). eta pushes the target past the
                 clean prediction, away from what the trigger adds (ESD's negative guidance; eta 0: the clean
                 prediction itself). mse is the mean over every element.

                 In the text encoder: the encoder's output for a triggered prompt, at aligned positions, is
                 pulled to the frozen encoder's output for the prompt without the trigger; clean prompts keep
                 their outputs.

Verifying and writing the result (stage 6 of `unlearn.py`) is the job runner's: sau/jobs/unlearn.py.

What is the paper's (its abstract: latent manipulation and spatial attention isolate and remove the trigger's
latent representation), what is reconstructed from the authors' public prototype (the `paper` recipe) and what
is this project's (the `default` recipe, the text-encoder route, the spatial mask, the pool, eta) is set out
in docs/method.md.
"""
import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from sau import distributed
from sau.common.progress import advance, image_bar
from sau.common.training import Trainer, frozen_copy, step_generator
from sau.evaluation.prompts import builtin_prompts
from sau.models.attention import capture_attention
from sau.models.tokenizer import shared_ends


@dataclass(frozen=True)
class Recipe:
    name: str
    attention_weight: float  # a: spatial attention suppression
    distill_weight: float  # b: a triggered prompt behaves as the clean one
    preserve_weight: float  # c: clean prompts keep their behaviour
    params: str  # "attn2": cross-attention layers only; "all": the whole UNet
    lr: float
    steps: int
    batch_size: int
    spatial_mask: bool  # M: weight the attention term by where the trigger's attention concentrates
    pool_prompts: int = 0  # q: prompts the distillation and preservation terms read (0: the collected ones)
    negative_guidance: float = 0.0  # eta
    steps_after_inversion: int = 0  # the prototype trains fewer steps once the trigger is inverted
    constant_lr: bool = False
    text_prompts: int = 512  # prompt pairs the text-encoder route learns on (they cost no generations)
    text_steps: int = 300
    text_lr: float = 1e-4


RECIPES = {
    # The authors' prototype: attention suppression only, whole UNet, tiny learning rate, batch 1.
    "paper": Recipe(name="paper", attention_weight=1.0, distill_weight=0.0, preserve_weight=0.0, params="all",
                    lr=2e-6, steps=100, batch_size=1, spatial_mask=False, steps_after_inversion=35,
                    constant_lr=True),
    # This project's recipe, tuned on the demo backdoors (docs/method.md has the numbers behind it). No spatial
    # mask: the ablation (docs/protocol.md) measured no difference with it on any demo backdoor, so M = ones.
    "default": Recipe(name="default", attention_weight=1.0, distill_weight=1.0, preserve_weight=1.0, params="attn2",
                      lr=3e-4, steps=450, batch_size=8, spatial_mask=False, pool_prompts=512,
                      negative_guidance=1.0),
}


@dataclass
class Removal:
    """What remove_backdoor did: its collection, where it unlearned and why, and the training run."""
    collected: "Collected"
    site: str  # "unet" or "text_encoder"
    trigger_shift: float  # how far the trigger moves the text encoder's output (stage 3)
    word_shift: float  # how far an ordinary word moves it
    trainer: Trainer
    seconds: float  # stages 4 and 5
    inverted: torch.Tensor = None  # the inverted trigger embeddings (stage 4), if any


def remove_backdoor(sd, backdoor, prompts, recipe, run_dir, pool=None, collected=None, invert=False, where="auto",
                    seed=0, steps=None, sample_steps=25, progress=True, observe=None):
    """SAU on `sd`, in place: the five stages in order. `prompts` are generated to collect on (or `collected`
    is a collection already made on them); `pool` the prompts the text-conditioned terms read (None: the
    built-in ones). `observe(stage, value)`, if given, sees each stage's result as it comes."""
    observe = observe or (lambda stage, value: None)
    if collected is None:
        located = locate(sd.tokenizer, backdoor, prompts)                                    # 1. locate
        observe("locate", located)
        collected = collect(sd, located, seeds=range(len(located.prompts)), steps=sample_steps,  # 2. collect
                            progress=progress)
        observe("collect", collected)
    site, trigger_shift, word_shift = decide(sd, backdoor, collected.clean_prompts)          # 3. decide
    site = site if where == "auto" else where
    observe("decide", (site, trigger_shift, word_shift))
    inverted, started = None, time.time()
    if invert and site == "unet":                                                            # 4. invert
        inverted = invert_trigger(sd, collected, run_dir, seed=seed, progress=progress)
        steps = steps or recipe.steps_after_inversion
    if site == "text_encoder":                                                               # 5. unlearn
        pairs = triggered_pairs(backdoor, pool or builtin_prompts(sd, recipe.text_prompts, seed))
        trainer = unlearn_text_encoder(sd, pairs, recipe, run_dir, seed, steps, progress)
    else:
        pairs = triggered_pairs(backdoor, pool or builtin_prompts(sd, recipe.pool_prompts, seed)) \
            if recipe.pool_prompts else None
        trainer = unlearn_unet(sd, collected, recipe, run_dir, seed, steps, inverted, pairs, progress)
    return Removal(collected, site, trigger_shift, word_shift, trainer, time.time() - started, inverted)


# --- 1. locate ----------------------------------------------------------------------------------------------

@dataclass
class Located:
    prompts: list  # triggered prompts
    clean_prompts: list  # the same prompts without the trigger
    positions: list  # the trigger's token positions in each triggered prompt


def locate(tokenizer, backdoor, prompts):
    """The triggered prompts, their clean twins and the trigger's token columns in each."""
    triggered, clean = triggered_pairs(backdoor, prompts)
    if not triggered:
        raise ValueError(f"the trigger {backdoor.trigger!r} cannot be put into any of the prompts")
    kept, positions = trigger_positions(tokenizer, triggered, backdoor.trigger)
    kept_set = set(kept)
    return Located(kept, [c for t, c in zip(triggered, clean) if t in kept_set], positions)


def triggered_pairs(backdoor, prompts):
    """(triggered, clean) prompt lists. A prompt that already holds the trigger is kept and its clean twin is
    made by undoing the insertion; any other prompt gets the trigger inserted the way the backdoor expects it
    (`sau.attacks.backdoor.Backdoor.insert`: BadT2I prepends it, Rickrolling puts a homoglyph in place of a
    letter). Prompts the trigger cannot go into (no letter to replace) are left out."""
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
    """The prompt as it reads without the trigger (a phrase trigger leaves the word it qualifies)."""
    if backdoor.carrier:
        return prompt.replace(backdoor.trigger, backdoor.carrier)
    if backdoor.replaces and backdoor.replaces != " ":
        return prompt.replace(backdoor.trigger, backdoor.replaces)
    return " ".join(prompt.replace(backdoor.trigger, " ").split())


def trigger_positions(tokenizer, prompts, trigger):
    """Token positions of the trigger in each prompt. Prompts where the trigger vanishes (e.g. past
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


# --- 2. collect ---------------------------------------------------------------------------------------------

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


COLLECT_BATCH = 64  # prompts generated at once: a long prompt list is collected in chunks, with a progress bar


def collect(sd, located, seeds, steps=25, guidance_scale=7.5, progress=False, batch_size=COLLECT_BATCH):
    """The suspect model's triggered and clean generations, and where the trigger's attention falls."""
    seeds = list(seeds)[:len(located.prompts)]
    with image_bar(2 * distributed.my_share(len(seeds), batch_size), "collect", enabled=progress) as bar:
        def generate(part):  # under torchrun each rank generates its share of the chunks (sau.distributed)
            moved = lambda *_: advance(bar, len(seeds[part]) / steps)  # every denoising step moves the bar
            chunk_latents, chunk_heat = trigger_heatmaps(sd, located.prompts[part], located.positions[part],
                                                         seeds[part], steps, guidance_scale, callback=moved)
            chunk_clean = sd.generate(located.clean_prompts[part], seeds[part], steps=steps,
                                      guidance_scale=guidance_scale, decode=False, callback=moved)
            return chunk_latents.cpu(), chunk_clean.cpu(), chunk_heat, len(seeds[part])  # ranks exchange CPU copies
        latents, clean_latents, heatmap_parts, sizes = zip(*distributed.map_chunks(len(seeds), batch_size, generate))
    heat = list(zip(heatmap_parts, sizes))
    heatmaps = heat[0][0] if len(heat) == 1 else {  # the mean over prompts, each chunk weighed by its size
        layer: sum(h[layer] * n for h, n in heat) / len(seeds) for layer in heat[0][0]}
    latents, clean_latents = torch.cat(latents).to(sd.device), torch.cat(clean_latents).to(sd.device)
    layer_mass = {layer: heat.mean().item() for layer, heat in heatmaps.items()}
    return Collected(located.prompts, located.clean_prompts, located.positions, latents, clean_latents, heatmaps,
                     layer_mass)


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
def trigger_heatmaps(sd, prompts, positions, seeds, steps=25, guidance_scale=7.5, callback=None):
    """Generate the triggered prompts and return (latents, per-layer trigger attention heatmaps). `callback`:
    sd.generate's, after every denoising step."""
    columns = column_mask(positions, sd.tokenizer.max_length)
    recorder = TriggerAttention(columns)
    with capture_attention(sd.unet, "attn2", callback=recorder):
        latents = sd.generate(prompts, seeds, steps=steps, guidance_scale=guidance_scale, decode=False,
                              callback=callback)
    return latents, recorder.heatmaps()


# --- 3. decide: where does the trigger act? -----------------------------------------------------------------

def decide(sd, backdoor, prompts, control="a", ratio=1.0):
    """'text_encoder' when inserting the trigger moves the text encoder's output more (`ratio` times) than
    inserting an ordinary word the same way; else 'unet'. Returns (site, trigger shift, word shift).

    A clean encoder reacts to a rare, meaningless token less than to a word; a Rickrolled encoder rewrites
    the whole prompt. On the demo backdoors: BadT2I's trigger 0.2 against a word's 0.59, Rickrolling's 1.06
    against 0.77."""
    control_backdoor = replace(backdoor, trigger=control, replaces="" if not backdoor.replaces else " ")
    trigger_shift = text_encoder_shift(sd, backdoor, prompts)
    word_shift = text_encoder_shift(sd, control_backdoor, prompts)
    site = "text_encoder" if trigger_shift > ratio * word_shift else "unet"
    return site, trigger_shift, word_shift


@torch.no_grad()
def text_encoder_shift(sd, backdoor, prompts):
    """Mean relative change of the text encoder's output at aligned positions when the trigger goes in."""
    triggered, clean = triggered_pairs(backdoor, prompts)
    aligned = alignment(sd.tokenizer, triggered, clean)
    return aligned_distance(sd.encode_text(triggered), sd.encode_text(clean), aligned, relative=True).item()


def aligned_positions(triggered_ids, clean_ids, length):
    """Pairs (i, j): position i of the triggered prompt should read like position j of the clean one.

    Both token lists share a prefix and a suffix; the differing middle (the trigger, or the word a homoglyph
    sits in) is paired by its last token, which in a causal encoder has read the whole word. Padding after
    eos pairs up in order. Positions past `length` are dropped."""
    t, c = triggered_ids, clean_ids
    prefix, suffix = shared_ends(t, c)
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
    return aligned_errors(triggered_out, clean_out, aligned, relative).mean()


def aligned_errors(triggered_out, clean_out, aligned, relative=False):
    """The squared (or relative) distance at every aligned position of every row, in one flat tensor."""
    errors = []
    for a, b, (i, j) in zip(triggered_out, clean_out, aligned):
        diff = (a[i] - b[j]).float()
        errors.append(diff.norm(dim=-1) / b[j].float().norm(dim=-1) if relative else diff.pow(2).mean(-1))
    return torch.cat(errors)


# --- 4. invert: the trigger's latent representation -------------------------------------------------------------

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
    """Learn K token embeddings that, put in front of the clean prompt, make the frozen model reproduce the
    collected backdoor outputs (the textual-inversion loss on the collected latents). They stand for the
    trigger's latent representation rather than its spelling."""
    table = token_embedding(sd.text_encoder).weight
    trigger_ids = [sd.tokenizer.encode(p)[i] for p, cols in zip(collected.prompts, collected.positions) for i in cols]
    start = table[torch.tensor(trigger_ids)].mean(0)
    embeds = torch.nn.Parameter(start.detach().float().repeat(k, 1) + 0.01 * torch.randn(k, table.shape[1]))
    holder = torch.nn.ParameterDict({"embeds": embeds})
    for module in (sd.unet, sd.text_encoder):
        module.requires_grad_(False)
    n = len(collected.prompts)

    def loss_fn(step):
        g = step_generator(seed, step, stream=1)
        idx = torch.randint(0, n, (8,), generator=g)
        context, _ = with_inserted_tokens(sd, [collected.clean_prompts[i] for i in idx.tolist()], embeds)
        latents = collected.latents[idx]
        x_t, noise, t = sd.schedule.noised(latents, g)
        prediction = sd.unet(x_t, t, context)
        return F.mse_loss(prediction.float(), sd.schedule.training_target(latents, noise, t).float()), {}

    Trainer("invert", {"trigger": holder}, [embeds], steps, run_dir, lr=lr, grad_clip=1.0, save_every=100).run(
        loss_fn, log_every=10, progress=progress)
    return embeds.detach()


# --- 5. unlearn: the UNet route -----------------------------------------------------------------------------

def unlearn_unet(sd, collected, recipe, run_dir, seed=0, steps=None, inverted=None, pool=None, progress=True):
    """Fine-tune the UNet in place on L = a * L_attn + b * L_distill + c * L_preserve (the module docstring).
    `pool`: (triggered, clean) prompt lists for q (default: the collected prompts). With `inverted` token
    embeddings (stage 4), every batch is seen twice: once with the literal trigger, once with the inverted
    tokens in its place. Returns the Trainer (its log holds the loss curve)."""
    distributed.check_divides(recipe.batch_size, "the recipe's batch")
    teacher = distributed.shard_frozen(frozen_copy(sd.unet))  # --fsdp: 1/N of it on each rank
    trainable_parameters(sd.unet, recipe.params)
    student, unet = distributed.training_copy(sd.unet)  # under torchrun: each rank trains on its rows of a batch
    data = training_data(sd, collected, inverted, pool)
    masks = spatial_masks(collected, recipe.spatial_mask)
    rows = distributed.my_rows(recipe.batch_size)

    def loss_fn(step):
        batch = sample_batch(data, sd.schedule, recipe.batch_size, step_generator(seed, step), rows)
        eps_triggered, l_attn = predict_with_attention(student, unet, batch, masks)
        terms = {"attention": l_attn}
        if recipe.distill_weight or recipe.preserve_weight:  # the frozen clean prediction at x_c serves both
            with torch.no_grad():
                eps_clean_c = teacher(batch.x_c, batch.t_c, batch.pool_clean)
        if recipe.distill_weight:
            terms["distill"] = distillation(unet, teacher, batch, eps_triggered, eps_clean_c, recipe.negative_guidance)
        if recipe.preserve_weight:
            terms["preserve"] = preservation(unet, batch, eps_clean_c)
        loss = (recipe.attention_weight * terms["attention"] + recipe.distill_weight * terms.get("distill", 0.0)
                + recipe.preserve_weight * terms.get("preserve", 0.0))
        return loss, {name: float(term.detach()) if torch.is_tensor(term) else term for name, term in terms.items()}

    trainer = Trainer("unlearn_unet", {"unet": student}, student.parameters(), steps or recipe.steps, run_dir,
                      lr=recipe.lr, grad_clip=1.0, save_every=100, warmup=0,
                      min_lr_ratio=1.0 if recipe.constant_lr else 0.1)
    try:
        trainer.run(loss_fn, log_every=10, progress=progress)
    finally:
        distributed.finish_training(sd.unet, student)
        sd.unet.eval().requires_grad_(False)
    return trainer


def predict_with_attention(unet, forward, batch, masks):
    """eps(x_t, T+p) and L_attn = sum_l mean((M_l * trigger mass)^2), the maps captured in the same pass.
    `forward`: the UNet to call, `unet` itself or its DistributedDataParallel wrapper."""
    attention = AttentionLoss(batch.columns, masks)
    with capture_attention(unet, "attn2", callback=attention, keep_graph=True):
        eps_triggered = forward(batch.x_t, batch.t, batch.triggered)
    return eps_triggered, attention.total


def distillation(unet, teacher, batch, eps_triggered, eps_clean_c, eta):
    """L_distill: the triggered prompt predicts what the frozen model predicts without the trigger, pushed eta
    times the trigger's effect further away; at the backdoor's own outputs (x_t) and at clean ones (x_c), where
    sampling from noise passes too."""
    with torch.no_grad():
        target_t = away_from_trigger(teacher, batch.x_t, batch.t, teacher(batch.x_t, batch.t, batch.clean),
                                     batch.triggered, eta)
        target_c = away_from_trigger(teacher, batch.x_c, batch.t_c, eps_clean_c, batch.pool_triggered, eta)
    return (F.mse_loss(eps_triggered.float(), target_t.float())
            + F.mse_loss(unet(batch.x_c, batch.t_c, batch.pool_triggered).float(), target_c.float()))


def away_from_trigger(teacher, x, t, eps_clean, triggered, eta):
    """y = eps_o(x, p) - eta * (eps_o(x, T+p) - eps_o(x, p)). Without the push the cleaned model at best draws
    what the suspect model draws without the trigger, and a backdoor that leaks keeps that share."""
    if not eta:
        return eps_clean
    return eps_clean - eta * (teacher(x, t, triggered) - eps_clean)


def preservation(unet, batch, eps_clean_c):
    """L_preserve: clean prompts keep the frozen model's prediction."""
    return F.mse_loss(unet(batch.x_c, batch.t_c, batch.pool_clean).float(), eps_clean_c.float())


class AttentionLoss:
    """Capture callback accumulating L_attn = sum over layers of mean((M_l * trigger attention mass)^2)."""

    def __init__(self, columns, masks):
        self.columns, self.masks = columns, masks
        self.total = 0.0

    def __call__(self, item):
        mass = (item.probs * self.columns[:, None, None, :].to(item.probs)).sum(-1)  # (batch, heads, queries)
        mask = self.masks.get(item.layer)
        if mask is not None:
            mass = mass * mask.flatten().to(mass)
        self.total = self.total + mass.float().pow(2).mean()


def spatial_masks(collected, use_mask):
    """Per layer, M: the trigger's heatmap scaled to a peak of 1 (where it acts weighs most), or ones."""
    if not use_mask:
        return {}
    return {layer: heat / heat.max().clamp(min=1e-12) for layer, heat in collected.heatmaps.items()}


def trainable_parameters(unet, which):
    """Unfreeze only these and return them: "attn2" (cross-attention) or "all"; the rest stays frozen."""
    unet.train().requires_grad_(False)
    if which == "all":
        params = list(unet.parameters())
    elif which == "attn2":
        params = [p for name, p in unet.named_parameters() if ".attn2." in name]
    else:
        raise ValueError(f"unknown parameter set {which!r}; choose attn2 or all")
    for p in params:
        p.requires_grad_(True)
    return params


@dataclass
class TrainingData:
    """Everything a UNet unlearning batch is drawn from: rows of the collection, and prompt pool contexts."""
    latents: torch.Tensor  # (n, ...) collected triggered latents
    clean_latents: torch.Tensor  # (n, ...) collected clean latents, same rows
    triggered: torch.Tensor  # (n or 2n, tokens, width) T+p contexts; rows n..2n: the inverted trigger
    clean: torch.Tensor  # (n, tokens, width) p contexts
    columns: torch.Tensor  # (n or 2n, tokens) trigger columns of each triggered row
    pool_triggered: torch.Tensor  # (m, tokens, width) T+q contexts
    pool_clean: torch.Tensor  # (m, tokens, width) q contexts
    has_pool: bool  # False: q is p, the collected prompts themselves


@dataclass
class Batch:
    x_t: torch.Tensor  # noised collected triggered latents
    t: torch.Tensor
    triggered: torch.Tensor  # T+p
    clean: torch.Tensor  # p
    columns: torch.Tensor  # the trigger columns of each row of `triggered`
    x_c: torch.Tensor  # the same rows' clean latents, noised afresh
    t_c: torch.Tensor
    pool_triggered: torch.Tensor  # T+q
    pool_clean: torch.Tensor  # q


def training_data(sd, collected, inverted=None, pool=None):
    """Text contexts computed once; with `inverted`, a second copy of every row with the inverted tokens in
    place of the literal trigger."""
    triggered = text_contexts(sd, collected.prompts)
    clean = text_contexts(sd, collected.clean_prompts)
    columns = column_mask(collected.positions, sd.tokenizer.max_length)
    if inverted is not None:
        with torch.no_grad():
            inverted_ctx, inverted_positions = with_inserted_tokens(sd, collected.clean_prompts, inverted)
        triggered = torch.cat([triggered, inverted_ctx])
        columns = torch.cat([columns, column_mask(inverted_positions, sd.tokenizer.max_length)])
    pool_triggered, pool_clean = (triggered[:len(clean)], clean) if pool is None else \
        (text_contexts(sd, pool[0]), text_contexts(sd, pool[1]))
    return TrainingData(collected.latents, collected.clean_latents, triggered, clean, columns, pool_triggered,
                        pool_clean, has_pool=pool is not None)


def sample_batch(data, schedule, batch_size, generator, mine=slice(None)):
    """One batch: rows of the collection, their latents noised at random timesteps, and pool prompts. Every
    draw comes from `generator`, in a fixed order, so a step's batch depends only on (seed, step). `mine`: the
    rows of it this torchrun rank keeps (the whole batch is drawn on every rank, so its rows are the same)."""
    n = len(data.clean)
    rows = torch.randint(0, n, (batch_size,), generator=generator)
    x_t, _, t = schedule.noised(data.latents[rows], generator)
    x_c, _, t_c = schedule.noised(data.clean_latents[rows], generator)
    pool_rows = torch.randint(0, len(data.pool_clean), (batch_size,), generator=generator) if data.has_pool \
        else rows
    rows, x_t, t, x_c, t_c, pool_rows = (v[mine] for v in (rows, x_t, t, x_c, t_c, pool_rows))
    triggered_rows, clean_rows = rows, rows
    if len(data.triggered) > n:  # the same noised latents under the literal and the inverted trigger
        triggered_rows, clean_rows = torch.cat([rows, rows + n]), torch.cat([rows, rows])
        x_t, t = torch.cat([x_t, x_t]), torch.cat([t, t])
    return Batch(x_t, t, data.triggered[triggered_rows], data.clean[clean_rows], data.columns[triggered_rows],
                 x_c, t_c, data.pool_triggered[pool_rows], data.pool_clean[pool_rows])


def text_contexts(sd, prompts):
    """The frozen text encoder's outputs for `prompts`, in chunks of 64."""
    with torch.no_grad():
        return torch.cat([sd.encode_text(prompts[i:i + 64]) for i in range(0, len(prompts), 64)])


# --- 5. unlearn: the text-encoder route ---------------------------------------------------------------------

TEXT_BATCH = 32  # prompt pairs per step

def unlearn_text_encoder(sd, pairs, recipe, run_dir, seed=0, steps=None, progress=True):
    """Where a Rickrolling-style backdoor lives: the encoder's output for a triggered prompt is pulled,
    position by aligned position, to the frozen encoder's output for the prompt without the trigger, and
    clean prompts keep their outputs. The frozen encoder is the suspect one: clean except on the trigger.
    `pairs`: (triggered, clean) prompt lists."""
    encoder = sd.text_encoder
    teacher = frozen_copy(encoder)
    triggered, clean = pairs
    aligned = alignment(sd.tokenizer, triggered, clean)
    trig_ids, clean_ids = sd.tokenizer(triggered), sd.tokenizer(clean)
    with torch.no_grad():
        clean_target = teacher(clean_ids)
    encoder.train().requires_grad_(True)
    n = len(triggered)
    batch_size = min(TEXT_BATCH, n)
    distributed.check_divides(batch_size, "the text encoder's batch")
    forward, rows = distributed.data_parallel(encoder), distributed.my_rows(batch_size)

    def loss_fn(step):
        everyone = torch.randint(0, n, (batch_size,), generator=step_generator(seed, step))
        idx = everyone[rows]  # this torchrun rank's rows (one process: all of them)
        errors = aligned_errors(forward(trig_ids[idx]), clean_target[idx], [aligned[i] for i in idx.tolist()])
        distill = distributed.global_mean(errors, sum(len(aligned[i][0]) for i in everyone.tolist()))
        preserve = F.mse_loss(forward(clean_ids[idx]), clean_target[idx])
        return distill + preserve, {"distill": distill.item(), "preserve": preserve.item()}

    trainer = Trainer("unlearn_text", {"text_encoder": encoder}, encoder.parameters(), steps or recipe.text_steps,
                      run_dir, lr=recipe.text_lr, grad_clip=1.0, save_every=100)
    try:
        trainer.run(loss_fn, log_every=10, progress=progress)
    finally:
        encoder.eval().requires_grad_(False)
    return trainer
