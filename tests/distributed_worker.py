"""The body of the two-process tests (tests/test_distributed.py): run under torchrun, or by plain python for the
single-process reference. `python tests/distributed_worker.py MODE OUT`; rank 0 saves what it made in OUT."""
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conftest import make_tiny_sd  # noqa: E402
from sau import distributed  # noqa: E402
from sau.attacks.backdoor import Backdoor  # noqa: E402
from sau.common import cli  # noqa: E402
from sau.common.files import save_safetensors  # noqa: E402
from sau.evaluation.metrics import generate_batched  # noqa: E402
from sau.method import RECIPES, collect, locate, unlearn_text_encoder, unlearn_unet  # noqa: E402

PROMPTS = ["a red circle", "a blue square on a black background", "a small green star", "a big yellow cross",
           "a purple triangle", "a white circle in the top left", "an orange square", "a small blue star"]
BACKDOOR = Backdoor.make("pixel", trigger="\u200b")


def generate(out):
    """Generation and collection, sharded by chunk."""
    sd = make_tiny_sd()
    images = generate_batched(sd, PROMPTS[:7], list(range(7)), batch_size=2, steps=3)
    collected = collect(sd, locate(sd.tokenizer, BACKDOOR, PROMPTS), range(len(PROMPTS)), steps=3, batch_size=3)
    return {"images": images, "latents": collected.latents, "clean_latents": collected.clean_latents,
            **{f"heat.{layer}": heat for layer, heat in collected.heatmaps.items()}}


def unlearn(out, steps=5):
    """5 steps of each unlearning route on one global batch (8 UNet rows, 8 text pairs)."""
    sd = make_tiny_sd()
    collected = collect(sd, locate(sd.tokenizer, BACKDOOR, PROMPTS), range(len(PROMPTS)), steps=3)
    recipe = replace(RECIPES["default"], steps=steps, batch_size=8, pool_prompts=0)
    unlearn_unet(sd, collected, recipe, out / "checkpoints", progress=False)
    pairs = (collected.prompts, collected.clean_prompts)
    unlearn_text_encoder(sd, pairs, replace(recipe, text_steps=steps), out / "checkpoints", progress=False)
    return {**{f"unet.{k}": v for k, v in sd.unet.state_dict().items()},
            **{f"text.{k}": v for k, v in sd.text_encoder.state_dict().items()}}


def unlearn_sharded(out, steps=5):
    """The UNet route under --fsdp (a plain process runs it as `unlearn`'s UNet half); run twice in one folder,
    the second run resumes from the first's checkpoint (finished: nothing left to train) and must give the same."""
    sd = make_tiny_sd()
    collected = collect(sd, locate(sd.tokenizer, BACKDOOR, PROMPTS), range(len(PROMPTS)), steps=3)
    recipe = replace(RECIPES["default"], steps=steps, batch_size=8, pool_prompts=0)
    unlearn_unet(sd, collected, recipe, out / "checkpoints", progress=False)
    return {f"unet.{k}": v for k, v in sd.unet.state_dict().items()}


def fail(out):
    """Rank 1 raises before its first collective; rank 0 waits for it in one."""
    if distributed.rank() == 1:
        raise RuntimeError("rank one's deliberate failure")
    distributed.barrier()
    return {}


def main():
    mode, out = sys.argv[1], Path(sys.argv[2])
    distributed.prepare("cpu", fsdp=mode == "unlearn_sharded" and distributed.launched())
    torch.set_num_threads(1)
    tensors = {"generate": generate, "unlearn": unlearn, "unlearn_sharded": unlearn_sharded, "fail": fail}[mode](out)
    if distributed.is_main():
        save_safetensors({k: v.contiguous() for k, v in tensors.items()}, out / f"{mode}.safetensors")


if __name__ == "__main__":
    cli.run(main)
