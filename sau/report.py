"""Pictures and reports: labelled image grids, attention heatmaps, report.md / report.json.

Pillow only: the figures are simple enough not to need a plotting library.
"""
import json

import numpy as np
import torch
from PIL import Image, ImageDraw

from .checkpoint import atomic_write, save_json
from .pipeline import to_uint8

# Anchor colours of a dark-to-bright heat scale (black, purple, red, orange, yellow-white).
_HEAT = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)
LABEL_WIDTH = 150


def colorize(heat, vmax):
    """(h, w) values in [0, vmax] -> (h, w, 3) uint8 through the heat scale."""
    x = np.clip(np.asarray(heat, dtype=np.float32) / max(vmax, 1e-12), 0, 1) * (len(_HEAT) - 1)
    low = np.floor(x).astype(int).clip(0, len(_HEAT) - 2)
    frac = (x - low)[..., None]
    return (_HEAT[low] * (1 - frac) + _HEAT[low + 1] * frac).round().astype(np.uint8)


def _save_png(image, path):
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def _labelled_rows(rows, cell, pad=4):
    """rows: [(label, [HxWx3 uint8 arrays])] -> one PIL image with the labels on the left."""
    columns = max(len(cells) for _, cells in rows)
    width = LABEL_WIDTH + columns * (cell + pad)
    canvas = Image.new("RGB", (width, len(rows) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, cells) in enumerate(rows):
        y = pad + r * (cell + pad)
        draw.text((4, y + cell // 2 - 6), label, fill="black")
        for c, array in enumerate(cells):
            tile = Image.fromarray(array).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (LABEL_WIDTH + c * (cell + pad), y))
    return canvas


def image_grid(rows, path, cell=96):
    """rows: [(label, images (n, 3, H, W) in [-1, 1])] -> a labelled PNG, one row per label."""
    _save_png(_labelled_rows([(label, list(to_uint8(images))) for label, images in rows], cell), path)


def heatmap_figure(rows, path, cell=96):
    """rows: [(label, {(h, w): heat})], e.g. before / after unlearning. Each resolution (column) shares the
    colour scale of its first row, so a drop after unlearning shows as darkening."""
    sizes = list(rows[0][1])
    vmax = {size: float(rows[0][1][size].max()) for size in sizes}
    cells = [(f"{label}", [colorize(heats[size], vmax[size]) for size in sizes]) for label, heats in rows]
    header = "  ".join(f"{h}x{w}" for h, w in sizes)
    canvas = _labelled_rows(cells, cell)
    full = Image.new("RGB", (canvas.width, canvas.height + 16), "white")
    full.paste(canvas, (0, 16))
    ImageDraw.Draw(full).text((LABEL_WIDTH, 2), f"trigger attention per resolution: {header}", fill="black")
    _save_png(full, path)


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return round(value, 6)
    return value


def write_report(out_dir, report, markdown):
    """report.json (every number) and report.md (for people)."""
    save_json(_jsonable(report), out_dir / "report.json")
    atomic_write(out_dir / "report.md", lambda tmp: open(tmp, "w").write(markdown))


def percent(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def dumps(obj):
    return json.dumps(_jsonable(obj), ensure_ascii=False)
