"""UNet key map between the CompVis layout (sau's module names) and diffusers' UNet2DConditionModel.

The map is a table of key prefixes, generated from the UNetConfig by the block index rules:
with R = num_res_blocks, CompVis numbers the blocks of all levels in one sequence
(input_blocks has R ResBlocks plus one Downsample per level, output_blocks R + 1 blocks per level)
while diffusers numbers them per level. ResBlock parameters are renamed; SpatialTransformer
parameters keep their names (and shapes) below the block prefix.
"""

# ResBlock parameter names: CompVis -> diffusers.
RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}

OUTER = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}


def prefix_map(cfg):
    """{CompVis key prefix: diffusers key prefix} covering every parameter of a UNet with this config."""
    table = dict(OUTER)

    def resnet(compvis, diffusers):
        for old, new in RESNET.items():
            table[f"{compvis}.{old}"] = f"{diffusers}.{new}"

    r = cfg.num_res_blocks
    levels = len(cfg.channel_mult)
    for i in range(levels):
        has_attention = 2 ** i in cfg.attention_resolutions
        for j in range(r):
            n = i * (r + 1) + j + 1
            resnet(f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}")
            if has_attention:
                table[f"input_blocks.{n}.1"] = f"down_blocks.{i}.attentions.{j}"
        if i < levels - 1:
            table[f"input_blocks.{(i + 1) * (r + 1)}.0.op"] = f"down_blocks.{i}.downsamplers.0.conv"

    resnet("middle_block.0", "mid_block.resnets.0")
    table["middle_block.1"] = "mid_block.attentions.0"
    resnet("middle_block.2", "mid_block.resnets.1")

    for i in range(levels):  # diffusers' up block i is level (levels - 1 - i): lowest resolution first
        has_attention = 2 ** (levels - 1 - i) in cfg.attention_resolutions
        for j in range(r + 1):
            n = i * (r + 1) + j
            resnet(f"output_blocks.{n}.0", f"up_blocks.{i}.resnets.{j}")
            if has_attention:
                table[f"output_blocks.{n}.1"] = f"up_blocks.{i}.attentions.{j}"
        if i < levels - 1:
            slot = 2 if has_attention else 1  # the upsampler follows the ResBlock and, if any, the transformer
            table[f"output_blocks.{i * (r + 1) + r}.{slot}.conv"] = f"up_blocks.{i}.upsamplers.0.conv"
    return table


def _rename(sd, table, source):
    """Rename each key by the longest table prefix it starts with (whole dotted components only)."""
    out, leftovers = {}, []
    for key, value in sd.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:cut])
            if head in table:
                out[".".join([table[head]] + parts[cut:])] = value
                break
        else:
            leftovers.append(key)
    if leftovers:
        raise ValueError(f"{len(leftovers)} {source} UNet keys have no counterpart for this config: "
                         + ", ".join(leftovers[:10]) + (" ..." if len(leftovers) > 10 else ""))
    return out


def unet_to_diffusers(sd, cfg):
    """A CompVis-layout UNet state dict (prefix stripped) in diffusers' UNet2DConditionModel names."""
    return _rename(sd, prefix_map(cfg), "CompVis")


def unet_from_diffusers(sd, cfg):
    """A diffusers UNet2DConditionModel state dict in CompVis names (sau's module names)."""
    table = {new: old for old, new in prefix_map(cfg).items()}
    return _rename(sd, table, "diffusers")
