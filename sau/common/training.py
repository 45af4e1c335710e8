"""A small resumable training loop shared by the demo world, the attacks and unlearning.

Every job here draws its batch for step k from (seed, k), so a run resumed from a checkpoint continues
exactly where it stopped: the checkpoint holds the weights, the optimizer state and the step count,
nothing else. Checkpoints hold only tensors and plain numbers and are read with weights_only=True.

Under torchrun (sau.distributed) every rank runs the same loop on its rows of the global batch, through
DistributedDataParallel or, with --fsdp, on a sharded module (its checkpoint then holds the gathered weights and
the optimizer state keyed by parameter name); only rank 0 writes the checkpoint and the log, and the loss it logs
is the mean over ranks, the global batch's.
"""
import copy
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sau import distributed
from sau.common.files import atomic_write


class NonFiniteLoss(RuntimeError):
    """Training stopped because the loss or the gradients were not finite; the weights are the last good ones."""


def step_generator(seed, step, stream=0):
    """A torch.Generator that depends only on (seed, step, stream)."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + stream) * 1_000_003 + step) % (2 ** 63))


def frozen_copy(module):
    """A copy of `module` in eval mode with no gradients: the teacher a fine-tuned module is held against."""
    return copy.deepcopy(module).eval().requires_grad_(False)


def diffusion_loss(unet, schedule, latents, context, generator, reduction="mean", rows=slice(None)):
    """The epsilon/v-prediction loss at uniformly drawn timesteps, SD's training objective. `rows`: the part of
    the batch this torchrun rank computes (the noise is drawn for the whole batch on every rank)."""
    noisy, noise, t = schedule.noised(latents, generator)
    noisy, noise, t, latents, context = (v[rows] for v in (noisy, noise, t, latents, context))
    prediction = unet(noisy, t, context)
    target = schedule.training_target(latents, noise, t)
    return torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction=reduction)


class Trainer:
    """Runs loss_fn(step) -> (loss, logs) for `steps` steps with AdamW, checkpointing to run_dir/name.pt.

    On a non-finite loss or gradient it restores the last good weights and raises NonFiniteLoss.
    """

    def __init__(self, name, modules, params, steps, run_dir, lr=1e-3, weight_decay=0.0, grad_clip=1.0,
                 save_every=250, warmup=0, min_lr_ratio=0.1):
        self.name, self.modules, self.steps = name, modules, steps
        self.params = [p for p in params if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.lr, self.warmup, self.min_lr_ratio = lr, warmup, min_lr_ratio
        self.grad_clip, self.save_every = grad_clip, save_every
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / f"{name}.pt"
        self.log_path = self.run_dir / f"{name}.log.jsonl"
        self.step = 0
        self.sharded = any(distributed.is_sharded(m) for m in modules.values())

    def learning_rate(self, step):
        """Linear warmup, then cosine decay to min_lr_ratio * lr."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def state(self):
        if self.sharded:  # --fsdp: gathered from every rank, the optimizer state keyed by parameter name
            return {"step": self.step, **distributed.full_training_state(self.modules, self.optimizer)}
        return {"step": self.step, "optimizer": self.optimizer.state_dict(),
                "modules": {k: m.state_dict() for k, m in self.modules.items()}}

    def save(self):
        state = self.state()  # on every rank: under --fsdp a collective
        atomic_write(self.path, lambda tmp: torch.save(state, tmp))  # rank 0 writes

    def resume(self):
        """Load the checkpoint if there is one; returns True when the job had already finished."""
        if not self.path.exists():
            return False
        state = torch.load(self.path, weights_only=True)
        if "optimizer_by_name" in state:  # written under --fsdp; reads into sharded and plain modules alike
            distributed.load_full_training_state(self.modules, self.optimizer, state)
        elif self.sharded:
            raise ValueError(f"{self.path} was written without --fsdp; resume it without --fsdp, or start over")
        else:
            for k, m in self.modules.items():
                m.load_state_dict(state["modules"][k])
            self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        return self.step >= self.steps

    def run(self, loss_fn, log_every=50, progress=True):
        if distributed.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.resume():
            return
        good = {k: {n: t.clone() for n, t in m.state_dict().items()} for k, m in self.modules.items()}
        good_step = self.step
        bar = tqdm(total=self.steps, initial=self.step, desc=self.name, dynamic_ncols=True,
                   disable=not (progress and distributed.is_main()))
        started = time.time()
        while self.step < self.steps:
            for group in self.optimizer.param_groups:
                group["lr"] = self.learning_rate(self.step)
            loss, logs = loss_fn(self.step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip or float("inf"))
            loss, logs = self.global_loss(loss, logs)
            if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                for k, m in self.modules.items():
                    m.load_state_dict(good[k])
                raise NonFiniteLoss(f"{self.name}: non-finite loss or gradient at step {self.step}; stopped and kept "
                                    f"the last good weights (step {good_step}); try a smaller learning rate")
            self.optimizer.step()
            self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if self.step % log_every == 0 or self.step in (1, self.steps):  # the first step: where a loss began
                self._log({"step": self.step, "loss": loss.item(), "lr": self.learning_rate(self.step - 1),
                           "elapsed_s": round(time.time() - started, 1), **{k: float(v) for k, v in logs.items()}})
            if self.step % self.save_every == 0 or self.step == self.steps:
                good = {k: {n: t.clone() for n, t in m.state_dict().items()} for k, m in self.modules.items()}
                good_step = self.step
                self.save()
        bar.close()

    @staticmethod
    def global_loss(loss, logs):
        """The loss and log terms of the global batch: each rank's, averaged over ranks (every rank then takes
        the same decisions, a non-finite stop included). One process: as they are."""
        if distributed.world_size() == 1:
            return loss, logs
        means = distributed.mean_over_ranks(torch.tensor([float(loss.detach()), *map(float, logs.values())]))
        return means[0], dict(zip(logs, means[1:].tolist()))

    def _log(self, record):
        if not distributed.is_main():
            return
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
