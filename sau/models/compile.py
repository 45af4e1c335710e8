"""torch.compile for sau's models, as the `--compile` flag of the command-line tools uses it.

    unet = compile_model(sd.unet)          # the same module object, its forward now compiled
    with torch.no_grad(), capture_attention(unet, "attn2") as maps:
        unet(x, t, context)                # capture works: the captured layers take their own graph

The module is compiled in place (`nn.Module.compile`), not wrapped: its parameter names, state dict and
module paths stay what they were, so saving, loading and `capture_attention` by path work unchanged.

What to expect (measured with `python -m benchmarks --compile`, see the README):
- The first call compiles (minutes for a full-size UNet on a CPU); each new input shape or dtype compiles
  again. Compilation is done once per process; inductor's on-disk cache shortens later processes' compiles.
- Inductor "freezing" treats the weights as constants for inference under `torch.no_grad()`, which lets it
  pre-pack them for the CPU's matrix kernels; that is where compiling pays on a CPU. It does not apply when
  gradients are on (training), which compiles a separate graph without it. Frozen graphs may keep a packed
  copy of a weight, so freeze only a model whose weights stay fixed afterwards: a model that is trained
  after a frozen call must be compiled with `freezing=False`.
- On a CPU it pays on a small model (the demo's bf16 generation: 16.5 -> 21.0 images/s) but not at SD size,
  where the compiled UNet is slower than eager in fp32 and bf16 alike (`python -m benchmarks.scale --model sd1`,
  docs/scale.md): leave it off there.
- Attention capture changes the compute path of the captured layers, so dynamo compiles one more graph for
  each set of captured layers (e.g. uncaptured + "attn2": two graphs). New capture contexts on the same
  layers reuse it: there are no graph breaks and no recompiles per call.
- A capture callback is traced into that graph, and dynamo guards on the Python state it reads: a counter that
  changes, or a list or dict that grows, on every call makes it compile again on every call (seconds to
  minutes each). Keep such state in tensors updated in place, as sau's callbacks do (`sau.method.TriggerAttention`).
"""
import torch


def compile_model(module, freezing=True, backend="inductor"):
    """Compile `module`'s forward in place and return the module.

    freezing: treat weights as constants in inference graphs (see the module docstring for when not to).
    backend: torch.compile's backend; "eager" traces the same graphs without generating code (tests).
    """
    # Capture needs one more graph per captured layer set, and the UNet's callers vary the batch (guidance
    # doubles it): leave room before dynamo gives up and falls back to eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    module.compile(backend=backend, options={"freezing": freezing} if backend == "inductor" else None)
    return module
