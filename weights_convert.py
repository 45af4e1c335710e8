"""Convert a Stable Diffusion checkpoint to a sau bundle, and a bundle back to the ecosystem's formats.

    python weights_convert.py v1-5-pruned-emaonly.safetensors sd15          # CompVis single file -> bundle
    python weights_convert.py sd-v1-4.ckpt sd14 --ema                       # Lightning .ckpt, its EMA weights
    python weights_convert.py stable-diffusion-2-1/ sd21                    # a diffusers folder -> bundle
    python weights_convert.py v2-1_768-ema-pruned.safetensors sd21 --prediction-type v_prediction
    python weights_convert.py clip-vit-large-patch14/ clip-l                # a CLIP model -> scorer bundle
    python weights_convert.py sd15 sd15.safetensors --to compvis            # bundle -> one file other tools load
    python weights_convert.py sd15 sd15-diffusers --to diffusers            # bundle -> diffusers folder

Inputs: a sau bundle; a CompVis/Stability .safetensors or .ckpt (SD 1.x, 2.x); a diffusers folder; a CLIP model
(transformers folder or file, or OpenAI names). A .ckpt is read without running any code it carries.
"""
import argparse

from sau.common import cli
from sau.common.files import resolve_model_path
from sau.weights.write import FORMATS, convert


def main(argv=None):
    parser = cli.Parser(description=__doc__)
    parser.add_argument("input", help="checkpoint file, diffusers folder, CLIP model or sau bundle")
    parser.add_argument("output", help="a folder (bundle, diffusers) or a .safetensors file (compvis)")
    parser.add_argument("--to", choices=FORMATS, default="bundle", help="output format (default: bundle)")
    parser.add_argument("--ema", action="store_true", help="use the EMA weights of a CompVis checkpoint")
    parser.add_argument("--tokenizer", help="for inputs without one: tokenizer.json, vocab.json (+ merges.txt) or "
                                            "bpe_simple_vocab_16e6.txt.gz (default: the open_clip_torch wheel's)")
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                        help="what the UNet predicts; SD 2.x-768-v models predict v_prediction")
    parser.add_argument("--upcast-attention", action=argparse.BooleanOptionalAction, default=None,
                        help="compute attention scores in float32 (SD 2.1-v needs it in half precision)")
    parser.add_argument("--dtype", choices=cli.DTYPES, help="cast the weights (default: keep the stored precision)")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    parser.add_argument("--lora", type=cli.lora_arg, action="append", default=[], metavar="FILE[:SCALE]",
                        help="merge a LoRA file (peft, diffusers or kohya names) into the weights, at SCALE "
                        "(default 1); repeatable, applied in order")
    args = parser.parse_args(argv)

    weights = convert(resolve_model_path(args.input), args.output, to=args.to, force=args.force,
                      dtype=cli.DTYPES.get(args.dtype), tokenizer=args.tokenizer, ema=args.ema,
                      prediction_type=args.prediction_type, upcast_attention=args.upcast_attention, lora=args.lora)
    for note in weights.notes:
        print(f"note: {note}")
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in weights.state.values()})
    model = (f"{weights.config.family}, {weights.config.schedule.prediction_type}"
             if hasattr(weights, "config") else "CLIP scorer")
    print(f"wrote {args.output} ({args.to}; {model}; {len(weights.state)} tensors in {', '.join(dtypes)})")


if __name__ == "__main__":
    cli.run(main)
