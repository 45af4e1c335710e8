"""The noise schedule, the DDIM sampler and classifier-free guidance.

Stable Diffusion trains on a "scaled linear" schedule (LDM calls it "linear"): the square roots of the
betas are evenly spaced. Sampling uses DDIM with "leading" timestep spacing and steps_offset 1, so 50
steps visit t = 981, 961, ..., 1, and the last step lands on alphas_cumprod[0] rather than 1.0.

Every random draw is per image: image i of a batch depends only on its own generator, so an image
does not change when the batch around it does.
"""
import torch
from tqdm import tqdm


class NoiseSchedule:
    """alphas_cumprod and the algebra between x0, noise, x_t and the model's output."""

    def __init__(self, cfg):
        self.num_train_timesteps = cfg.num_train_timesteps
        self.prediction_type = cfg.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}; use 'epsilon' or 'v_prediction'")
        # Computed in float64 and stored float32, as the original LDM code does. diffusers computes in float32;
        # the two tables agree to 1e-6 relative, far below half-precision noise.
        betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, cfg.num_train_timesteps,
                               dtype=torch.float64) ** 2
        self.betas = betas.float()
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).float()
        self._tables = {}  # alphas_cumprod per device, so a GPU loop does not copy it every step

    def alpha_bar(self, t, x):
        """alphas_cumprod at t (an int, a 0-d or a (batch,) tensor), shaped to broadcast against x."""
        table = self._table(x.device)
        if not torch.is_tensor(t) or t.ndim == 0:
            return table[int(t)]
        return table[t.to(x.device).long()].view(-1, *([1] * (x.ndim - 1)))

    def add_noise(self, x0, noise, t):
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
        a, x0, noise, dtype = self._prepare(t, x0, noise)
        return (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(dtype)

    def velocity(self, x0, noise, t):
        """The v-prediction target sqrt(a_t) noise - sqrt(1 - a_t) x0."""
        a, x0, noise, dtype = self._prepare(t, x0, noise)
        return (a.sqrt() * noise - (1 - a).sqrt() * x0).to(dtype)

    def training_target(self, x0, noise, t):
        """What the UNet should output at (x_t, t): the noise, or the velocity for v-prediction models."""
        if self.prediction_type == "epsilon":
            return noise
        return self.velocity(x0, noise, t)

    def predict_x0_and_eps(self, x_t, model_output, t):
        """Read the model's output at (x_t, t) as (predicted x0, predicted noise)."""
        a, x_t, out, dtype = self._prepare(t, x_t, model_output)
        x0, eps = self._x0_and_eps(a, x_t, out)
        return x0.to(dtype), eps.to(dtype)

    def _x0_and_eps(self, a, x_t, out):
        if self.prediction_type == "epsilon":
            return (x_t - (1 - a).sqrt() * out) / a.sqrt(), out
        x0 = a.sqrt() * x_t - (1 - a).sqrt() * out
        eps = a.sqrt() * out + (1 - a).sqrt() * x_t
        return x0, eps

    def noised(self, x0, generator):
        """(x_t, noise, t): x0 noised at timesteps drawn uniformly over 0..T-1, noise first, then t, both from
        `generator` (a CPU one, so a training step's draws do not depend on the device)."""
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        t = torch.randint(0, self.num_train_timesteps, (x0.shape[0],), generator=generator).to(x0.device)
        return self.add_noise(x0, noise, t), noise, t

    def _table(self, device):
        device = torch.device(device)
        if device not in self._tables:
            self._tables[device] = self.alphas_cumprod.to(device)
        return self._tables[device]

    def _prepare(self, t, x, y):
        """alpha_bar(t), and x and y upcast to at least float32: half-precision schedule algebra loses the
        small sqrt(1 - a) near t = 0. Also returns x's dtype, to cast the result back."""
        compute = torch.promote_types(x.dtype, torch.float32)
        a = self.alpha_bar(t, x).to(compute)
        return a, x.to(compute), y.to(compute), x.dtype


def ddim_timesteps(num_steps, num_train_timesteps=1000, steps_offset=1):
    """The timesteps DDIM visits, high to low, with "leading" spacing: for 50 steps 981, 961, ..., 1."""
    if not 0 < num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in 1..{num_train_timesteps}, got {num_steps}")
    stride = num_train_timesteps // num_steps
    return [i * stride + steps_offset for i in reversed(range(num_steps))]


def ddim_step(schedule, model_output, t, prev_t, x_t, eta=0.0, noise=None):
    """One DDIM update from the int timestep t to prev_t (prev_t < 0: the final step). Returns (x_prev, x0_pred).

    sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev); eta 0 is deterministic DDIM, eta 1 is
    DDPM-like. `noise` is the fresh Gaussian for eta > 0 (drawn from the global generator when None).
    """
    a_t, x, out, dtype = schedule._prepare(t, x_t, model_output)
    x0, eps = schedule._x0_and_eps(a_t, x, out)
    # The last step ends on alphas_cumprod[0], as SD's samplers do (set_alpha_to_one=False).
    a_prev = schedule.alpha_bar(max(prev_t, 0), x).to(x.dtype)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    sigma = eta * variance.sqrt()
    x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).sqrt() * eps
    if eta > 0:
        if noise is None:
            noise = torch.randn_like(x0)
        x_prev = x_prev + sigma * noise.to(x0.dtype)
    return x_prev.to(dtype), x0.to(dtype)


def ddim_sample(model_fn, x_T, schedule, num_steps=50, eta=0.0, generators=None, callback=None,
                progress=False):
    """Run DDIM from the noise x_T to the final latents.

    model_fn(x, t) returns the model's output (noise or velocity, per the schedule) for the batch x at the
    int timestep t. For eta > 0 the per-step noise comes from `generators`, one per image, so image i does not
    depend on the batch it is in. callback(step_index, t, x, x0_pred) runs after each step with the updated
    latents and that step's prediction of x0 (progress displays, attention capture, previews).
    """
    if generators is not None and len(generators) != x_T.shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {x_T.shape[0]}")
    timesteps = ddim_timesteps(num_steps, schedule.num_train_timesteps)
    stride = schedule.num_train_timesteps // num_steps
    x = x_T
    for i, t in enumerate(tqdm(timesteps, desc="ddim", disable=not progress)):
        model_output = model_fn(x, t)
        noise = _step_noise(x, generators) if eta > 0 else None
        x, x0 = ddim_step(schedule, model_output, t, t - stride, x, eta=eta, noise=noise)
        if callback is not None:
            callback(i, t, x, x0)
    return x


def seed_generators(seeds, device="cpu"):
    """One torch.Generator per seed. CPU generators by default, so a seed gives the same noise on any device."""
    return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]


def initial_noise(shape_per_image, seeds_or_generators, dtype=torch.float32, device="cpu"):
    """x_T shaped (batch, *shape_per_image); image i is drawn from seed (or generator) i alone.

    Pass generators rather than seeds when the same generators must go on to ddim_sample for eta > 0.
    """
    generators = [g if isinstance(g, torch.Generator) else seed_generators([g])[0] for g in seeds_or_generators]
    noise = [_randn(shape_per_image, g) for g in generators]
    return torch.stack(noise).to(device=device, dtype=dtype)


def guided_model_fn(unet, cond_context, uncond_context=None, guidance_scale=7.5):
    """A model_fn for ddim_sample with classifier-free guidance: out_u + s (out_c - out_u).

    The UNet runs once on the batch [uncond, cond], the order SD's samplers use. With guidance_scale 1 or no
    unconditional context it runs the conditional batch alone. Guidance acts on the raw output, noise or
    velocity alike. Latents stay in their own dtype (float32 is best): the UNet sees them in the context's
    dtype and the guidance arithmetic runs in float32.
    """
    guided = uncond_context is not None and guidance_scale != 1

    def model_fn(x, t):
        batch = x.shape[0]
        cond = _match_batch(cond_context, batch)
        if not guided:
            return _run_unet(unet, x, t, cond).to(x.dtype)
        uncond = _match_batch(uncond_context, batch)
        out = _run_unet(unet, torch.cat([x, x]), t, torch.cat([uncond, cond])).float()
        out_uncond, out_cond = out.chunk(2)
        return (out_uncond + guidance_scale * (out_cond - out_uncond)).to(x.dtype)

    return model_fn


def _run_unet(unet, x, t, context):
    timesteps = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
    return unet(x.to(context.dtype), timesteps, context)


def _match_batch(context, batch):
    """Repeat a context of batch 1 (one prompt for all images) to the latents' batch."""
    if context.shape[0] == batch:
        return context
    if context.shape[0] == 1:
        return context.expand(batch, *context.shape[1:])
    raise ValueError(f"context batch {context.shape[0]} does not match latents batch {batch}")


def _step_noise(x, generators):
    if generators is None:
        return torch.randn_like(x)
    return torch.stack([_randn(x.shape[1:], g) for g in generators]).to(device=x.device, dtype=x.dtype)


def _randn(shape, generator):
    # Drawn in float32 on the generator's own device, so the values do not depend on the latents' dtype.
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)
