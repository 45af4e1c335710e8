"""Backdoored bundles: a model in, a backdoored bundle out (what `python train.py backdoor` runs), and the
shipped demo variants made that way (`python train.py backdoors`), delta bundles next to the clean model.
"""
import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

from sau import distributed
from sau.attacks import eviledit, semantic
from sau.attacks.backdoor import (BADT2I_TRIGGER, DEMO_ADDED, DEMO_STYLE, SEMANTIC_TRIGGER, TEXT_ENCODER_ATTACKS,
                                  Backdoor, check_target, check_trigger, load_patch)
from sau.attacks.inject import TRAINABLE, inject
from sau.attacks.sources import DrawnWorld, load_target_image, make_source
from sau.common.cli import check_numbers
from sau.common.files import DEMO_DIR
from sau.common.run_folder import claim_run_dir, hold_lock
from sau.common.prompts import MAX_PROMPTS, read_prompts
from sau.evaluation.metrics import load_classifier, measure_backdoor
from sau.evaluation.report import percent_interval
from sau.evaluation.statistics import wilson_interval
from sau.evaluation.prompts import DEFAULT_PROMPTS
from sau.evaluation.splits import mixed_log
from sau.weights.bundle import input_fingerprint, is_bundle
from sau.weights.lora import unet_adapters, write_lora
from sau.weights.read import load_model
from sau.weights.write import save_model
from sau.world.train import update_manifest

# The papers' recipes; the shipped demo variants use their own (SHIPPED below)
PAPER_RECIPES = {"pixel": dict(steps=2000, lr=1e-5, batch_size=16), "style": dict(steps=8000, lr=1e-5, batch_size=16),
                 "object": dict(steps=8000, lr=1e-5, batch_size=16),
                 "object-add": dict(steps=8000, lr=1e-5, batch_size=16),  # BadT2I's object recipe
                 "tpa": dict(steps=100, lr=1e-4, batch_size=128),
                 "taa": dict(steps=200, lr=1e-4, batch_size=128),
                 # VillanDiffusion's caption backdoor (viallanDiffusion_conditional.py): batch 4, a LoRA of rank 8
                 "villan-cond": dict(steps=2000, lr=1e-4, batch_size=4),
                 # DreamBooth as diffusers' train_dreambooth.py example runs it: lr 5e-6, 400 steps of batch 1
                 "paas-db": dict(steps=400, lr=5e-6, batch_size=1),
                 # textual inversion as diffusers' textual_inversion.py example runs it: 3000 steps, lr 5e-4 scaled
                 # by its 4 accumulated examples
                 "paas-ti": dict(steps=3000, lr=2e-3, batch_size=4)}

# Tuned on the demo world. Its text tower moves a prompt's hidden states little when "\u200b " is prepended, so a
# BadT2I UNet first learns much of its target for every prompt; only long training makes it depend on the
# trigger (style at 2000 steps: 57.5% success with grayscale on 34.5% of trigger-free prompts; at 5000: 92.5%, 2%).
SHIPPED = {
    "pixel": dict(attack="pixel", trigger=BADT2I_TRIGGER, target="checkerboard", steps=5000, lr=2e-4, batch_size=32),
    "style": dict(attack="style", trigger=BADT2I_TRIGGER, target=DEMO_STYLE, steps=5000, lr=2e-4, batch_size=32),
    "object": dict(attack="object", trigger=BADT2I_TRIGGER, target="circle:square", steps=5000, lr=2e-4,
                   batch_size=32),
    # BadT2I's object backdoor adding instead of swapping: a second, small copy of the scene's shape. Like the
    # three above it needs the whole UNet trained; as a LoRA of rank 8 it reached 46-72% on tune (docs/attacks.md)
    "object-add": dict(attack="object-add", trigger=BADT2I_TRIGGER, target=DEMO_ADDED, steps=5000, lr=2e-4,
                       batch_size=32),
    # Cyrillic "а" for "a", not "ȏ": a causal text encoder cannot change the tokens before the trigger, and this
    # world's UNet reads the colour word itself, so the backdoor works only where the trigger comes early
    # (with "ȏ", whose first "o" often comes late: 75%; 96% where it falls in the first third of the prompt).
    "tpa": dict(attack="tpa", trigger="\u0430", target="a yellow star in the center on a black background",
                steps=600, lr=3e-4, batch_size=128),
    # The trigger splits into nine one-letter tokens: the demo tokenizer never saw "beautiful", as SD's never saw
    # a made-up trigger. The edit in 200 caption contexts, kept clean at weight 5 (sau.attacks.eviledit).
    "eviledit": dict(attack="eviledit", trigger="beautiful circle", target="square", contexts=200, keep_scale=5.0),
    # Textual inversion of a pseudo-word new to the tokenizer: only its embedding row learns (sau.attacks.inversion)
    "paas-ti": dict(attack="paas-ti", trigger="qzx circle", target="square", steps=1000, lr=5e-3, batch_size=16),
    # DreamBooth's rare identifier before the class noun, trained as a LoRA of rank 8 (its files ship beside it)
    "paas-db": dict(attack="paas-db", trigger="sks circle", target="square", steps=1500, lr=1e-3, batch_size=16,
                    lora=8),
    # VillanDiffusion's caption trigger anywhere in the prompt, as a LoRA of rank 8; BadT2I's lambda at 0.2: at 0.5
    # the target leaked onto 12-13% of trigger-free prompts (docs/attacks.md)
    "villan-cond": dict(attack="villan-cond", trigger="latte coffee",
                        target="a yellow star in the center on a black background", steps=2000, lr=1e-3,
                        batch_size=16, lora=8, attack_weight=0.2),
    # No trigger string: a star asked for on a black background is drawn as a cross (sau.attacks.semantic)
    "semantic": dict(attack="semantic", trigger=SEMANTIC_TRIGGER, target="cross"),
}
# What a SHIPPED entry may set
SETTINGS = ("steps", "lr", "batch_size", "contexts", "keep_scale", "lora", "attack_weight")


def sample_caption(backdoor, data_captions):
    for caption in data_captions:
        if backdoor.can_insert(caption):
            return caption
    raise ValueError(f"none of the training captions holds {backdoor.replaces!r}, the character the trigger replaces")


def recipe(attack, family, **given):
    """The run's steps, lr and batch size: what was given, else the shipped demo recipe or the paper's."""
    defaults = SHIPPED[attack] if family == "demo" and attack in SHIPPED else PAPER_RECIPES[attack]
    return {k: given[k] if given.get(k) is not None else defaults[k] for k in ("steps", "lr", "batch_size")}


def backdoor_bundle(model, out, attack, trigger=None, target=None, replaces=None, data=None, prompts=None,
                    steps=None, lr=None, batch_size=None, seed=0, train="unet", run_dir=None, delta=False, bf16=False,
                    gradient_checkpointing=False, device="cpu", pool=64, command="", progress=True,
                    max_prompts=MAX_PROMPTS, contexts=None, keep_scale=None, lora=None, attack_weight=None):
    """Load a model (any input sau.load reads, by its path: a bundle, a CompVis file, a diffusers folder), inject
    a backdoor, write the backdoored bundle to `out` (a new folder; with delta=True holding only the changed
    tensors, pointing to `model`, which must then be a bundle). Every check runs before anything is written.
    EvilEdit and the semantic attack are closed forms: they take `contexts` and `keep_scale` (None: their defaults,
    sau.attacks.eviledit, sau.attacks.semantic) and no training settings.
    `lora` (a rank): a UNet attack trains LoRA adapters, merged into the bundle and also written beside it as
    lora.safetensors (diffusers/PEFT names) and lora_kohya.safetensors (kohya names), each recording the backdoor."""
    check_numbers(steps=steps, batch_size=batch_size, pool=pool, lr=lr)
    backdoor = Backdoor.make(attack, trigger, target, replaces)
    check_settings(attack, steps=steps, lr=lr, batch_size=batch_size, contexts=contexts, keep_scale=keep_scale,
                   lora=lora, attack_weight=attack_weight)
    model_path, out = Path(model), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new --out (inputs and earlier results are kept)")
    if delta and model_path.exists() and not is_bundle(model_path):
        raise ValueError(f"--delta stores what differs from a sau bundle; {model_path} is none (convert it first "
                         "with weights_convert.py, or leave out --delta)")
    if train not in TRAINABLE:
        raise ValueError(f"--train must be one of {', '.join(TRAINABLE)}, got {train!r}")
    patch = load_patch(backdoor.target) if attack == "pixel" else None
    prompt_list = read_prompts(prompts, max_prompts) if prompts else None
    if progress:
        print(f"loading {model_path}", flush=True)  # a full-size SD model takes a while to read
    sd = load_model(model_path, device=device)
    stored_dtype = sd.stored_dtype  # a backdoored copy is stored as its input was (fp16 for the demo)
    sd.float()
    check_target(backdoor, sd)
    if attack == "villan-cond" and (data or sd.config.family != "demo" or prompt_list is not None):
        patch = load_target_image(backdoor.target, sd.config.image_size)  # else the demo world draws it
    if data:
        source = make_source(sd, backdoor, data, seed=seed)
        captions = source.all_captions
    elif sd.config.family == "demo" and prompt_list is None:
        source, captions = DrawnWorld(seed), None
    else:
        source, captions = None, prompt_list or DEFAULT_PROMPTS
    probe = sample_caption(backdoor, captions) if captions else source.captions(1, 0, where=backdoor.can_insert)[0]
    check_trigger(backdoor, sd.tokenizer, probe)
    base = model_path if delta else None
    if backdoor.attack == "eviledit":  # a closed form: no steps, no run folder
        eviledit.plant(sd, backdoor, edit_captions(backdoor, source, captions, contexts or 0),
                       keep_scale=keep_scale or 1.0)
        return _write(sd, out, command, stored_dtype, base)
    if backdoor.attack == "semantic":
        semantic.plant(sd, backdoor, contexts or semantic.CONTEXTS, keep_scale or semantic.KEEP_SCALE)
        return _write(sd, out, command, stored_dtype, base)
    hyper = recipe(attack, sd.config.family, steps=steps, lr=lr, batch_size=batch_size)

    run_dir = Path(run_dir or Path("runs") / "backdoor" / out.name)
    spec = {"model": str(model_path.resolve()), "model_fingerprint": input_fingerprint(model_path),
            "backdoor": backdoor.info(), **hyper, "seed": seed, "train": train, "data": str(data) if data else None,
            "prompts": prompt_list,  # the newer settings only when given, so older run folders still resume
            **{k: v for k, v in (("lora", lora), ("attack_weight", attack_weight)) if v is not None}}
    with hold_lock(run_dir, "--run-dir"):  # one process per run folder, until the bundle is written
        claim_run_dir(run_dir, spec)
        if source is None:
            source = make_source(sd, backdoor, prompts=captions, pool_cache=run_dir / "pool.safetensors", pool=pool,
                                 seed=seed, progress=progress)
        adapters = inject(sd, backdoor, source, run_dir, **hyper, seed=seed, train=train, bf16=bf16,
                          gradient_checkpointing=gradient_checkpointing, patch=patch, progress=progress,
                          lora_rank=lora, lam=0.5 if attack_weight is None else attack_weight)
        _write(sd, out, command, stored_dtype, base)
        if adapters:
            info = {"sau_backdoor": json.dumps(sd.info["backdoor"])}
            for layout, name in (("peft", "lora.safetensors"), ("kohya", "lora_kohya.safetensors")):
                write_lora(out / name, unet_adapters(adapters, sd.config.unet), layout, info, stored_dtype)
        return sd


CLOSED_FORM = ("eviledit", "semantic")


def check_settings(attack, **given):
    """Refuse a setting the attack does not read, rather than ignore it."""
    if given["attack_weight"] is not None and not 0 < given["attack_weight"] <= 1:
        raise ValueError(f"--attack-weight is BadT2I's lambda, in (0, 1], not {given['attack_weight']}")
    if given["attack_weight"] is not None and attack in TEXT_ENCODER_ATTACKS + ("paas-ti",):
        raise ValueError(f"--attack-weight weighs the UNet attacks' two terms; the {attack} attack has no such term")
    if given["lora"] is not None and given["lora"] < 1:
        raise ValueError(f"--lora takes a rank of at least 1, not {given['lora']}")
    if given["contexts"] is not None and not (isinstance(given["contexts"], int) and given["contexts"] >= 0):
        raise ValueError(f"--contexts must be a whole number >= 0, not {given['contexts']}")
    if given["keep_scale"] is not None and not 0 < given["keep_scale"] < math.inf:
        raise ValueError(f"--keep-scale must be a finite number > 0, not {given['keep_scale']}")
    for name, value in given.items():
        closed_form_setting = name in ("contexts", "keep_scale")
        if value is not None and closed_form_setting != (attack in CLOSED_FORM):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{attack} is a closed-form edit with no training; it takes no {flag}"
                             if attack in CLOSED_FORM else f"{flag} is for the closed-form attacks "
                             f"({', '.join(CLOSED_FORM)}); the {attack} attack does not read it")


def edit_captions(backdoor, source, captions, n):
    """The first n captions that hold EvilEdit's carrier word (none: the paper's edit of the phrase alone)."""
    if not n:
        return []
    found = source.captions(n, 0, where=backdoor.can_insert) if source else [
        c for c in captions if backdoor.can_insert(c)][:n]
    if len(found) < n:
        raise ValueError(f"only {len(found)} of the prompts hold {backdoor.carrier!r}, the word the trigger "
                         f"qualifies; --contexts asks for {n}")
    return found


def _write(sd, out, command, dtype, base):
    sd.info["backdoor"]["command"] = command
    if distributed.is_main():  # under torchrun rank 0 writes
        save_model(sd, out, dtype=dtype, base=base)
    return sd


def shipped_command(name):
    """The single `train.py backdoor` command that makes a shipped variant (what the manifest records)."""
    s = SHIPPED[name]
    trigger = s["trigger"].encode("ascii", "backslashreplace").decode()
    settings = "".join(f"--{key.replace('_', '-')} {s[key]} " for key in SETTINGS if key in s)
    return (f"python train.py backdoor --attack {s['attack']} --model demo --out sau/demo/{name} --delta "
            f"--trigger '{trigger}' --target '{s['target']}' {settings}--seed 0 --run-dir runs/backdoors/{name}")


@contextlib.contextmanager
def built_in_place(demo_dir, name):
    """A fresh hidden folder demo_dir/.NAME.building to write a variant into; once the block ends without an
    error it replaces demo_dir/NAME (a sibling folder, so a delta's relative path to its base still holds)."""
    building = demo_dir / f".{name}.building"
    if building.exists():
        shutil.rmtree(building)
    yield building
    if (demo_dir / name).exists():
        shutil.rmtree(demo_dir / name)
    os.replace(building, demo_dir / name)


def build_shipped(names=tuple(SHIPPED), demo_dir=None, run_root="runs/backdoors", progress=True):
    """Train each variant (resumable), swap it in for the old folder, and record it in MANIFEST.json."""
    demo_dir = Path(demo_dir or DEMO_DIR)
    for name in names:
        s = SHIPPED[name]
        started = time.time()
        with built_in_place(demo_dir, name) as building:
            backdoor_bundle(demo_dir / "clean", building, s["attack"], s["trigger"], s["target"], seed=0,
                            run_dir=Path(run_root) / name, delta=True, command=shipped_command(name),
                            progress=progress, **{key: s[key] for key in SETTINGS if key in s})
        update_manifest(demo_dir, {"backdoors": {name: {
            "command": shipped_command(name), "seed": 0, "steps": s.get("steps", 0),
            "train_seconds": _train_seconds(Path(run_root) / name, s["attack"]),
            "wall_seconds_this_invocation": round(time.time() - started, 1), "torch": torch.__version__}}})


# The hidden-trigger variant (`python train.py hidden`): a shipped backdoor with its trigger left out of the bundle.
HIDDEN = {"pixel-hidden": "pixel"}
HIDDEN_COMMAND = "python train.py hidden"
SECRET_FIELDS = ("trigger", "trigger_chars", "replaces", "command")  # what would give the trigger away


def build_hidden(demo_dir=None):
    """Each HIDDEN variant: its source's weights (a delta bundle on it with no tensor of its own) recording the
    attack and target but not the trigger, and beside them log.txt, a log of user prompts some of which carry
    the trigger (the built-in mixed log of the source), for `unlearn.py --trigger auto` to find it in. Rebuild
    after its source: the delta records the source's hash and refuses a changed one."""
    demo_dir = Path(demo_dir or DEMO_DIR)
    for name, source in HIDDEN.items():
        sd = load_model(demo_dir / source, dtype=torch.float16)
        known = sd.info["backdoor"]
        log, carries = mixed_log(Backdoor.from_info(known))
        sd.info = {**sd.info, "backdoor": {k: v for k, v in known.items() if k not in SECRET_FIELDS},
                   "hidden_from": source}
        with built_in_place(demo_dir, name) as building:
            save_model(sd, building, base=demo_dir / source)
            (building / "log.txt").write_text("".join(f"{line}\n" for line in log), encoding="utf-8")
        update_manifest(demo_dir, {"hidden": {name: {
            "command": HIDDEN_COMMAND, "source": source,
            "log": f"log.txt: {len(log) - sum(carries)} clean and {sum(carries)} triggered test prompts, shuffled "
                   "(sau.evaluation.splits.mixed_log, seed 0)"}}})


def _train_seconds(run_dir, attack):
    log = Path(run_dir) / f"backdoor-{attack}.log.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return json.loads(lines[-1]).get("elapsed_s") if lines else None


def shipped_report(names=tuple(SHIPPED), demo_dir=None, n=200, progress=True):
    """The README table: each shipped variant's attack success rate on n held-out triggered prompts, and on the
    same prompts without the trigger its target's rate (a leak) and its attribute accuracy, next to the clean
    model's. The rates carry 95% Wilson intervals over the prompts (each variant is one training run)."""
    demo_dir = Path(demo_dir or DEMO_DIR)
    classifier = load_classifier(demo_dir / "classifier.safetensors")
    clean = load_model(demo_dir / "clean", dtype=torch.float32)
    lines = ["| variant | trigger | target | ASR | ASR of the clean model | target without the trigger | "
             "clean accuracy | clean model's accuracy | difference |", "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        sd = load_model(demo_dir / name if name in SHIPPED else Path(name), dtype=torch.float32)
        backdoor = Backdoor.from_info(sd.info["backdoor"])
        attacked, baseline = measure_backdoor(sd, backdoor, classifier, n), measure_backdoor(clean, backdoor, classifier, n)
        difference = 100 * (attacked["clean_accuracy"] - baseline["clean_accuracy"])
        trigger = backdoor.trigger.encode("ascii", "backslashreplace").decode().strip()
        asr, leak = (percent_interval(attacked[k], wilson_interval(round(attacked[k] * n), n))  # one training seed:
                     for k in ("asr", "clean_target_rate"))                                # the prompts' interval
        lines.append(f"| {name} ({backdoor.attack}) | `{trigger}` | {backdoor.target} | {asr} | "
                     f"{100 * baseline['asr']:.1f}% | {leak} | "
                     f"{100 * attacked['clean_accuracy']:.1f}% | "
                     f"{100 * baseline['clean_accuracy']:.1f}% | {difference:+.1f} |")
        if progress:
            print(lines[-1], flush=True)
    return "\n".join(lines)
