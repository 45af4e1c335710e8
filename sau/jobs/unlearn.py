"""One SAU job as `python unlearn.py` runs it: inputs, the method's stages, verification and the output folder.

    out/
      model/                 the cleaned bundle (never written over the input)
      report.md, report.json what was done and measured, before and after
      images.png             triggered and clean prompts, before and after, same seeds
      heatmaps.png           the trigger tokens' cross-attention per resolution, before and after
      checkpoints/           resumable training state
"""
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sau.evaluation import metrics

from sau.world import shapes
from sau.attacks.inject import DEFAULT_PROMPTS, Backdoor, claim_run_dir
from sau.weights.bundle import DEMO_DIR, resolve_model_path
from sau.models.compile import compile_model
from sau.evaluation.scorer import CLIPScorer
from sau.evaluation.report import heatmap_figure, image_grid, percent, write_report
from sau.method import (RECIPES, collect, invert_trigger, trigger_heatmaps, trigger_site, triggered_pairs,
                  unlearn_text_encoder, unlearn_unet)


TEXT_PROMPTS = 512
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Job:
    model: str = "demo/pixel"
    trigger: str = None  # None: the backdoor recorded in the bundle (the shipped demo models have one)
    replaces: str = None  # the letter a homoglyph trigger stands in for
    prompts: list = None  # None: built-in prompts for the model's world
    recipe: str = "default"
    invert: bool = False
    params: str = None  # override the recipe's parameter set
    steps: int = None
    lr: float = None
    negative_guidance: float = None  # override the recipe's eta (0: distil to the clean prediction itself)
    where: str = "auto"  # auto | unet | text_encoder
    out: str = "runs/unlearn"
    seed: int = 0
    collect_prompts: int = 64
    eval_prompts: int = 200
    sample_steps: int = 25
    progress: bool = True
    device: str = "cpu"
    dtype: str = "float32"  # float32 | bfloat16 (on GPUs)
    gradient_checkpointing: bool = False  # recompute activations in backward: full-size SD on smaller GPUs
    export: bool = False  # also write the cleaned model in the input's own format (single file / diffusers folder)
    world: str = None  # the demo world's measuring models (classifier.safetensors, scorer/); None: the shipped ones
    compile: bool = False  # torch.compile the UNet (sau/models/compile.py)


def say(message):
    print(message, flush=True)


def backdoor_of(sd, job):
    """The trigger to remove: as given, else the one recorded in the bundle."""
    known = sd.info.get("backdoor")
    if job.trigger is None:
        if not known:
            raise ValueError("this model records no backdoor; say which trigger to remove with --trigger")
        return Backdoor.from_info(known)
    attack = known["attack"] if known and known.get("trigger") == job.trigger else "unknown"
    target = known["target"] if attack != "unknown" else ""
    return Backdoor(attack, job.trigger, target, job.replaces or "")


def builtin_prompts(sd, n, seed):
    """Prompts to collect on: the demo world's own captions (a stream evaluation never sees), or generic ones."""
    if sd.config.family == "demo":
        _, captions, _ = shapes.batch(n, seed=1000 + seed)
        return captions
    return (DEFAULT_PROMPTS * (n // len(DEFAULT_PROMPTS) + 1))[:n]


def unlearn_at(site, sd, backdoor, collected, recipe, run_dir, prompts=None, seed=0, steps=None, inverted=None,
               progress=True):
    """Step 4 where the trigger acts. Text prompts cost no generations, so both routes read many more of them
    than were collected: the text encoder learns on TEXT_PROMPTS pairs, the UNet's text-conditioned terms on
    the recipe's pool (user prompts, when given, take the place of the built-in ones). Returns the Trainer."""
    if site == "text_encoder":
        text_prompts = prompts or builtin_prompts(sd, TEXT_PROMPTS, seed)
        return unlearn_text_encoder(sd, backdoor, text_prompts, recipe, run_dir, seed, steps, progress)
    pool = None
    if recipe.pool_prompts:
        pool = triggered_pairs(backdoor, prompts or builtin_prompts(sd, recipe.pool_prompts, seed))
    return unlearn_unet(sd, collected, recipe, run_dir, seed, steps, inverted, pool, progress)


def trigger_columns_text(sd, prompt, positions):
    ids = sd.tokenizer.encode(prompt)
    return ", ".join(f"{p} ({sd.tokenizer.decode([ids[p]])!r})" if p < len(ids) else str(p) for p in positions)


def describe_heat(collected):
    """Per resolution, where the trigger's attention peaks, in words from the demo world's 3x3 grid."""
    lines = []
    for (h, w), heat in collected.resolution_heatmaps().items():
        row, col = divmod(int(heat.flatten().argmax()), w)
        where = shapes.POSITIONS[3 * min(2, 3 * row // h) + min(2, 3 * col // w)]
        share = heat.max().item() / max(heat.mean().item(), 1e-12)
        lines.append(f"  {h}x{w}: mean mass {heat.mean().item():.3f}, peak {heat.max().item():.3f} "
                     f"at row {row} col {col} ({where}), {share:.1f}x the mean")
    return "\n".join(lines)


def evaluate(sd, backdoor, classifier, n, steps, reference=None, scorer=None):
    """Attack success on n held-out triggered prompts; on the same prompts without the trigger the target's rate
    and the attribute accuracy, and (given the suspect model's clean images) CLIP image similarity to them."""
    prompts, asked = metrics.attack_prompts(backdoor, n)
    result, triggered, clean = metrics.evaluate_defense(sd, backdoor, prompts, asked, classifier, steps=steps)
    if reference is not None and scorer is not None:
        result["clip_similarity"] = scorer.image_similarity(clean, reference).mean().item()
    return result, triggered, clean


def run(job: Job):
    started = time.time()
    out = Path(job.out)
    source = resolve_model_path(job.model)
    if out.resolve() == source.resolve() or source.resolve() in (out / "model").resolve().parents or \
            (out / "model").resolve() == source.resolve():
        raise ValueError(f"the output {out} would overwrite the input model {source}")
    from sau import load
    sd = load(job.model, device=job.device, dtype=DTYPES[job.dtype])  # fp16 storage trains badly: compute dtype
    sd.unet.gradient_checkpointing = job.gradient_checkpointing
    if job.compile:  # no freezing: the UNet's weights change between its inference and training calls
        compile_model(sd.unet, freezing=False)
    backdoor = backdoor_of(sd, job)
    recipe = RECIPES[job.recipe]
    recipe = replace(recipe, params=job.params or recipe.params, lr=job.lr or recipe.lr)
    if job.negative_guidance is not None:  # 0 is a value here, not "unset"
        recipe = replace(recipe, negative_guidance=job.negative_guidance)
    if job.prompts is not None and not any(backdoor.trigger in p for p in job.prompts):
        raise ValueError(f"the trigger {backdoor.trigger!r} is absent from every prompt given; give triggered prompts "
                         "(or none, to use built-in prompts with the trigger inserted)")
    prompts = job.prompts or builtin_prompts(sd, job.collect_prompts, job.seed)

    # 1-2. locate and collect
    collected = collect(sd, backdoor, prompts, seeds=range(len(prompts)), steps=job.sample_steps)
    say(f"trigger {backdoor.trigger!r} ({len(collected.prompts)} prompts); in {collected.prompts[0]!r} "
        f"it occupies token positions {trigger_columns_text(sd, collected.prompts[0], collected.positions[0])}")
    say("where its cross-attention concentrates (mean over layers, heads, steps, prompts):")
    say(describe_heat(collected))
    top = sorted(collected.layer_mass.items(), key=lambda kv: -kv[1])[:3]
    say("layers giving it most attention: " + ", ".join(f"{k} ({v:.3f})" for k, v in top))

    # before
    demo = sd.config.family == "demo" and backdoor.attack != "unknown"
    world = Path(job.world) if job.world else DEMO_DIR
    classifier = metrics.load_classifier(world / "classifier.safetensors") if demo else None
    scorer = CLIPScorer.load(world / "scorer") if demo and (world / "scorer").exists() else None
    before = None
    if demo:
        before, trig_before, clean_before = evaluate(sd, backdoor, classifier, job.eval_prompts, job.sample_steps)
        say(f"before: attack success {percent(before['asr'])} (target without the trigger "
            f"{percent(before['clean_target_rate'])}), clean attribute accuracy {percent(before['clean_accuracy'])} "
            f"({job.eval_prompts} held-out prompts)")

    # 3. where does it act; 4. unlearn there
    site, trigger_shift, control_shift = trigger_site(sd, backdoor, collected.clean_prompts)
    site = site if job.where == "auto" else job.where
    say(f"the trigger moves the text encoder's output by {trigger_shift:.3f} (an ordinary word: {control_shift:.3f}): "
        f"unlearning in the {site.replace('_', ' ')}" + (" (as --where says)" if job.where != "auto" else ""))
    run_dir = out / "checkpoints"
    claim_run_dir(run_dir, {"model": str(source.resolve()), "backdoor": backdoor.info(), "recipe": vars(recipe),
                            "invert": job.invert, "steps": job.steps, "where": job.where, "seed": job.seed})
    inverted = None
    unlearn_started = time.time()
    steps = job.steps
    if job.invert and site == "unet":
        inverted = invert_trigger(sd, collected, run_dir, seed=job.seed, progress=job.progress)
        steps = job.steps or recipe.steps_after_inversion
    trainer = unlearn_at(site, sd, backdoor, collected, recipe, run_dir, job.prompts, job.seed, steps, inverted,
                         job.progress)
    unlearn_seconds = time.time() - unlearn_started

    # 5. verify and write
    _, heat_after = trigger_heatmaps(sd, collected.prompts, collected.positions, range(len(collected.prompts)),
                                     job.sample_steps)
    after_collected = replace(collected, heatmaps=heat_after)
    after = None
    if demo:
        after, trig_after, clean_after = evaluate(sd, backdoor, classifier, job.eval_prompts, job.sample_steps,
                                                  reference=clean_before, scorer=scorer)
        similarity = (f", CLIP image similarity to the suspect model's clean images {after['clip_similarity']:.3f}"
                      if "clip_similarity" in after else "")
        say(f"after: attack success {percent(after['asr'])} (target without the trigger "
            f"{percent(after['clean_target_rate'])}), clean attribute accuracy {percent(after['clean_accuracy'])}"
            f"{similarity}")
    sd.info = {**sd.info, "unlearned": {"trigger": backdoor.trigger, "recipe": job.recipe, "site": site,
                                        "steps": trainer.steps, "source": str(source)}}
    sd.save(out / "model")
    if job.export:
        exported = _export_like_input(sd, source, out)
        say(f"exported the cleaned model in its input's format to {exported}")
    heatmap_figure([("before", collected.resolution_heatmaps()), ("after", after_collected.resolution_heatmaps())],
                   out / "heatmaps.png")
    if demo:
        k = 8
        image_grid([("triggered, before", trig_before[:k]), ("triggered, after", trig_after[:k]),
                    ("clean, before", clean_before[:k]), ("clean, after", clean_after[:k])], out / "images.png")
    wall = time.time() - started
    report = {"model": str(source), "backdoor": backdoor.info(), "recipe": vars(recipe), "site": site,
              "text_encoder_shift": {"trigger": trigger_shift, "ordinary_word": control_shift},
              "trigger_positions": collected.positions[:4], "layer_mass_before": collected.layer_mass,
              "layer_mass_after": {k: v.mean().item() for k, v in heat_after.items()},
              "before": before, "after": after, "optimizer_steps": trainer.steps, "inverted": inverted is not None,
              "unlearn_seconds": unlearn_seconds, "wall_seconds": wall, "eval_prompts": job.eval_prompts}
    write_report(out, report, markdown(report))
    say(f"wall time {wall:.0f} s (unlearning {unlearn_seconds:.0f} s); wrote {out}/model, report.md, "
        f"report.json, heatmaps.png" + (", images.png" if demo else ""))
    return report


def _export_like_input(sd, source, out):
    from sau.weights.read import output_format
    from sau.weights.write import save_model
    to = output_format(source)
    path = out / {"compvis": "model.safetensors", "diffusers": "model-diffusers", "bundle": "model"}[to]
    if to != "bundle":
        save_model(sd, path, to=to)
    return path


def markdown(r):
    mass_before = sum(r["layer_mass_before"].values()) / len(r["layer_mass_before"])
    mass_after = sum(r["layer_mass_after"].values()) / len(r["layer_mass_after"])
    lines = [f"# SAU report: {r['model']}", "",
             f"- trigger: `{r['backdoor']['trigger']!r}` ({r['backdoor']['trigger_chars']}), attack "
             f"{r['backdoor']['attack']}", f"- recipe: {r['recipe']['name']}, unlearned in the "
             f"{r['site'].replace('_', ' ')}, {r['optimizer_steps']} optimizer steps, {r['unlearn_seconds']:.0f} s",
             f"- trigger attention mass (mean over cross-attention layers): {mass_before:.4f} before, "
             f"{mass_after:.4f} after", ""]
    if r["before"]:
        lines += ["| | before | after |", "|---|---|---|",
                  f"| attack success ({r['eval_prompts']} held-out triggered prompts) | {percent(r['before']['asr'])} "
                  f"| {percent(r['after']['asr'])} |",
                  f"| target without the trigger (same prompts) | {percent(r['before'].get('clean_target_rate'))} "
                  f"| {percent(r['after'].get('clean_target_rate'))} |",
                  f"| clean attribute accuracy (same prompts, no trigger) | {percent(r['before']['clean_accuracy'])} "
                  f"| {percent(r['after']['clean_accuracy'])} |",
                  f"| CLIP image similarity to the suspect's clean images | 1 | "
                  f"{r['after'].get('clip_similarity', float('nan')):.3f} |", "",
                  "![images](images.png)", ""]
    lines += ["![heatmaps](heatmaps.png)", "", f"Wall time {r['wall_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"
