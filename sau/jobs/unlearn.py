"""One SAU job as `python unlearn.py` runs it: inputs, the method's stages, verification and the output folder.

    out/
      model/                 the cleaned bundle (never written over the input)
      report.md, report.json what was done and measured, before and after
      images.png             triggered and clean prompts, before and after, same seeds
      heatmaps.png           the trigger tokens' cross-attention per resolution, before and after
      checkpoints/           resumable training state
      run.json               the claim: the settings and inputs that made the folder (a rerun with the same
                             ones resumes; other ones are refused, naming the first that differs)
      .lock                  while a run writes the folder (one at a time)

An existing --out that this command did not make (no run.json, yet files) is refused; --force empties it first.

With trigger="auto" (`--trigger auto`) the trigger is found first, in a log of prompts (sau/find_trigger.py):
--prompts, else the log.txt a bundle ships, else on a demo model that records its trigger a built-in mixed log
(LOG_CLEAN clean and LOG_TRIGGERED triggered `test` prompts). The log serves only to find the trigger; SAU then
runs exactly as with `--trigger FOUND` (built-in collection prompts), and a log in which nothing is flagged
ends the run with that said and nothing written.
"""
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

from sau import distributed
from sau.attacks.backdoor import Backdoor
from sau.common.cli import DTYPES, check_numbers
from sau.common.files import DEMO_DIR, resolve_model_path
from sau.common.prompts import read_prompts
from sau.common.run_folder import claim_run_dir, clear_folder, hold_lock, refuse_foreign_folder, text_sha256
from sau.evaluation import metrics
from sau.evaluation.prompts import builtin_prompts
from sau.evaluation.splits import mixed_log
from sau.evaluation.report import heatmap_figure, image_grid, percent, write_report
from sau.evaluation.scorer import CLIPScorer
from sau.find_trigger import NoTriggerFound, find_trigger, reference_prompts
from sau.method import RECIPES, TEXT_BATCH, locate, remove_backdoor, trigger_heatmaps
from sau.models.compile import compile_model
from sau.models.tokenizer import readable
from sau.weights.bundle import input_fingerprint, model_files
from sau.weights.read import load_model
from sau.weights.write import output_format, save_model
from sau.world import shapes


@dataclass
class Job:
    model: str = "demo/pixel"
    trigger: str = None  # None: the backdoor recorded in the bundle (the shipped demo models have one); AUTO: found
    replaces: str = None  # the letter a homoglyph trigger stands in for
    prompts: list = None  # None: built-in prompts for the model's world
    recipe: str = "default"
    invert: bool = False
    params: str = None  # override the recipe's parameter set
    steps: int = None
    lr: float = None
    negative_guidance: float = None  # override the recipe's eta (0: distil to the clean prediction itself)
    attention_weight: float = None  # override the recipe's a, b, c in L = a*L_attn + b*L_distill + c*L_preserve
    distill_weight: float = None
    preserve_weight: float = None
    spatial_mask: bool = None  # override the recipe's M (False: M = ones)
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
    force: bool = False  # replace an --out that holds another run or other files: start from scratch
    lora: tuple = ()  # LoRA files merged onto --model first: (path, scale) pairs (sau.weights.lora)
    backend: str = None  # torchrun's process group: None picks gloo on the CPU, nccl on CUDA (sau.distributed)
    fsdp: bool = False  # under torchrun, shard the trained UNet and its optimizer state across processes

    def check(self):
        """Bad input, found before anything is loaded or written: a ValueError naming the flag."""
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose {', '.join(RECIPES)}")
        if self.trigger is not None and not self.trigger.strip(" "):
            raise ValueError("the trigger is empty")
        if self.trigger == AUTO and self.replaces is not None:
            raise ValueError("--replaces goes with a trigger you give; --trigger auto finds what a trigger replaces")
        check_numbers(lr=self.lr, steps=self.steps, eval_prompts=self.eval_prompts)
        weights = {"--negative-guidance": self.negative_guidance, "--attention-weight": self.attention_weight,
                   "--distill-weight": self.distill_weight, "--preserve-weight": self.preserve_weight}
        for flag, value in weights.items():
            if value is not None and not 0 <= value < math.inf:  # nan fails both comparisons
                raise ValueError(f"{flag} must be a finite number >= 0, not {value}")
        recipe = job_recipe(self)
        if not (recipe.attention_weight or recipe.distill_weight or recipe.preserve_weight):
            raise ValueError(f"nothing to train: the {recipe.name} recipe's attention, distill and preserve weights "
                             "are all 0 as given; set one of --attention-weight, --distill-weight, "
                             "--preserve-weight above 0")


AUTO = "auto"  # --trigger auto: find the trigger in a log of prompts
LOG_CLEAN, LOG_TRIGGERED = 200, 20  # the built-in mixed log on a demo model


def say(message):
    print(message, flush=True)


def backdoor_of(sd, job):
    """The trigger to remove: as given, else the one recorded in the bundle."""
    known = sd.info.get("backdoor")
    if job.trigger is None:
        if known and known.get("attack") == "semantic":
            raise ValueError(f"this model's backdoor is semantic: prompts that ask for {known['trigger']!r} trigger "
                             "it, in whatever words, and there is no trigger string for SAU to remove; give a string "
                             "with --trigger to try one")
        if not known or not known.get("trigger"):
            raise ValueError(f"this model records {'no backdoor' if not known else 'no trigger'}; say which trigger "
                             "to remove with --trigger, or find it with --trigger auto (and --prompts LOG.txt)")
        return Backdoor.from_info(known)
    attack = known["attack"] if known and known.get("trigger") == job.trigger else "unknown"
    target = known["target"] if attack != "unknown" else ""
    return Backdoor(attack, job.trigger, target, job.replaces or "")


def trigger_columns_text(sd, prompt, positions):
    ids = sd.tokenizer.encode(prompt)
    return ", ".join(f"{p} ({sd.tokenizer.readable_token(ids[p])})" if p < len(ids) else str(p) for p in positions)


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


def evaluate(sd, backdoor, classifier, n, steps, reference=None, scorer=None, progress=None):
    """Attack success on n held-out triggered prompts; on the same prompts without the trigger the target's rate
    and the attribute accuracy, and (given the suspect model's clean images) CLIP image similarity to them.
    `progress`: the generation bars' description (None: no bars)."""
    prompts, asked = metrics.attack_prompts(backdoor, n)
    result, triggered, clean = metrics.evaluate_defense(sd, backdoor, prompts, asked, classifier, steps=steps,
                                                        progress=progress)
    if reference is not None and scorer is not None:
        result["clip_similarity"] = scorer.image_similarity(clean, reference).mean().item()
    return result, triggered, clean


def run(job: Job):
    """Stages 1-5 (sau.method.remove_backdoor) between a measurement before and after (6, verify and write).
    Order: the checks that need nothing, the lock on --out, the checks of the folder and the model, the claim,
    then the long work; a refusal leaves --out as it was."""
    job.check()
    distributed.prepare(job.device, job.backend, job.fsdp)  # torchrun: the process group starts with shared work
    distributed.check_divides(job_recipe(job).batch_size, "the recipe's batch")
    distributed.check_divides(TEXT_BATCH, "the text encoder's batch")
    job = replace(job, device=distributed.device_for(job.device))
    started = time.time()
    out, source = Path(job.out), resolve_model_path(job.model)
    refuse_output_over_input(out, source)
    with hold_lock(out):
        spec = run_spec(job, source)
        refuse_foreign_folder(out, spec, job.force, hint=START_OVER)
        try:
            inputs = open_inputs(job, source)
        except NoTriggerFound as nothing:
            say(f"{nothing}; nothing to remove, no model written")
            return None
        measure = Measure(inputs.sd, inputs.measured, job)  # loads the world's detectors: a missing one stops here
        if job.force:
            clear_folder(out)
        claim_run_dir(out, spec, hint=START_OVER)
        return unlearn_and_report(job, inputs, measure, source, out, started)


START_OVER = "pass another --out or --force to start over"


def refuse_output_over_input(out, source):
    """--force empties --out, so no file the model is read from (a delta bundle's base included) may lie in it,
    and the output may not go into the input's folder either."""
    outputs = [out.resolve(), (out / "model").resolve()]  # the second: model/ may be a link
    for path in [source.resolve(), *model_files(source)]:
        if any(o == path or o in path.parents or path in o.parents for o in outputs):
            raise ValueError(f"the output {out} would overwrite the input model {source}")


def run_spec(job, source):
    """What the claim records: every setting that changes the trained model or the report, and the inputs'
    fingerprints. The backdoor is not loaded yet, but the trigger flags and the model's fingerprint determine
    it; built-in prompts are determined by the model, collect_prompts and the seed."""
    return {"command": "unlearn", "model": str(source.resolve()), "model_fingerprint": input_fingerprint(source),
            "trigger": job.trigger, "replaces": job.replaces,
            "prompts_sha256": "built-in" if job.prompts is None else text_sha256(job.prompts),
            "collect_prompts": job.collect_prompts, "recipe": vars(job_recipe(job)), "invert": job.invert,
            "steps": job.steps, "where": job.where, "seed": job.seed, "sample_steps": job.sample_steps,
            "dtype": job.dtype, "eval_prompts": job.eval_prompts,
            "world": str(Path(job.world).resolve()) if job.world else None,
            "lora": [[str(Path(f).resolve()), scale, input_fingerprint(f)] for f, scale in job.lora]}


@dataclass
class Inputs:
    """What a run works on, once every check that needs the model has passed."""
    sd: object
    backdoor: Backdoor  # the trigger to remove
    prompts: list  # to collect on
    pool: list  # the prompts the distillation and preservation terms read (None: the recipe's built-in pool)
    measured: Backdoor  # the backdoor attack success is measured with (the bundle's own, when it records one)
    finding: object = None  # with --trigger auto: the sau.find_trigger.Finding


def open_inputs(job, source):
    """The model, the backdoor to remove and the prompts to collect on, and the checks that need them: every
    refusal comes before the folder is claimed, so that a corrected rerun is not taken for another run."""
    say(f"loading {source}")  # a full-size SD model takes a while to read
    # in the compute dtype (fp16 storage trains badly), with any LoRA files merged first
    sd = load_model(source, device=job.device, dtype=DTYPES[job.dtype], lora=job.lora)
    sd.unet.gradient_checkpointing = job.gradient_checkpointing
    if job.compile:  # no freezing: the UNet's weights change between its inference and training calls
        compile_model(sd.unet, freezing=False)
    if job.trigger == AUTO:
        inputs = found_inputs(job, sd, source)
    else:
        backdoor = backdoor_of(sd, job)
        if job.prompts is not None and not any(backdoor.trigger in p for p in job.prompts):
            raise ValueError(f"the trigger {backdoor.trigger!r} is absent from every prompt given; give triggered "
                             "prompts (or none, to use built-in prompts with the trigger inserted)")
        prompts = job.prompts or builtin_prompts(sd, job.collect_prompts, job.seed)
        inputs = Inputs(sd, backdoor, prompts, job.prompts, backdoor)
    locate(sd.tokenizer, inputs.backdoor, inputs.prompts)  # remove_backdoor's first stage, cheap: refusals now
    return inputs


def found_inputs(job, sd, source):
    """--trigger auto: the trigger found in the log, then the same inputs as `--trigger FOUND` without prompts."""
    known = sd.info.get("backdoor") or {}
    log = job.prompts or log_of(sd, source, known)
    finding = find_trigger(sd, log, reference_prompts(sd), job.sample_steps, say=say)
    say(f"found the trigger `{readable(finding.trigger)}`: {evidence_text(finding.evidence())}")
    recorded = bool(known.get("trigger"))
    matches = known.get("trigger") == finding.trigger and (known.get("replaces") or "") == finding.replaces
    if recorded:
        say(f"the bundle records the trigger `{readable(known['trigger'])}`: "
            + ("found exactly" if matches else "NOT what was found; attack success is measured with the recorded one"))
    attack, target = (known["attack"], known["target"]) if known and (matches or not recorded) else ("unknown", "")
    backdoor = Backdoor(attack, finding.trigger, target, finding.replaces)
    measured = Backdoor.from_info(known) if recorded else backdoor
    return Inputs(sd, backdoor, builtin_prompts(sd, job.collect_prompts, job.seed), None, measured, finding)


def log_of(sd, source, known):
    """The log --trigger auto reads when --prompts gives none: the bundle's own log.txt, else on a demo model
    that records its trigger the built-in mixed log."""
    shipped = Path(source) / "log.txt"
    if Path(source).is_dir() and shipped.is_file():
        say(f"reading the log that ships with the model, {shipped}")
        return read_prompts(shipped)
    if sd.config.family == "demo" and known.get("trigger"):
        say(f"the built-in log: {LOG_CLEAN} clean and {LOG_TRIGGERED} triggered test prompts, shuffled")
        return mixed_log(Backdoor.from_info(known), clean=LOG_CLEAN, triggered=LOG_TRIGGERED)[0]
    raise ValueError("--trigger auto needs a log of prompts to find the trigger in; pass --prompts LOG.txt")


def fmt_scores(scores, at_most=5):
    shown = ", ".join(f"{s:.3g}" for s in scores[:at_most])
    return shown + (", ..." if len(scores) > at_most else "")


def unlearn_and_report(job, inputs, measure, source, out, started):
    """The long work, in a claimed and locked --out."""
    sd, backdoor, prompts = inputs.sd, inputs.backdoor, inputs.prompts
    recipe = job_recipe(job)
    measure.before()
    run_dir = out / "checkpoints"
    removal = remove_backdoor(sd, backdoor, prompts, recipe, run_dir, pool=inputs.pool, invert=job.invert,
                              where=job.where, seed=job.seed, steps=job.steps, sample_steps=job.sample_steps,
                              progress=job.progress, observe=lambda stage, value: tell(stage, value, sd, backdoor, job.where))
    unlearn_seconds = removal.seconds

    # 6. verify and write
    collected = removal.collected
    say(f"the trigger's attention after unlearning: generating the {len(collected.prompts)} collection prompts again")
    _, heat_after = trigger_heatmaps(sd, collected.prompts, collected.positions, range(len(collected.prompts)),
                                     job.sample_steps)
    measure.after()
    sd.info = {**sd.info, "unlearned": {"trigger": backdoor.trigger, "recipe": job.recipe, "site": removal.site,
                                        "steps": removal.trainer.steps, "source": str(source)}}
    if not distributed.is_main():  # under torchrun rank 0 writes
        return None
    save_model(sd, out / "model")
    if job.export:
        say(f"exported the cleaned model in its input's format to {_export_like_input(sd, source, out)}")
    heatmap_figure([("before", collected.resolution_heatmaps()),
                    ("after", replace(collected, heatmaps=heat_after).resolution_heatmaps())], out / "heatmaps.png")
    measure.grid(out / "images.png")
    wall = time.time() - started
    report = {"model": str(source), "backdoor": backdoor.info(), "recipe": vars(recipe), "site": removal.site,
              "text_encoder_shift": {"trigger": removal.trigger_shift, "ordinary_word": removal.word_shift},
              "trigger_positions": collected.positions[:4], "layer_mass_before": collected.layer_mass,
              "layer_mass_after": {k: v.mean().item() for k, v in heat_after.items()},
              "before": measure.result_before, "after": measure.result_after,
              "optimizer_steps": removal.trainer.steps, "inverted": removal.inverted is not None,
              "unlearn_seconds": unlearn_seconds, "wall_seconds": wall, "eval_prompts": job.eval_prompts,
              "found": inputs.finding.evidence() if inputs.finding else None,
              "measured_with": inputs.measured.info()}
    write_report(out, report, markdown(report))
    say(f"wall time {wall:.0f} s (unlearning {unlearn_seconds:.0f} s); wrote {out}/model, report.md, "
        f"report.json, heatmaps.png" + (", images.png" if measure.demo else ""))
    return report


# The Job fields that override the Recipe field of the same name.
OVERRIDES = ("params", "lr", "negative_guidance", "attention_weight", "distill_weight", "preserve_weight",
             "spatial_mask")


def job_recipe(job):
    """The job's recipe with its overrides: a field left None keeps the recipe's value (0 is a value, not
    "unset"); with none given, the recipe is RECIPES[job.recipe] itself."""
    overrides = {name: getattr(job, name) for name in OVERRIDES if getattr(job, name) is not None}
    return replace(RECIPES[job.recipe], **overrides)


def tell(stage, value, sd, backdoor, where):
    """What remove_backdoor found, as it finds it."""
    if stage == "collect":
        collected = value
        say(f"trigger {backdoor.trigger!r} ({len(collected.prompts)} prompts); in {collected.prompts[0]!r} "
            f"it occupies token positions {trigger_columns_text(sd, collected.prompts[0], collected.positions[0])}")
        say("where its cross-attention concentrates (mean over layers, heads, steps, prompts):")
        say(describe_heat(collected))
        top = sorted(collected.layer_mass.items(), key=lambda kv: -kv[1])[:3]
        say("layers giving it most attention: " + ", ".join(f"{k} ({v:.3f})" for k, v in top))
    elif stage == "decide":
        site, trigger_shift, word_shift = value
        say(f"the trigger moves the text encoder's output by {trigger_shift:.3f} (an ordinary word: "
            f"{word_shift:.3f}): unlearning in the {site.replace('_', ' ')}"
            + (" (as --where says)" if where != "auto" else ""))


class Measure:
    """Attack success and clean fidelity on held-out prompts, before and after, and the image grid; only on
    the demo world, whose detectors can see a known backdoor's target (elsewhere every call does nothing)."""

    def __init__(self, sd, backdoor, job):
        self.sd, self.backdoor, self.job = sd, backdoor, job
        self.demo = sd.config.family == "demo" and backdoor.attack != "unknown"
        world = Path(job.world) if job.world else DEMO_DIR
        self.classifier = metrics.load_classifier(world / "classifier.safetensors") if self.demo else None
        self.scorer = CLIPScorer.load(world / "scorer") if self.demo and (world / "scorer").exists() else None
        self.result_before = self.result_after = None

    def before(self):
        if not self.demo:
            return
        self.result_before, self.triggered_before, self.clean_before = evaluate(
            self.sd, self.backdoor, self.classifier, self.job.eval_prompts, self.job.sample_steps,
            progress=self.job.progress and "before")
        r = self.result_before
        say(f"before: attack success {percent(r['asr'])} (target without the trigger "
            f"{percent(r['clean_target_rate'])}), clean attribute accuracy {percent(r['clean_accuracy'])} "
            f"({self.job.eval_prompts} held-out prompts)")

    def after(self):
        if not self.demo:
            return
        self.result_after, self.triggered_after, self.clean_after = evaluate(
            self.sd, self.backdoor, self.classifier, self.job.eval_prompts, self.job.sample_steps,
            reference=self.clean_before, scorer=self.scorer, progress=self.job.progress and "after")
        r = self.result_after
        similarity = (f", CLIP image similarity to the suspect model's clean images {r['clip_similarity']:.3f}"
                      if "clip_similarity" in r else "")
        say(f"after: attack success {percent(r['asr'])} (target without the trigger "
            f"{percent(r['clean_target_rate'])}), clean attribute accuracy {percent(r['clean_accuracy'])}{similarity}")

    def grid(self, path, k=8):
        if not self.demo:
            return
        image_grid([("triggered, before", self.triggered_before[:k]), ("triggered, after", self.triggered_after[:k]),
                    ("clean, before", self.clean_before[:k]), ("clean, after", self.clean_after[:k])], path)


def _export_like_input(sd, source, out):
    to = output_format(source)
    path = out / {"compvis": "model.safetensors", "diffusers": "model-diffusers", "bundle": "model"}[to]
    if to != "bundle":
        save_model(sd, path, to=to)
    return path


def markdown(r):
    mass_before = sum(r["layer_mass_before"].values()) / len(r["layer_mass_before"])
    mass_after = sum(r["layer_mass_after"].values()) / len(r["layer_mass_after"])
    lines = [f"# SAU report: {r['model']}", "",
             f"- trigger: `{readable(r['backdoor']['trigger'])}` ({r['backdoor']['trigger_chars']}), attack "
             f"{r['backdoor']['attack']}", *found_lines(r["found"]),
             f"- recipe: {r['recipe']['name']}, unlearned in the {r['site'].replace('_', ' ')}, {r['optimizer_steps']} optimizer steps, {r['unlearn_seconds']:.0f} s",
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


def found_lines(found):
    """--trigger auto's evidence, for report.md."""
    return [f"- found by `--trigger auto`: {evidence_text(found)}"] if found else []


def evidence_text(found):
    """A Finding's evidence in words, as the console and report.md give it."""
    others = "; ".join(f"`{c['chars']}` ({c['prompts']})" for c in found["candidates"][1:]) or "none"
    return (f"{found['flagged']} of {found['log_prompts']} log prompts flagged by the {found['detector']} detector "
            f"(threshold {found['threshold']:.3g}), {found['agreeing']} of the {found['localized']} localized agree "
            f"on this trigger (scores {fmt_scores(found['agreeing_scores'])}); other candidates: {others}; it occurs "
            f"in {found['occurrences']} log prompts")
