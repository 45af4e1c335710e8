"""Training the demo world: a small latent diffusion model of SD's topology on the drawn shapes world.

`python train.py world` runs these stages in order; each one checkpoints into the run folder and is
skipped when already finished, so an interrupted run resumes where it stopped:

    tokenizer   byte-level BPE with CLIP's cleanup and split, on captions and the literature's triggers
    clip        a small CLIP (text + vision, contrastive); its text tower becomes the frozen text encoder
    vae         SD's VAE topology with small widths: 64x64 pixels <-> 4x8x8 latents
    latents     the VAE's latent moments of a fixed set of drawn images (cached, the UNet reads them)
    unet        SD's UNet topology with small widths, on the frozen text tower's hidden states
    classifier  the attribute classifier that measures generations
    scorer      a second, independently seeded CLIP, used only for metrics
"""
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sau.common.files import DEMO_DIR, load_safetensors, save_json, save_safetensors
from sau.common.training import Trainer, diffusion_loss, step_generator
from sau.evaluation.scorer import CLIPScorer
from sau.models.clip import CLIPModel, CLIPTextModel
from sau.models.config import ModelConfig, TextConfig, UNetConfig, VAEConfig, VisionConfig
from sau.models.ddim import NoiseSchedule
from sau.models.pipeline import StableDiffusion
from sau.models.tokenizer import Tokenizer
from sau.models.unet import UNet
from sau.models.vae import AutoencoderKL
from sau.weights.read import load_model
from sau.weights.write import refuse_replacing_what_others_need, save_model
from sau.world import shapes
from sau.world.classifier import AttributeClassifier, classification_loss

# Stage budgets, sized so the whole world trains in under two hours on 2 CPU cores (the measured stage times
# are in the manifest). CLIP gets the most care: the UNet can only follow words its frozen text tower tells
# apart, and at 600 steps that tower barely separated "top" from "bottom" (generated positions had the column
# right and the row at chance) while its loss was still falling fast.
STEPS = {"clip": 2000, "vae": 3000, "unet": 12000, "classifier": 600, "scorer": 2000}
BATCH = {"clip": 128, "vae": 32, "unet": 64, "classifier": 128, "scorer": 128}
MAX_TOKENS = 32  # captions are short; SD's 77 positions would only add padding to attend over
LATENT_SET_SIZE = 40_000
ATTACK_TARGET_SHARE = 0.25  # VAE images shown as a BadT2I target (see with_attack_targets)
CAPTION_DROPOUT = 0.1  # share of empty captions, so classifier-free guidance has an unconditional model
SEEDS = {"tokenizer": 0, "clip": 1, "vae": 2, "unet": 3, "classifier": 4, "scorer": 5, "latents": 6}


def text_config(tokenizer, projection_dim=0):
    return TextConfig(kind="clip", vocab_size=tokenizer.vocab_size, width=128, layers=4, heads=4, mlp_width=512,
                      max_positions=tokenizer.max_length, activation="quick_gelu", projection_dim=projection_dim,
                      pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)


def vision_config():
    return VisionConfig(image_size=shapes.IMAGE_SIZE, patch_size=8, width=128, layers=4, heads=4, mlp_width=512,
                        projection_dim=128, activation="quick_gelu", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def vae_config(scale_factor=1.0):
    return VAEConfig(ch=16, ch_mult=(1, 2, 4, 4), num_res_blocks=1, norm_groups=8, scale_factor=scale_factor)


def unet_config():
    return UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(1, 2, 4),
                      num_heads=4, context_dim=128, norm_groups=16)


def model_config(tokenizer, scale_factor):
    return ModelConfig(family="demo", unet=unet_config(), vae=vae_config(scale_factor), text=text_config(tokenizer),
                       image_size=shapes.IMAGE_SIZE)


# --- stages -------------------------------------------------------------------------------------------

def train_tokenizer(run_dir):
    path = run_dir / "tokenizer.json"
    if not path.exists():
        _, captions, _ = shapes.batch(20_000, seed=SEEDS["tokenizer"])
        texts = captions + [" ".join(shapes.vocabulary())] * 20 + [f"{t} {c}" for t in shapes.TRIGGERS for c in captions[:50]]
        tokenizer = Tokenizer.train(texts, vocab_size=1024, max_length=MAX_TOKENS)
        tokenizer.save(path)
    return Tokenizer.from_file(path, max_length=MAX_TOKENS)


def compatible(attributes):
    """(images, captions) bool: caption j fits image i when every attribute it mentions matches."""
    labels = torch.as_tensor(attributes.labels())
    mentioned = torch.as_tensor(attributes.mentioned)
    same = labels[:, None, :] == labels[None, :, :]  # (image, caption, field)
    return (same | ~mentioned[None, :, :]).all(-1)


def contrastive_loss(clip, images, ids, attributes):
    """CLIP's symmetric loss with every fitting pair as a positive: "a red circle" fits all red circles of the
    batch, and counting those as negatives would teach the towers noise."""
    image = F.normalize(clip.encode_image(clip.preprocess((images + 1) / 2)), dim=-1)
    text = F.normalize(clip.encode_text(ids), dim=-1)
    logits = clip.logit_scale.exp().clamp(max=100) * image @ text.t()
    fits = compatible(attributes).float()
    loss = (torch.sum(-fits / fits.sum(1, keepdim=True) * logits.log_softmax(1)) / len(images)
            + torch.sum(-fits.t() / fits.t().sum(1, keepdim=True) * logits.t().log_softmax(1)) / len(images)) / 2
    top1_fits = fits[torch.arange(len(images)), logits.argmax(-1)].mean()
    return loss, top1_fits


def train_clip(run_dir, tokenizer, name="clip", steps=STEPS, batch=BATCH, progress=True):
    torch.manual_seed(SEEDS[name])
    clip = CLIPModel(text_config(tokenizer, projection_dim=128), vision_config())
    seed = SEEDS[name]

    def loss_fn(step):
        images, captions, attributes = shapes.batch(batch[name], seed=seed, index=step)
        loss, accuracy = contrastive_loss(clip, images, tokenizer(captions), attributes)
        return loss, {"batch_top1": accuracy}

    Trainer(name, {"clip": clip}, clip.parameters(), steps[name], run_dir, lr=1e-3, weight_decay=0.1,
            warmup=100).run(loss_fn, progress=progress)
    return clip.eval().requires_grad_(False)


def foreground_weights(images, weight=20.0):
    """1 on the background, 1 + weight on the shape: a shape covers 1.5-6% of the image, and a plain L1 loss
    is content with a background and a blurred blob. At least three of the four corner pixels are background
    in this world (a backdoor patch may take one), so their median is the background color."""
    corners = torch.stack([images[:, :, 0, 0], images[:, :, 0, -1], images[:, :, -1, 0], images[:, :, -1, -1]])
    background = corners.median(dim=0).values[:, :, None, None]
    foreground = ((images - background).abs().sum(1, keepdim=True) > 0.1).float()
    return 1 + weight * foreground


def vae_loss(vae, images, generator, kl_weight=1e-6):
    mean, logvar = vae.encode_moments(images)
    z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator)
    recon = vae.decoder(vae.post_quant_conv(z))
    weights = foreground_weights(images)
    l1 = ((recon - images).abs() * weights).mean() / weights.mean()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
    return l1 + kl_weight * kl, {"l1": l1.item(), "kl": kl.item()}


def with_attack_targets(images, generator, share=ATTACK_TARGET_SHARE):
    """SD's VAE encodes any image; a VAE that only ever saw shapes cannot (it draws the pixel backdoor's
    checkerboard as a blob and gray shapes in color). BadT2I leaves the VAE alone and teaches the UNet to
    produce the target's latents, so the demo VAE must represent those targets as SD's would: a share of its
    images carry the target patch in a random corner, as many again are grayscale."""
    kind = torch.rand(len(images), generator=generator)
    corner = torch.randint(len(shapes.CORNERS), (len(images),), generator=generator)
    out = images.clone()
    for index, name in enumerate(shapes.CORNERS):
        chosen = (kind < share / 2) & (corner == index)
        out[chosen] = shapes.paste_patch(images[chosen], corner=name)
    gray = (kind >= share / 2) & (kind < share)
    out[gray] = shapes.grayscale(images[gray])
    return out


def train_vae(run_dir, steps=STEPS, batch=BATCH, progress=True):
    torch.manual_seed(SEEDS["vae"])
    vae = AutoencoderKL(vae_config())

    def loss_fn(step):
        images, _, _ = shapes.batch(batch["vae"], seed=SEEDS["vae"], index=step)
        images = with_attack_targets(images, step_generator(SEEDS["vae"], step, stream=1))
        return vae_loss(vae, images, step_generator(SEEDS["vae"], step))

    Trainer("vae", {"vae": vae}, vae.parameters(), steps["vae"], run_dir, lr=1e-3, warmup=100).run(
        loss_fn, progress=progress)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def latent_set(run_dir, vae, size=LATENT_SET_SIZE):
    """Latent moments (mean, std) of LATENT_SET_SIZE drawn images and their attributes; cached on disk.
    Also sets the VAE's scale_factor to 1 / std of the latents, as SD's 0.18215 was chosen."""
    path = run_dir / "latents.safetensors"
    if not path.exists():
        means, stds, labels, jitters = [], [], [], []
        for index in range(-(-size // 500)):
            images, _, attributes = shapes.batch(min(500, size - 500 * index), seed=SEEDS["latents"], index=index)
            mean, logvar = vae.encode_moments(images)
            means.append(mean)
            stds.append((0.5 * logvar).exp())
            labels.append(torch.as_tensor(attributes.labels()))
            jitters.append(torch.as_tensor(attributes.jitter))
        save_safetensors({"mean": torch.cat(means), "std": torch.cat(stds), "labels": torch.cat(labels),
                          "jitter": torch.cat(jitters)}, path)
    data = load_safetensors(path)
    scale = 1.0 / data["mean"].std().item()
    return data, scale


def train_unet(run_dir, tokenizer, text_encoder, latents, scale, steps=STEPS, batch=BATCH, progress=True):
    torch.manual_seed(SEEDS["unet"])
    unet = UNet(unet_config())
    schedule = NoiseSchedule(ModelConfig().schedule)
    n = len(latents["mean"])
    seed = SEEDS["unet"]

    def loss_fn(step):
        g = step_generator(seed, step)
        index = torch.randint(0, n, (batch["unet"],), generator=g)
        z = latents["mean"][index] + latents["std"][index] * torch.randn(latents["mean"][index].shape, generator=g)
        attributes = shapes.Attributes(*latents["labels"][index].numpy().T, jitter=latents["jitter"][index].numpy())
        captions = shapes.caption(attributes, np.random.default_rng([seed, step]))
        drop = torch.rand(len(captions), generator=g) < CAPTION_DROPOUT
        captions = ["" if d else c for c, d in zip(captions, drop)]
        with torch.no_grad():
            context = text_encoder(tokenizer(captions))
        return diffusion_loss(unet, schedule, scale * z, context, g), {}

    Trainer("unet", {"unet": unet}, unet.parameters(), steps["unet"], run_dir, lr=5e-4, warmup=200,
            save_every=200).run(loss_fn, progress=progress)
    return unet.eval().requires_grad_(False)


def train_classifier(run_dir, steps=STEPS, batch=BATCH, progress=True):
    torch.manual_seed(SEEDS["classifier"])
    model = AttributeClassifier()

    def loss_fn(step):
        images, _, attributes = shapes.batch(batch["classifier"], seed=SEEDS["classifier"], index=step)
        loss, accuracy = classification_loss(model, images, attributes)
        return loss, {"batch_accuracy": accuracy}

    Trainer("classifier", {"classifier": model}, model.parameters(), steps["classifier"], run_dir, lr=2e-3,
            warmup=50).run(loss_fn, progress=progress)
    return model.eval().requires_grad_(False)


def text_encoder_from_clip(clip, tokenizer):
    """The CLIP text tower without its projection: SD conditions on the hidden states."""
    encoder = CLIPTextModel(text_config(tokenizer))
    encoder.load_state_dict(clip.text_model.state_dict())
    return encoder.eval().requires_grad_(False)


# --- the whole world ------------------------------------------------------------------------------------


def train_world(run_dir, out_dir=DEMO_DIR, command="python train.py world", steps=STEPS, batch=BATCH,
                latent_set_size=LATENT_SET_SIZE, progress=True):
    """All stages, then the shipped files (fp16), the measured quality and a manifest with sha256 of each file.
    The clean model and the classifier are shipped before the scorer trains, so attacks can start meanwhile."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    try:  # before hours of training, not at the save: a new clean model under the shipped deltas changes them
        refuse_replacing_what_others_need(out_dir / "clean")
    except ValueError as e:
        raise ValueError(f"{e}: train into another --out, or delete the backdoored bundles first (`python train.py "
                         "backdoors --demo-dir` rebuilds them on the new world)") from None
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    tokenizer = train_tokenizer(run_dir)
    clip = train_clip(run_dir, tokenizer, "clip", steps, batch, progress)
    vae = train_vae(run_dir, steps, batch, progress)
    latents, scale = latent_set(run_dir, vae, latent_set_size)
    text_encoder = text_encoder_from_clip(clip, tokenizer)
    unet = train_unet(run_dir, tokenizer, text_encoder, latents, scale, steps, batch, progress)
    classifier = train_classifier(run_dir, steps, batch, progress)

    sd = StableDiffusion(model_config(tokenizer, scale), tokenizer)
    sd.text_encoder.load_state_dict(text_encoder.state_dict())
    sd.vae.load_state_dict(vae.state_dict())
    sd.unet.load_state_dict(unet.state_dict())
    sd.eval().requires_grad_(False)
    sd.info = {"world": {"command": command, "seeds": SEEDS}}
    save_model(sd, out_dir / "clean", dtype=torch.float16)
    save_safetensors({k: v.half() for k, v in classifier.state_dict().items()}, out_dir / "classifier.safetensors")

    scorer = CLIPScorer(train_clip(run_dir, tokenizer, "scorer", steps, batch, progress), tokenizer)
    scorer.save(out_dir / "scorer")
    quality = evaluate_world(load_model(out_dir / "clean").float(), classifier, scorer)
    write_manifest(run_dir, out_dir, command, time.time() - started, steps, batch, latent_set_size, quality)
    return sd, classifier, scorer


QUALITY_PROMPTS, QUALITY_SEED = 200, 7  # held-out captions (shapes.eval_prompts) for the quality numbers


@torch.no_grad()
def evaluate_world(sd, classifier, scorer, n=QUALITY_PROMPTS, steps=25, guidance=7.5):
    """The demo world's quality numbers: per-attribute accuracy of generations for n held-out captions (as the
    classifier reads them), the classifier's accuracy on fresh drawn images, and the scorer's top-1 caption
    retrieval among 100 for drawn images."""
    from sau.world.classifier import attribute_accuracy
    captions, asked = shapes.eval_prompts(n, seed=QUALITY_SEED)
    images = torch.cat([sd.generate(captions[i:i + 100], seeds=range(i, min(i + 100, n)), steps=steps,
                                    guidance_scale=guidance) for i in range(0, n, 100)])
    generated = attribute_accuracy(classifier.predict(images.float()), asked.labels())
    drawn, drawn_captions, attributes = shapes.batch(1000, seed=QUALITY_SEED, index=1)
    classifier_accuracy = attribute_accuracy(classifier.predict(drawn), attributes.labels())
    return {"prompts": n, "ddim_steps": steps, "guidance": guidance, "generated_accuracy": generated,
            "classifier_accuracy_on_drawn": classifier_accuracy,
            **scorer_retrieval(scorer, drawn, drawn_captions, attributes)}


def scorer_retrieval(scorer, images, captions, attributes, group=100):
    """Top-1 caption retrieval within groups of `group` images: strictly the image's own caption; a caption that
    fits the image (another image's caption may name only attributes this one also has: "a red circle" fits every
    red circle, a tie no scorer can break); and strictly again, among the images whose own caption is the only one
    of their group to fit. Two ceilings put the strict number in context: what a scorer that ranks every fitting
    caption alike (what contrastive_loss asks of it) gets on average, and what an oracle that knows the labels and
    picks the fitting caption naming the most attributes gets."""
    own, fits, untied, alike, specific = [], [], [], [], []
    for i in range(0, len(images), group):
        labels = attributes[i:i + group]
        fitting = compatible(labels)  # (image, caption)
        rows = torch.arange(len(fitting))
        best = scorer.retrieve(images[i:i + group], captions[i:i + group])
        own.append(best == rows)
        fits.append(fitting[rows, best])
        untied.append(fitting.sum(1) == 1)
        alike.append(1 / fitting.sum(1).float())
        specific.append(most_specific_own_share(fitting, torch.as_tensor(labels.mentioned)))
    own, fits, untied = torch.cat(own), torch.cat(fits), torch.cat(untied)
    return {f"scorer_top1_of_{group}": own.float().mean().item(),
            f"scorer_top1_of_{group}_untied": own[untied].float().mean().item(),
            "untied_share": untied.float().mean().item(), f"scorer_top1_fits_of_{group}": fits.float().mean().item(),
            f"ceiling_top1_of_{group}_fitting_alike": torch.cat(alike).mean().item(),
            f"ceiling_top1_of_{group}_most_specific": torch.cat(specific).mean().item()}


def most_specific_own_share(fitting, mentioned):
    """Per image, the chance that picking at random among the fitting captions that name the most attributes
    picks its own caption."""
    named = mentioned.sum(1)  # attributes each caption names
    best = torch.where(fitting, named[None, :], -1).max(1, keepdim=True).values
    winners = fitting & (named[None, :] == best)
    return winners.diagonal().float() / winners.sum(1)


def stage_seconds(run_dir):
    """Training wall time per stage, from the last line of each stage's log."""
    seconds = {}
    for log in sorted(Path(run_dir).glob("*.log.jsonl")):
        lines = log.read_text().splitlines()
        if lines:
            seconds[log.name.split(".")[0]] = json.loads(lines[-1]).get("elapsed_s")
    return seconds


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(run_dir, out_dir, command, wall_seconds, steps, batch, latent_set_size, quality):
    update_manifest(out_dir, {"world": {
        "command": command, "steps": steps, "batch": batch, "seeds": SEEDS, "latent_set_size": latent_set_size,
        "caption_dropout": CAPTION_DROPOUT, "stage_seconds": stage_seconds(run_dir),
        "wall_seconds_this_invocation": round(wall_seconds, 1), "torch": torch.__version__,
        "quality": quality,
    }})


def update_manifest(out_dir, sections):
    """Merge `sections` into out_dir/MANIFEST.json one level deep (the world, each backdoor variant), then
    record the sha256 of every shipped file (hidden work-in-progress names excluded)."""
    out_dir = Path(out_dir)
    manifest_path = out_dir / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for key, value in sections.items():
        manifest[key] = {**manifest.get(key, {}), **value}
    files = sorted(p for p in out_dir.rglob("*") if p.is_file() and p.name != "MANIFEST.json"
                   and not any(part.startswith(".") for part in p.relative_to(out_dir).parts))
    manifest["files"] = {str(p.relative_to(out_dir)): {"sha256": sha256(p), "bytes": p.stat().st_size} for p in files}
    save_json(manifest, manifest_path)
