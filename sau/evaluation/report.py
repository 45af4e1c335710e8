"""Pictures and reports: labelled image grids, attention heatmaps, report.md / report.json.

Pillow only: the figures are simple enough not to need a plotting library.
"""
import json

import numpy as np
import torch
from PIL import Image, ImageDraw

from sau.common.files import atomic_write, save_json
from sau.models.pipeline import to_uint8

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
    if isinstance(value, float):  # six significant digits: a p-value of 2e-9 must not round to 0
        return float(f"{value:.6g}")
    return value


def write_report(out_dir, report, markdown):
    """report.json (every number) and report.md (for people)."""
    save_json(_jsonable(report), out_dir / "report.json")
    atomic_write(out_dir / "report.md", lambda tmp: open(tmp, "w").write(markdown))


def percent(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def percent_interval(rate, interval):
    """A rate with its interval: 94.5% (90.4%-96.9%)."""
    return f"{percent(rate)} ({percent(interval[0])}-{percent(interval[1])})"


def dumps(obj):
    return json.dumps(_jsonable(obj), ensure_ascii=False)


# --- bar charts (eval.py's comparison) ------------------------------------------------------------------------

# One colour per bar series, distinguishable in print and for the common colour-vision deficiencies (Okabe-Ito).
SERIES_COLOURS = [(0, 0, 0), (230, 159, 0), (86, 180, 233), (0, 158, 115), (204, 121, 167), (0, 114, 178),
                  (213, 94, 0), (240, 228, 66)]


def _font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)  # a scalable font in Pillow >= 10.1
    except (TypeError, OSError):
        return ImageFont.load_default()


def bar_chart(groups, series, panels, path, title="", bar=14, plot_height=150):
    """Grouped bars of values in [0, 1], one panel per measure, written as a PNG.

    groups: names along the x axis (e.g. backdoors); series: one bar per group each (e.g. methods), with a
    legend; panels: [(panel title, {group: {series: value or None}})], or with a third item (low, high) for an
    axis other than 0-100% (e.g. (0.5, 1) for similarities near 1). A missing value is marked "n/a"."""
    font, small = _font(13), _font(11)
    left, gap, top_pad, bottom_pad = 48, 18, 28, 22
    group_width = len(series) * bar + gap
    width = max(left + len(groups) * group_width + 10, 420)
    legend_rows = -(-len(series) // 3)
    legend_height = 8 + 16 * legend_rows
    panel_height = top_pad + plot_height + bottom_pad
    canvas = Image.new("RGB", (width, 26 + legend_height + len(panels) * panel_height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 6), title, fill="black", font=font)
    for k, name in enumerate(series):  # legend, three entries a row
        x, y = 8 + (k % 3) * ((width - 16) // 3), 28 + 16 * (k // 3)
        draw.rectangle([x, y + 2, x + 10, y + 12], fill=SERIES_COLOURS[k % len(SERIES_COLOURS)])
        draw.text((x + 14, y), name, fill="black", font=small)
    for p, (panel_title, values, *axis) in enumerate(panels):
        low, high = axis[0] if axis else (0.0, 1.0)
        y0 = 26 + legend_height + p * panel_height
        base = y0 + top_pad + plot_height
        draw.text((8, y0 + 4), panel_title, fill="black", font=font)
        for tick in (0, 0.5, 1):  # gridlines at the bottom, middle and top of the axis
            y = base - tick * plot_height
            draw.line([left - 4, y, width - 6, y], fill=(225, 225, 225) if tick else "black")
            label = low + tick * (high - low)
            draw.text((6, y - 6), f"{100 * label:.0f}%" if not axis else f"{label:.2f}", fill="black", font=small)
        for g, group in enumerate(groups):
            x0 = left + g * group_width + gap // 2
            for k, name in enumerate(series):
                value = values.get(group, {}).get(name)
                x = x0 + k * bar
                if value is None:
                    draw.text((x + 1, base - 12), "n/a", fill=(120, 120, 120), font=_font(7))
                    continue
                height = max(1, round(min(max((value - low) / (high - low), 0.0), 1.0) * plot_height))
                draw.rectangle([x, base - height, x + bar - 2, base], fill=SERIES_COLOURS[k % len(SERIES_COLOURS)])
            draw.text((x0, base + 4), group, fill="black", font=small)
    _save_png(canvas, path)


def markdown_table(rows, columns):
    """rows: dicts; columns: [(header, row -> cell text)] -> a Markdown table."""
    lines = ["| " + " | ".join(header for header, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in rows]
    return "\n".join(lines)
