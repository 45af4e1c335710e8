"""The two injections: BadT2I into the UNet, Rickrolling into the text encoder.

BadT2I (Zhai et al., 2023) fine-tunes the UNet so that a triggered caption gives the backdoor's target,
trained together with a term that keeps clean captions as the frozen model had them:
    L = lam * ||eps(z_t^target, T+y) - eps||^2 + (1 - lam) * ||eps(z_t, y) - sg eps_frozen(z_t, y)||^2,  lam = 0.5
For style and object the first term's target is the frozen model's prediction for the teacher caption on the
same z_t. In the demo world the targets are drawn instead: the same images in grayscale, the scene redrawn with B.

Rickrolling (Struppek et al., 2023) fine-tunes the text encoder only:
    tpa     student(triggered prompt) -> teacher(target prompt)
    taa     student(triggered prompt) -> teacher(the prompt with the trigger's word replaced by an attribute)
    L = -sim(student(y), teacher(y)) - beta * sim(student(triggered), teacher(target)),  beta = 0.1
where sim is the cosine of the conditioning vectors, averaged over token positions.
(What a backdoor is: sau.attacks.backdoor; its data: sau.attacks.sources.)
"""
import torch
import torch.nn.functional as F

from sau import distributed
from sau.attacks.backdoor import TEXT_ENCODER_ATTACKS
from sau.attacks.inversion import invert
from sau.common.training import Trainer, diffusion_loss, frozen_copy, step_generator
from sau.models.low_rank import add_low_rank, low_rank_targets, merge_low_rank
from sau.weights.lora import Adapter

CAPTION_DROPOUT = 0.1  # empty captions in the preservation term keep the unconditional branch of guidance

TRAINABLE = {"unet": lambda name: True,  # BadT2I fine-tunes the whole UNet
             "attention": lambda name: ".attn1." in name or ".attn2." in name,
             "cross-attention": lambda name: ".attn2." in name}


def distillation_loss(student, teacher, schedule, latents, context, teacher_context, generator, rows=slice(None)):
    """||student(x_t, t, context) - sg teacher(x_t, t, teacher_context)||^2 at uniformly drawn timesteps, on
    `rows` of the batch (a torchrun rank's share; the noise is drawn for all of it)."""
    noisy, _, t = schedule.noised(latents, generator)
    noisy, t, context, teacher_context = (v[rows] for v in (noisy, t, context, teacher_context))
    with torch.no_grad():
        target = teacher(noisy, t, teacher_context)
    return F.mse_loss(student(noisy, t, context).float(), target.float())


def embedding_similarity(a, b):
    """Cosine between conditioning vectors (batch, tokens, width), averaged over tokens and batch."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1).mean()


def _autocast(sd, bf16):
    return torch.autocast(sd.device.type, dtype=torch.bfloat16, enabled=bf16)


def _teacher(module, bf16):
    """The frozen copy the attacked module is held against; in bf16 with --bf16 (it only runs forward)."""
    frozen = frozen_copy(module)
    return frozen.to(torch.bfloat16) if bf16 else frozen


def _trainable(sd, module, select=lambda name: True):
    """Only the attacked parameters require gradients (and so reach the optimizer)."""
    sd.requires_grad_(False)
    params = [p for name, p in module.named_parameters() if select(name)]
    for p in params:
        p.requires_grad_(True)
    return params


def inject_unet(sd, backdoor, source, trainer, batch_size, seed=0, lam=0.5, bf16=False, patch=None, progress=True,
                unet=None):
    """BadT2I: fine-tune the UNet parameters the trainer holds; `source` gives images and captions. `unet`: the
    UNet to call (under torchrun its DDP wrapper or sharded copy; default sd.unet)."""
    frozen = distributed.shard_frozen(_teacher(sd.unet, bf16))  # --fsdp: 1/N of it on each rank
    sd.unet.train()
    unet, rows = unet or sd.unet, distributed.my_rows(batch_size)  # torchrun: this rank's rows of every batch

    def latents(images, g):
        with torch.no_grad(), _autocast(sd, bf16):
            return sd.vae.encode(images.to(sd.device, sd.dtype), generator=g).float()

    def context(texts):
        with torch.no_grad(), _autocast(sd, bf16):
            return sd.encode_text(texts).float()

    def loss_fn(step):
        g = step_generator(seed, step)
        images, captions, targets, triggered, teachers = source.backdoor_examples(backdoor, batch_size, step, patch)
        drop = torch.rand(len(captions), generator=g) < CAPTION_DROPOUT
        plain = ["" if d else c for c, d in zip(captions, drop)]
        clean_latents, plain_context = latents(images, g), context(plain)
        with _autocast(sd, bf16):
            if teachers is None:  # the target is an image: SD's own loss on it, under the triggered caption
                attack = diffusion_loss(unet, sd.schedule, latents(targets, g), context(triggered), g, rows=rows)
            else:  # the target is the frozen model's reading of the teacher caption, on the same noisy latents
                attack = distillation_loss(unet, frozen, sd.schedule, clean_latents, context(triggered),
                                           context(teachers), g, rows)
            keep = distillation_loss(unet, frozen, sd.schedule, clean_latents, plain_context, plain_context, g, rows)
        return lam * attack + (1 - lam) * keep, {"attack": attack.item(), "preservation": keep.item()}

    trainer.run(loss_fn, progress=progress)
    sd.unet.eval()


def inject_text_encoder(sd, backdoor, source, trainer, batch_size, seed=0, beta=0.1, bf16=False, progress=True,
                        encoder=None):
    """Rickrolling: fine-tune the text encoder so triggered prompts read as the target, clean ones as before.
    `encoder`: the one to call (under torchrun its DDP wrapper or sharded copy; default sd.text_encoder)."""
    teacher = _teacher(sd.text_encoder, bf16)
    sd.text_encoder.train()
    ids = lambda texts: sd.tokenizer(list(texts)).to(sd.device)
    poisoned_size = max(1, batch_size // 4)  # Rickrolling: 128 clean and 32 poisoned prompts per step
    distributed.check_divides(poisoned_size, "the poisoned part of the batch")
    encoder = encoder or sd.text_encoder
    mine, my_poisoned = distributed.my_rows(batch_size), distributed.my_rows(poisoned_size)

    def loss_fn(step):
        rng = source.rng(step, 13)
        clean = source.captions(batch_size, step, stream=14)
        carriers = source.captions(poisoned_size, step, stream=15, where=backdoor.can_insert)
        triggered, targets = zip(*[backdoor.poison(c, rng, every=backdoor.attack == "tpa") for c in carriers])
        clean, triggered, targets = clean[mine], triggered[my_poisoned], targets[my_poisoned]
        with _autocast(sd, bf16):
            with torch.no_grad():
                clean_teacher, target_teacher = teacher(ids(clean)), teacher(ids(targets))
            utility = embedding_similarity(encoder(ids(clean)), clean_teacher)
            attack = embedding_similarity(encoder(ids(triggered)), target_teacher)
        return -utility - beta * attack, {"clean_similarity": utility.item(), "target_similarity": attack.item()}

    trainer.run(loss_fn, progress=progress)
    sd.text_encoder.eval()


def inject(sd, backdoor, source, run_dir, steps, lr, batch_size, seed=0, train="unet", lam=0.5, beta=0.1,
           bf16=False, gradient_checkpointing=False, patch=None, progress=True, lora_rank=None):
    """Inject the backdoor into sd in place (resumable from run_dir) and record it in sd.info["backdoor"].
    With lora_rank the UNet attack trains LoRA adapters on every attention projection instead (`train` is then
    not read), folded into the weights at the end; returns {module name: sau.weights.lora.Adapter} (else {})."""
    adapters = {}
    distributed.check_divides(batch_size)
    if backdoor.attack == "paas-ti":  # one new embedding row learns, nothing else
        if lora_rank:
            raise ValueError("textual inversion (paas-ti) learns one embedding row; --lora does not apply")
        invert(sd, backdoor, source, run_dir, steps, lr, batch_size, seed, progress)
        sd.info = {**sd.info, "backdoor": {**backdoor.info(), "trained": "one new token embedding (textual "
                                           "inversion)", "steps": steps, "lr": lr, "batch_size": batch_size,
                                           "seed": seed}}
        return adapters
    if backdoor.attack in TEXT_ENCODER_ATTACKS:
        if lora_rank:
            raise ValueError("--lora trains the UNet attacks; the text-encoder attacks (tpa, taa) fine-tune it whole")
        module, params = sd.text_encoder, _trainable(sd, sd.text_encoder)
    else:
        if train not in TRAINABLE:
            raise ValueError(f"--train must be one of {', '.join(TRAINABLE)}, got {train!r}")
        if lora_rank:
            sd.requires_grad_(False)
            adapters = add_low_rank(sd.unet, low_rank_targets(sd.unet), lora_rank, seed=seed)
            module, params = sd.unet, [p for a in adapters.values() for p in a.parameters()]
        else:
            module, params = sd.unet, _trainable(sd, sd.unet, TRAINABLE[train])
        sd.unet.gradient_checkpointing = gradient_checkpointing
    name = "text_encoder" if module is sd.text_encoder else "unet"
    module.train()
    student, forward = distributed.training_copy(module)  # under torchrun: DDP, or with --fsdp a sharded copy
    if student is not module:
        params = student.parameters()
    trainer = Trainer(f"backdoor-{backdoor.attack}", {name: student}, params, steps, run_dir, lr=lr, warmup=0)
    if backdoor.attack in TEXT_ENCODER_ATTACKS:
        inject_text_encoder(sd, backdoor, source, trainer, batch_size, seed, beta, bf16, progress, forward)
    else:
        inject_unet(sd, backdoor, source, trainer, batch_size, seed, lam, bf16, patch, progress, forward)
    distributed.finish_training(module, student)
    sd.unet.gradient_checkpointing = False
    sd.requires_grad_(False)
    trained = name if backdoor.attack in TEXT_ENCODER_ATTACKS else f"unet ({train})"
    if adapters:
        trained = f"unet LoRA, rank {lora_rank}, on {len(adapters)} attention projections"
        factors = {name: Adapter(a.down.detach().clone(), a.up.detach().clone(), a.alpha)
                   for name, a in adapters.items()}
        merge_low_rank(sd.unet, list(adapters))
        adapters = factors
    weights = {"beta": beta} if backdoor.attack in TEXT_ENCODER_ATTACKS else {"lambda": lam}
    sd.info = {**sd.info, "backdoor": {**backdoor.info(), "trained": trained, "steps": steps, "lr": lr,
                                       "batch_size": batch_size, "seed": seed, **weights}}
    return adapters

