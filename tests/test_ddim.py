"""Noise schedule, DDIM and guidance against diffusers' DDIMScheduler, plus per-image seeding."""
import pytest
import torch

from sau.models.config import ScheduleConfig
from sau.models.ddim import (NoiseSchedule, ddim_sample, ddim_step, ddim_timesteps, guided_model_fn, initial_noise,
                      seed_generators)

SHAPE = (4, 8, 6)  # a non-square latent


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def diffusers_scheduler(prediction_type="epsilon"):
    from diffusers import DDIMScheduler
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                         prediction_type=prediction_type)


class FakeModel:
    """A fixed random function of (x, t), applied image by image, so outputs follow the sampler's state."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.mix = 0.3 * torch.randn(SHAPE[0], SHAPE[0], generator=g)
        self.bias = torch.randn(SHAPE, generator=g)

    def __call__(self, x, t):
        t = float(t)
        return torch.einsum("oc,bchw->bohw", self.mix, x) + self.bias * (t / 1000) + 0.1 * torch.sin(x * t / 300)


def test_schedule_values_match_diffusers():
    schedule = NoiseSchedule(ScheduleConfig())
    a = schedule.alphas_cumprod
    assert a.dtype == torch.float32 and a.shape == (1000,)
    assert abs(a[0].item() - 0.99915) < 1e-6
    assert abs(a[999].item() - 0.0046601) < 1e-6
    ref = diffusers_scheduler().alphas_cumprod
    assert rel_err(a, ref) < 1e-6
    assert ((a - ref).abs() / ref).max().item() < 2e-6  # every entry, also the small ones near t = 999


@pytest.mark.parametrize("steps", [50, 20, 7])
def test_timesteps_match_diffusers(steps):
    ours = ddim_timesteps(steps)
    ref = diffusers_scheduler()
    ref.set_timesteps(steps)
    assert ours == ref.timesteps.tolist()
    if steps == 50:
        assert ours[:3] == [981, 961, 941] and ours[-1] == 1 and len(ours) == 50


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_chain_matches_diffusers(prediction_type, eta):
    steps, seeds = 20, [3, 4]
    model = FakeModel()
    schedule = NoiseSchedule(ScheduleConfig(prediction_type=prediction_type))

    generators = seed_generators(seeds)
    x_T = initial_noise(SHAPE, generators)
    x0_preds = []
    ours = ddim_sample(model, x_T, schedule, num_steps=steps, eta=eta, generators=generators,
                       callback=lambda i, t, x, x0: x0_preds.append(x0))

    # diffusers consumes the same per-step noise: the same seeds, drawn image by image in the same order.
    ref_generators = seed_generators(seeds)
    x = torch.stack([torch.randn(SHAPE, generator=g) for g in ref_generators])
    assert torch.equal(x, x_T)
    scheduler = diffusers_scheduler(prediction_type)
    scheduler.set_timesteps(steps)
    ref_x0_preds = []
    for t in scheduler.timesteps:
        noise = torch.stack([torch.randn(SHAPE, generator=g) for g in ref_generators]) if eta > 0 else None
        out = scheduler.step(model(x, int(t)), t, x, eta=eta, variance_noise=noise)
        x = out.prev_sample
        ref_x0_preds.append(out.pred_original_sample)

    assert rel_err(ours, x) <= 1e-5
    assert rel_err(x0_preds[len(x0_preds) // 2], ref_x0_preds[len(ref_x0_preds) // 2]) <= 1e-5
    if eta > 0:  # the noise must matter, or the eta test proves nothing
        deterministic = ddim_sample(model, x_T, schedule, num_steps=steps, eta=0.0)
        assert rel_err(ours, deterministic) > 1e-2


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_add_noise_velocity_and_inversion(prediction_type):
    schedule = NoiseSchedule(ScheduleConfig(prediction_type=prediction_type))
    scheduler = diffusers_scheduler(prediction_type)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, *SHAPE, generator=g), torch.randn(4, *SHAPE, generator=g)
    t = torch.tensor([0, 1, 500, 999])

    x_t = schedule.add_noise(x0, noise, t)
    assert rel_err(x_t, scheduler.add_noise(x0, noise, t)) <= 1e-6
    assert rel_err(schedule.velocity(x0, noise, t), scheduler.get_velocity(x0, noise, t)) <= 1e-6

    # The training target, read back by the sampler, gives back x0 and the noise.
    target = schedule.training_target(x0, noise, t)
    assert torch.equal(target, noise) == (prediction_type == "epsilon")
    x0_pred, eps_pred = schedule.predict_x0_and_eps(x_t, target, t)
    assert rel_err(eps_pred, noise) <= 1e-5
    # From 1000x noise (t = 999) x0 comes back with x_t's rounding error amplified; bound it per timestep.
    assert rel_err(x0_pred[:3], x0[:3]) <= 1e-5
    assert rel_err(x0_pred[3:], x0[3:]) <= 1e-4

    # A scalar t equals the same t for every image.
    assert torch.equal(schedule.add_noise(x0, noise, 500)[2], x_t[2])


class RecordingUNet:
    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context):
        self.calls.append((x.clone(), t.clone(), context.clone()))
        # Depends on all three inputs, so a wrong order or pairing shows in the output.
        return 2 * x + context.mean(dim=(1, 2)).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1) / 1000


def test_guidance_batch_order_and_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *SHAPE, generator=g)
    cond, uncond = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g) + 1
    unet = RecordingUNet()

    out = guided_model_fn(unet, cond, uncond, guidance_scale=7.5)(x, 981)
    assert len(unet.calls) == 1  # one UNet call on the doubled batch
    seen_x, seen_t, seen_context = unet.calls[0]
    assert torch.equal(seen_x, torch.cat([x, x]))
    assert torch.equal(seen_context, torch.cat([uncond, cond]))
    assert seen_t.dtype == torch.long and seen_t.tolist() == [981] * 4
    out_uncond = 2 * x + uncond.mean(dim=(1, 2)).view(-1, 1, 1, 1) + 0.981
    out_cond = 2 * x + cond.mean(dim=(1, 2)).view(-1, 1, 1, 1) + 0.981
    assert rel_err(out, out_uncond + 7.5 * (out_cond - out_uncond)) <= 1e-6

    for unguided in (guided_model_fn(unet, cond, uncond, 1.0), guided_model_fn(unet, cond, None, 7.5)):
        unet.calls.clear()
        out = unguided(x, 21)
        assert len(unet.calls) == 1 and torch.equal(unet.calls[0][2], cond) and unet.calls[0][0].shape[0] == 2
        assert rel_err(out, 2 * x + cond.mean(dim=(1, 2)).view(-1, 1, 1, 1) + 0.021) <= 1e-6

    # One prompt's context serves a whole batch.
    unet.calls.clear()
    guided_model_fn(unet, cond[:1], uncond[:1], 5.0)(x, 1)
    assert torch.equal(unet.calls[0][2], torch.cat([uncond[:1], uncond[:1], cond[:1], cond[:1]]))


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_image_does_not_depend_on_batch(eta):
    model, schedule = FakeModel(1), NoiseSchedule(ScheduleConfig())

    def sample(seeds):
        generators = seed_generators(seeds)
        return ddim_sample(model, initial_noise(SHAPE, generators), schedule, num_steps=10, eta=eta,
                           generators=generators)

    batch = sample([1, 2])
    assert rel_err(batch[0], sample([1])[0]) <= 1e-6
    assert rel_err(batch[1], sample([2])[0]) <= 1e-6
    assert rel_err(batch[0], batch[1]) > 1e-2  # different seeds, different images
    assert torch.equal(initial_noise(SHAPE, [2]), initial_noise(SHAPE, [1, 2])[1:])


def test_callback_sees_every_step_in_order():
    seen = []
    x_T = initial_noise(SHAPE, [0])
    final = ddim_sample(FakeModel(), x_T, NoiseSchedule(ScheduleConfig()), num_steps=12,
                        callback=lambda i, t, x, x0: seen.append((i, t, x, x0)))
    assert [s[0] for s in seen] == list(range(12))
    ts = [s[1] for s in seen]
    assert ts == sorted(ts, reverse=True) and len(set(ts)) == 12 and ts[-1] == 1
    assert torch.equal(seen[-1][2], final) and seen[-1][3].shape == x_T.shape


def test_final_step_uses_alphas_cumprod_0_and_half_precision_latents():
    schedule = NoiseSchedule(ScheduleConfig())
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(1, *SHAPE, generator=g), torch.randn(1, *SHAPE, generator=g)
    x_prev, x0 = ddim_step(schedule, eps, 1, -49, x)
    a0, a1 = schedule.alphas_cumprod[0], schedule.alphas_cumprod[1]
    expected_x0 = (x - (1 - a1).sqrt() * eps) / a1.sqrt()
    assert rel_err(x0, expected_x0) <= 1e-6
    assert rel_err(x_prev, a0.sqrt() * expected_x0 + (1 - a0).sqrt() * eps) <= 1e-6
    assert rel_err(x_prev, x0) > 1e-3  # with alpha 1.0 the last step would return x0 itself

    # bf16 latents: the schedule algebra runs in float32 and the result keeps the latents' dtype.
    x_half, _ = ddim_step(schedule, eps.bfloat16(), 501, 481, x.bfloat16())
    x_full, _ = ddim_step(schedule, eps.bfloat16().float(), 501, 481, x.bfloat16().float())
    assert x_half.dtype == torch.bfloat16
    assert rel_err(x_half.float(), x_full) <= 1e-2
