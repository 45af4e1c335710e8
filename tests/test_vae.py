"""The VAE against diffusers' AutoencoderKL (tiny random models of the real topology) and the full-size layout."""
import pytest
import torch

from sau.models.config import VAEConfig
from sau.weights.layouts.vae import vae_from_diffusers, vae_to_diffusers
from sau.models.vae import AutoencoderKL, infer_vae_config, to_pixels

diffusers = pytest.importorskip("diffusers")

# (our config, image height, width): one square with two blocks per level, one non-square with one block.
TINY = {
    "square": (VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, norm_groups=16), 32, 32),
    "wide": (VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8), 24, 40),
}
SD = VAEConfig()


def diffusers_config(cfg):
    levels = len(cfg.ch_mult)
    return dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
                latent_channels=cfg.z_channels, norm_num_groups=cfg.norm_groups, scaling_factor=cfg.scale_factor)


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module", params=list(TINY))
def pair(request):
    """(ours, diffusers' reference, image size), with the same random weights."""
    cfg, height, width = TINY[request.param]
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**diffusers_config(cfg)).eval()
    with torch.no_grad():  # move every norm weight and bias away from its 1 / 0 init so a mix-up shows
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(vae_from_diffusers(ref.state_dict(), cfg), strict=True)
    return ours, ref, (height, width)


def images(size, batch=2, seed=1):
    return torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def generators(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@torch.no_grad()
def test_encoder_moments_match_diffusers(pair):
    ours, ref, size = pair
    x = images(size)
    mean, logvar = ours.encode_moments(x)
    dist = ref.encode(x).latent_dist
    assert mean.shape == (2, 4, size[0] // 4, size[1] // 4)
    assert rel_err(mean, dist.mean) <= 1e-5
    assert rel_err(logvar, dist.logvar) <= 1e-5
    assert torch.equal(ours.encode(x, sample=False), ours.cfg.scale_factor * mean)


@torch.no_grad()
def test_decoder_matches_diffusers(pair):
    ours, ref, size = pair
    z = torch.randn(2, 4, size[0] // 4, size[1] // 4, generator=torch.Generator().manual_seed(2))
    out = ours.decode(ours.cfg.scale_factor * z)
    expected = ref.decode(z).sample
    assert out.shape == (2, 3, *size)
    assert rel_err(out, expected) <= 1e-5


@torch.no_grad()
def test_sampled_encode_then_decode_matches_diffusers(pair):
    ours, ref, size = pair
    x = images(size)
    latents = ours.encode(x, generator=generators(3, 4))
    expected = ref.encode(x).latent_dist.sample(generator=generators(3, 4)) * ref.config.scaling_factor
    assert rel_err(latents, expected) <= 1e-5
    assert rel_err(ours.decode(latents), ref.decode(expected / ref.config.scaling_factor).sample) <= 1e-5


@torch.no_grad()
def test_noise_does_not_depend_on_batch_size(pair):
    ours, _, size = pair
    x = images(size)
    batch = ours.encode(x, generator=generators(5, 6))
    alone = ours.encode(x[1:], generator=generators(6))
    assert rel_err(batch[1:], alone) <= 1e-5
    # One shared generator: a batch equals its images encoded one after another from the same stream.
    shared = torch.Generator().manual_seed(7)
    one_by_one = torch.cat([ours.encode(x[i:i + 1], generator=shared) for i in range(2)])
    assert rel_err(ours.encode(x, generator=torch.Generator().manual_seed(7)), one_by_one) <= 1e-5
    assert not torch.allclose(batch, ours.encode(x, sample=False))  # the noise is really there
    with pytest.raises(ValueError):
        ours.encode(x, generator=generators(1))


def test_layout_round_trip_is_exact(pair):
    ours, ref, _ = pair
    theirs = ref.state_dict()
    back = vae_to_diffusers(vae_from_diffusers(theirs, ours.cfg), ours.cfg)
    assert back.keys() == theirs.keys()
    assert all(torch.equal(back[k], theirs[k]) for k in theirs)
    mine = ours.state_dict()
    again = vae_from_diffusers(vae_to_diffusers(mine, ours.cfg), ours.cfg)
    assert again.keys() == mine.keys() and all(torch.equal(again[k], mine[k]) for k in mine)
    with pytest.raises(KeyError, match="decoder.stray.weight"):
        vae_to_diffusers({**mine, "decoder.stray.weight": torch.zeros(1)}, ours.cfg)
    with pytest.raises(KeyError, match="encoder.up_blocks.0.conv.weight"):
        vae_from_diffusers({**theirs, "encoder.up_blocks.0.conv.weight": torch.zeros(1)}, ours.cfg)


def shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_full_size_layout_on_meta():
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    with torch.device("meta"):
        ours = AutoencoderKL(SD).state_dict()
        ref = diffusers.AutoencoderKL(**diffusers_config(SD))
    assert len(ours) == 248
    assert sum(v.numel() for v in ours.values()) == 83_653_863
    assert shapes(vae_from_diffusers(ref.state_dict(), SD)) == shapes(ours)
    assert shapes(vae_to_diffusers(ours, SD)) == shapes(ref.state_dict())
    # diffusers' own converter, fed our keys as a single-file checkpoint, lands on diffusers' keys and shapes.
    converted = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in ours.items()}, ref.config)
    assert shapes(converted) == shapes(ref.state_dict())
    assert ours["decoder.up.3.block.0.conv1.weight"].shape == (512, 512, 3, 3)  # up.3 is the lowest resolution
    assert ours["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)


@pytest.mark.parametrize("cfg", [SD, TINY["square"][0], TINY["wide"][0],
                                 VAEConfig(ch=16, ch_mult=(1, 3), num_res_blocks=3, z_channels=8, embed_dim=6,
                                           in_channels=1, out_channels=2, norm_groups=4)],
                         ids=["sd", "square", "wide", "odd"])
def test_infer_vae_config_recovers_config(cfg):
    with torch.device("meta"):
        sd = AutoencoderKL(cfg).state_dict()
    assert infer_vae_config(sd, norm_groups=cfg.norm_groups) == cfg
    prefixed = {"first_stage_model." + k: v for k, v in sd.items()}
    assert infer_vae_config(prefixed, norm_groups=cfg.norm_groups) == cfg


def test_to_pixels():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])
    assert torch.equal(to_pixels(x), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    assert torch.equal(AutoencoderKL.to_pixels(x, uint8=True), torch.tensor([0, 0, 128, 255, 255], dtype=torch.uint8))
