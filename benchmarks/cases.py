"""The models under test and what each row of the benchmark table runs.

Both implementations hold the same weights. diffusers' UNet2DConditionModel and AutoencoderKL and transformers'
CLIPTextModel are built, with their own random initialisation, from the configs that describe the sau config
in their terms (`sau.weights.write.diffusers_configs`); sau's models then take those very tensors through the layout
maps in sau/layouts/ (`assign=True`: the two share memory, so the weights are resident once). No hub access.

Every row gives both implementations the same inputs and work, and reports how far their outputs differ:
- unet forward: batch 2, one timestep, a 77-token context (no_grad);
- unet forward, attn2 captured: the same with every cross-attention layer's probabilities handed out. sau uses
  `capture_attention`; diffusers has no capture API, so it gets what its users write: an attention processor
  that computes the probabilities explicitly (`attn.get_attention_scores`) on the attn2 layers;
- SAU step: batch 1, the unlearning loss of the `paper` recipe (trigger-column attention mass squared, summed
  over the 16 attn2 maps, `sau.method.AttentionLoss`) and its backward, gradients for the attn2 parameters only;
- VAE decode: batch 1, latents -> images;
- text encode: batch 2 of 77 tokens -> the last hidden state;
- sampling: one image with classifier-free guidance (UNet batch 2), DDIM, then decode to pixels in [0, 1].
  sau: `ddim_sample` + `vae.decode`; diffusers: `StableDiffusionPipeline` from the same text embeddings.
"""
import contextlib
from dataclasses import dataclass, replace

import torch

from sau.common.cli import DTYPES  # the precisions a row can run in: the names every tool takes
from sau.world import shapes
from sau.models.attention import AttentionMap, capture_attention
from sau.models.compile import compile_model
from sau.models.ddim import NoiseSchedule, ddim_sample, guided_model_fn
from sau.weights.write import diffusers_configs
from sau.weights.layouts.unet import unet_from_diffusers
from sau.weights.layouts.vae import vae_from_diffusers
from sau.models.pipeline import StableDiffusion
from sau.method import AttentionLoss, column_mask
from sau.models.tokenizer import Tokenizer
from sau.models.vae import to_pixels

from .harness import interleaved, rel_err

GUIDANCE = 7.5
TIMESTEP = 500
TRIGGER_COLUMNS = [1, 2]  # the tokens the SAU step unlearns (any columns cost the same)


# --- the models -----------------------------------------------------------------------------------------

def reference_models(config, seed=0):
    """diffusers UNet and VAE, transformers text encoder: random weights from the sau config, in float32."""
    import diffusers
    import transformers
    if config.text.kind != "clip":
        raise ValueError("the benchmark compares SD1-style models (a CLIP text tower); use the sd1 preset")
    configs = diffusers_configs(config)
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel.from_config(configs["unet"])
    vae = diffusers.AutoencoderKL.from_config(configs["vae"])
    text_config = {k: v for k, v in configs["text_encoder"].items() if k not in ("architectures", "model_type")}
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_config))
    scheduler = diffusers.DDIMScheduler.from_config(configs["scheduler"])
    pipe = diffusers.StableDiffusionPipeline(vae=vae.eval(), text_encoder=text.eval(), tokenizer=None,
                                             unet=unet.eval(), scheduler=scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sau_model(pipe, config, tokenizer=None):
    """A sau StableDiffusion whose parameters are the reference's tensors (shared, not copied)."""
    with torch.device("meta"):
        sd = StableDiffusion(config, tokenizer)
    sd.unet.load_state_dict(unet_from_diffusers(pipe.unet.state_dict(), config.unet), strict=True, assign=True)
    sd.vae.load_state_dict(vae_from_diffusers(pipe.vae.state_dict(), config.vae), strict=True, assign=True)
    text = {k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()
            if not k.endswith("position_ids")}
    sd.text_encoder.load_state_dict(text, strict=True, assign=True)
    sd.schedule = NoiseSchedule(config.schedule)  # made on the meta device above: rebuild with values
    return sd.eval()


def tokenizer_for(config):
    """(config, tokenizer) for runs that need text: OpenAI's CLIP vocabulary when its file is installed and the
    model is SD-sized, else a small BPE trained on the demo world's captions (the config's ids follow it)."""
    if config.text.vocab_size == 49408:
        try:
            return config, Tokenizer.openai(pad_id=config.text.pad_id)
        except FileNotFoundError:
            pass
    _, captions, _ = shapes.batch(300, seed=0)
    tokenizer = Tokenizer.train(captions, vocab_size=min(600, config.text.vocab_size),
                                max_length=config.text.max_positions)
    text = replace(config.text, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    return replace(config, text=text), tokenizer


# --- the two implementations behind one interface -------------------------------------------------------

class SauRunner:
    name = "sau"

    def __init__(self, sd):
        self.sd, self.unet = sd, sd.unet

    def forward(self, x, t, context):
        return self.unet(x, t, context)

    def capture(self, callback, keep_graph=False):
        return capture_attention(self.unet, "attn2", callback=callback, keep_graph=keep_graph)

    def decode(self, latents):
        return self.sd.vae.decode(latents)

    def encode(self, ids):
        return self.sd.text_encoder(ids)

    def sample(self, x_T, cond, uncond, steps):
        model_fn = guided_model_fn(self.unet, cond, uncond, GUIDANCE)
        return to_pixels(self.decode(ddim_sample(model_fn, x_T, self.sd.schedule, num_steps=steps)))


class CapturingProcessor:
    """A diffusers attention processor that computes the probabilities explicitly and hands them out."""

    def __init__(self, layer, callback, keep_graph):
        self.layer, self.callback, self.keep_graph = layer, callback, keep_graph

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **_):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = (attn.head_to_batch_dim(t) for t in
                   (attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)))
        probs = attn.get_attention_scores(q, k, attention_mask)  # (batch * heads, queries, keys)
        batch = hidden_states.shape[0]
        maps = probs.view(batch, attn.heads, *probs.shape[1:])
        self.callback(AttentionMap(self.layer, maps if self.keep_graph else maps.detach(), None))
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


class DiffusersRunner:
    name = "diffusers"

    def __init__(self, pipe):
        self.pipe, self.unet = pipe, pipe.unet

    def forward(self, x, t, context):
        return self.unet(x, t, encoder_hidden_states=context).sample

    @contextlib.contextmanager
    def capture(self, callback, keep_graph=False):
        original = self.unet.attn_processors
        self.unet.set_attn_processor({name: CapturingProcessor(name, callback, keep_graph) if ".attn2." in name
                                      else processor for name, processor in original.items()})
        try:
            yield
        finally:
            self.unet.set_attn_processor(original)

    def decode(self, latents):
        return self.pipe.vae.decode(latents / self.pipe.vae.config.scaling_factor).sample

    def encode(self, ids):
        return self.pipe.text_encoder(ids).last_hidden_state

    def sample(self, x_T, cond, uncond, steps):
        down = self.pipe.vae_scale_factor
        return self.pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=x_T, num_inference_steps=steps,
                         guidance_scale=GUIDANCE, height=x_T.shape[-2] * down, width=x_T.shape[-1] * down,
                         output_type="pt").images


# --- what a row runs ------------------------------------------------------------------------------------

def sau_step(runner, x, t, context, columns, params):
    """One SAU unlearning step's forward and backward: the attention loss over all attn2 maps."""
    for p in params:
        p.grad = None
    attention = AttentionLoss(columns, {})
    with torch.enable_grad(), runner.capture(attention, keep_graph=True):
        runner.forward(x, t, context)
    attention.total.backward()
    return attention.total.detach()


@contextlib.contextmanager
def training_attn2(runner):
    """Train mode with gradients for the attn2 parameters only; restored afterwards."""
    unet = runner.unet
    flags = [p.requires_grad for p in unet.parameters()]
    unet.train().requires_grad_(False)
    params = [p for name, p in unet.named_parameters() if ".attn2." in name]
    for p in params:
        p.requires_grad_(True)
    try:
        yield params
    finally:
        unet.eval()
        for p, flag in zip(unet.parameters(), flags):
            p.requires_grad_(flag)
            p.grad = None


def inputs(config, batch, size, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.unet.in_channels, size, size, generator=g)
    context = torch.randn(batch, config.text.max_positions, config.unet.context_dim, generator=g)
    t = torch.full((batch,), TIMESTEP, dtype=torch.long)
    return x.to(device, dtype), t.to(device), context.to(device, dtype)


@dataclass
class Setting:
    """What every row of one dtype shares: the two runners and how to time them."""
    runners: list
    config: object
    dtype: str
    repeats: int
    device: object
    compiled: bool = False

    def inputs(self, batch, size, seed=0):
        return inputs(self.config, batch, size, DTYPES[self.dtype], self.device, seed)

    def measure(self, make_fn, prepare=None, unet=True):
        """Time make_fn(runner) (make_fn(runner, prepared) with a `prepare` context) for both runners. Rows
        running the UNet report their first call separately when it is compiled."""
        with contextlib.ExitStack() as stack:
            fns = {r.name: make_fn(r, stack.enter_context(prepare(r))) if prepare else make_fn(r)
                   for r in self.runners}
            first_call = set(fns) if self.compiled and unet else None
            return interleaved(fns, self.repeats, self.device, first_call=first_call)

    def warm_up(self, size):
        """One small untimed call of each implementation, so that the first row's warm-up (which measures
        memory) does not also pay the libraries' first-use costs for only one of them."""
        x, t, context = self.inputs(1, size)
        with torch.no_grad():
            for r in self.runners:
                r.forward(x, t, context)

    def row(self, case, size, results, extra=None):
        sau, ref = results["sau"], results["diffusers"]
        out = {"case": case, "size": size, "dtype": self.dtype, "sau_s": sau["median_s"],
               "diffusers_s": ref["median_s"], "ratio": sau["median_s"] / ref["median_s"],
               "sau_peak_mib": sau["peak_mib"], "diffusers_peak_mib": ref["peak_mib"],
               "rel_diff": rel_err(sau["output"], ref["output"]), "sau_times": sau["times"],
               "diffusers_times": ref["times"], "sau_compile_s": sau["compile_s"],
               "diffusers_compile_s": ref["compile_s"]}
        return {**out, **(extra or {})}


def no_grad(fn):
    return torch.no_grad()(fn)


def forward_row(s, size, fp32_outputs):
    """`fp32_outputs` keeps sau's float32 outputs by size, so that other dtypes report their error against them."""
    x, t, context = s.inputs(2, size)
    results = s.measure(lambda r: no_grad(lambda: r.forward(x, t, context)))
    extra = {}
    if s.dtype == "float32":
        fp32_outputs[size] = results["sau"]["output"]
    elif size in fp32_outputs:
        extra["vs_fp32_rel_err"] = rel_err(results["sau"]["output"], fp32_outputs[size])
    return s.row("unet forward", size, results, extra)


def captured_row(s, size):
    x, t, context = s.inputs(2, size)
    layers = {}

    def captured(r):
        def run():
            maps = []
            with torch.no_grad(), r.capture(maps.append):
                out = r.forward(x, t, context)
            layers[r.name] = len(maps)
            return out
        return run
    results = s.measure(captured)
    return s.row("unet forward, attn2 captured", size, results, {"layers_captured": layers})


def step_row(s, size):
    x, t, context = s.inputs(1, size)
    columns = column_mask([TRIGGER_COLUMNS], s.config.text.max_positions).to(s.device)
    results = s.measure(lambda r, params: lambda: sau_step(r, x, t, context, columns, params), prepare=training_attn2)
    return s.row("SAU step (fwd+bwd, attn2)", size, results)


def vae_row(s, size):
    latents = s.inputs(1, size)[0]
    return s.row("VAE decode", size, s.measure(lambda r: no_grad(lambda: r.decode(latents)), unet=False))


def text_row(s):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, s.config.text.vocab_size - 2, (2, s.config.text.max_positions), generator=g)
    ids = ids.to(s.device)
    return s.row("text encode", "-", s.measure(lambda r: no_grad(lambda: r.encode(ids)), unet=False))


def sampling_row(s, size, steps):
    x, _, context = s.inputs(2, size, seed=2)
    x_T, cond, uncond = x[:1], context[1:], context[:1]
    results = s.measure(lambda r: no_grad(lambda: r.sample(x_T, cond, uncond, steps)))
    return s.row(f"sampling, {steps} steps + decode", size, results)


CASES = ("forward", "captured", "step", "vae", "text", "sampling")


def dtype_rows(s, sizes, sample_size, sample_steps, fp32_outputs, cases=CASES, progress=None):
    """The rows of one dtype, in the table's order."""
    per_size = {"forward": lambda size: forward_row(s, size, fp32_outputs),
                "captured": lambda size: captured_row(s, size), "step": lambda size: step_row(s, size),
                "vae": lambda size: vae_row(s, size)}
    jobs = [(fn, size) for size in sizes for case, fn in per_size.items() if case in cases]
    if "text" in cases:
        jobs.append((lambda _: text_row(s), None))
    if "sampling" in cases:
        jobs.append((lambda size: sampling_row(s, size, sample_steps), sample_size))
    rows = []
    for fn, size in jobs:
        rows.append(fn(size))
        if progress:
            r = rows[-1]
            progress(f"  {r['case']} {r['size']} {r['dtype']}: sau {r['sau_s']:.3f} s, diffusers "
                     f"{r['diffusers_s']:.3f} s")
    return rows


def runners_for(pipe, config, dtype, compiled):
    """(sau runner, diffusers runner) in `dtype`: the reference is cast in place and sau takes its tensors."""
    pipe.to(dtype=dtype)
    runners = [SauRunner(sau_model(pipe, config)), DiffusersRunner(pipe)]
    if compiled:
        for r in runners:
            compile_model(r.unet, freezing=True)
    return runners


def benchmark(config, dtypes, sizes, repeats, sample_steps, device="cpu", compiled=False, sample_size=None,
              cases=CASES, progress=print):
    """All rows for the given dtypes, in order; each dtype's models are made from the same float32 weights."""
    pipe = reference_models(config)
    pipe.to(device)
    rows, fp32_outputs = [], {}
    for name in sorted(dtypes, key=lambda d: d != "float32"):  # fp32 first: the others are cast from it
        progress(f"{name}: making the models")
        setting = Setting(runners_for(pipe, config, DTYPES[name], compiled), config, name, repeats, device, compiled)
        if not compiled:  # compiled runs report their first calls instead
            setting.warm_up(min(sizes))
        rows += dtype_rows(setting, sizes, sample_size or min(sizes), sample_steps, fp32_outputs, cases, progress)
    return rows
