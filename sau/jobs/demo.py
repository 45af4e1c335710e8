"""The demo world's jobs as `python train.py` runs them: a sample grid, the quality report, the shipped backdoors.

Training the world itself is sau.world.train.train_world, and one backdoor sau.attacks.shipped.backdoor_bundle;
train.py calls those directly.
"""
from pathlib import Path

import torch

from sau import load
from sau.attacks import shipped as attacks
from sau.evaluation.metrics import load_classifier
from sau.evaluation.scorer import CLIPScorer
from sau.models.compile import compile_model
from sau.weights.bundle import is_bundle
from sau.weights.read import load_model
from sau.world import shapes
from sau.world.train import evaluate_world


def sample_grid(model, out, n=32, seed=0, steps=25, guidance=7.5, compile=False):
    """A PNG grid (8 a row) of the model's generations for n held-out captions, and those captions, row by row,
    in a .txt beside it; returns the .txt's path."""
    sd = load(model)  # a path or a demo name, as train.py's --model
    if compile:
        compile_model(sd.unet)  # sampling only: the weights stay fixed, so inductor may freeze them
    captions, _ = shapes.eval_prompts(n, seed=seed)
    images = sd.generate(captions, seeds=range(n), steps=steps, guidance_scale=guidance, progress=True)
    shapes.save_grid(images, out, nrow=8)
    text = Path(out).with_suffix(".txt")
    text.write_text("\n".join(captions) + "\n")
    return text


def quality_report(demo_dir):
    """The demo world's quality (sau.world.train.evaluate_world) measured again, as the lines to print."""
    demo = Path(demo_dir)
    result = evaluate_world(load_model(demo / "clean", dtype=torch.float32),
                            load_classifier(demo / "classifier.safetensors"), CLIPScorer.load(demo / "scorer"))
    generated, drawn = result["generated_accuracy"], result["classifier_accuracy_on_drawn"]
    return "\n".join([
        f"generations for {result['prompts']} held-out captions (DDIM {result['ddim_steps']} steps, guidance "
        f"{result['guidance']}), attributes right as the classifier reads them:",
        "  " + ", ".join(f"{field} {100 * value:.1f}%" for field, value in generated.items()),
        "classifier on 1000 drawn images: " + ", ".join(f"{f} {100 * v:.1f}%" for f, v in drawn.items()),
        f"scorer, top-1 caption among 100 for drawn images: its own {100 * result['scorer_top1_of_100']:.1f}%, "
        f"one that fits it {100 * result['scorer_top1_fits_of_100']:.1f}%; its own, among the "
        f"{100 * result['untied_share']:.1f}% of images no other caption of their group fits: "
        f"{100 * result['scorer_top1_of_100_untied']:.1f}%",
        f"  ceilings of the strict measure: {100 * result['ceiling_top1_of_100_fitting_alike']:.1f}% for a scorer "
        f"that ranks every fitting caption alike, {100 * result['ceiling_top1_of_100_most_specific']:.1f}% for an "
        f"oracle that picks the fitting caption naming the most attributes"])


def shipped_backdoors(names=None, demo_dir=None, n=200, build=True):
    """Build the shipped backdoored variants (all, or `names`; resumable) unless build=False, then measure them:
    the README's attack-success table, as text. With build=False a name may also be the path of another
    backdoored demo bundle (e.g. one `train.py backdoor` made with other settings)."""
    names = names or list(attacks.SHIPPED)
    unknown = [name for name in names if name not in attacks.SHIPPED and (build or not is_bundle(Path(name)))]
    if unknown:
        raise ValueError(f"no shipped variant {unknown[0]!r}; choose among {', '.join(attacks.SHIPPED)}"
                         + ("" if build else " or give a bundle's path"))
    if build:
        attacks.build_shipped(names, demo_dir=demo_dir)
    return attacks.shipped_report(names, demo_dir=demo_dir, n=n, progress=False)
