"""Seed 000's result tables (table 1: mean per method; table 2: per style x method) as CSV and Markdown, and the
accuracy-vs-editability scatter plot, from the experiment's cell results."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from studio.files.atomic import atomic_path, write_text

METHOD_LABELS = {"pe": "PE", "ti": "TI", "ti-att": "TI-Att", "ti-moe": "TI-MoE", "lora": "LoRA",
                 "finetune": "Fine-tune"}
# the columns, in seed 000's order; DINO only when it was measured
METRIC_COLUMNS = (("accuracy", "Accuracy"), ("editability", "Editability"), ("dino", "DINO"))
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def metric_keys(cells: list[dict]) -> list[tuple[str, str]]:
    return [(k, name) for k, name in METRIC_COLUMNS if any(c.get(k) is not None for c in cells)]


def table1(cells: list[dict], methods: list[str]) -> list[dict]:
    """One row per method: each metric averaged over the styles (each style's value is its mean over prompts)."""
    rows = []
    for method in methods:
        mine = [c for c in cells if c["method"] == method]
        row = {"method": label(method), "styles": len(mine)}
        for key, _ in metric_keys(cells):
            values = [c[key] for c in mine if c.get(key) is not None]
            row[key] = sum(values) / len(values) if values else None
        rows.append(row)
    return rows


def table2(cells: list[dict], styles: list[str], methods: list[str]) -> list[dict]:
    """One row per style; for every metric one column per method (seed 000's table 2 layout)."""
    by = {(c["style"], c["method"]): c for c in cells}
    rows = []
    for style in styles:
        row = {"style": style}
        for key, _ in metric_keys(cells):
            for method in methods:
                row[f"{key}_{method}"] = by.get((style, method), {}).get(key)
        rows.append(row)
    return rows


def table1_csv(rows: list[dict], keys: list[tuple[str, str]]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["method", *[k for k, _ in keys], "styles"])
    for r in rows:
        w.writerow([r["method"], *[_fmt(r[k]) for k, _ in keys], r["styles"]])
    return out.getvalue()


def table2_csv(rows: list[dict], keys: list[tuple[str, str]], methods: list[str]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["style", *[f"{k}_{m}" for k, _ in keys for m in methods]])
    for r in rows:
        w.writerow([r["style"], *[_fmt(r[f"{k}_{m}"]) for k, _ in keys for m in methods]])
    return out.getvalue()


def table1_markdown(rows: list[dict], keys: list[tuple[str, str]]) -> str:
    head = ["Method", *[name for _, name in keys]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r["method"], *[_fmt(r[k]) for k, _ in keys]]) + " |")
    return "\n".join(lines) + "\n"


def table2_markdown(rows: list[dict], keys: list[tuple[str, str]], methods: list[str]) -> str:
    head = ["Style", *[f"{name} {label(m)}" for _, name in keys for m in methods]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r["style"], *[_fmt(r[f"{k}_{m}"]) for k, _ in keys for m in methods]])
                     + " |")
    return "\n".join(lines) + "\n"


def write_tables(cells: list[dict], styles: list[str], methods: list[str], out_dir: Path) -> dict[str, Path]:
    """table1.csv/.md, table2.csv/.md and plot.png in `out_dir`; returns their paths by name."""
    out_dir = Path(out_dir)
    keys = metric_keys(cells)
    t1, t2 = table1(cells, methods), table2(cells, styles, methods)
    paths = {"table1.csv": table1_csv(t1, keys), "table2.csv": table2_csv(t2, keys, methods),
             "table1.md": "Table 1: mean over styles per method.\n\n" + table1_markdown(t1, keys),
             "table2.md": "Table 2: per style and method.\n\n" + table2_markdown(t2, keys, methods)}
    written = {}
    for name, text in paths.items():
        write_text(out_dir / name, text)
        written[name] = out_dir / name
    written["plot.png"] = scatter_plot(cells, methods, out_dir / "plot.png")
    return written


# --- the plot (drawn with PIL: no plotting library needed) ---------------------------------------


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    step = (hi - lo) / n
    return [lo + i * step for i in range(n + 1)]


def scatter_plot(cells: list[dict], methods: list[str], path: Path, size: tuple[int, int] = (900, 640)) -> Path:
    """Accuracy (y) against editability (x): a small dot per style x method, a large labelled marker per
    method mean. Seed 000's trade-off reads as methods moving up and to the left."""
    width, height = size
    left, right, top, bottom = 90, 190, 50, 70
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(16), _font(13)
    points = [(c["editability"], c["accuracy"], c["method"]) for c in cells
              if c.get("editability") is not None and c.get("accuracy") is not None]
    xs = [p[0] for p in points] or [0.0, 1.0]
    ys = [p[1] for p in points] or [0.0, 1.0]
    pad_x = max((max(xs) - min(xs)) * 0.1, 0.01)
    pad_y = max((max(ys) - min(ys)) * 0.1, 0.01)
    x0, x1, y0, y1 = min(xs) - pad_x, max(xs) + pad_x, min(ys) - pad_y, max(ys) + pad_y

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    # axes, grid, ticks
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for t in _ticks(x0, x1):
        px, _ = at(t, y0)
        draw.line([px, top, px, height - bottom], fill="#e6e6e6")
        draw.text((px, height - bottom + 8), f"{t:.3f}", fill="black", font=small, anchor="mt")
    for t in _ticks(y0, y1):
        _, py = at(x0, t)
        draw.line([left, py, width - right, py], fill="#e6e6e6")
        draw.text((left - 8, py), f"{t:.3f}", fill="black", font=small, anchor="rm")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text(((left + width - right) / 2, height - 22), "Editability (CLIP-T)", fill="black", font=font,
              anchor="mm")
    draw.text((left, 18), "Accuracy (CLIP-I) vs editability, per style and method", fill="black", font=font,
              anchor="lm")
    ylabel = Image.new("RGBA", (260, 24), (255, 255, 255, 0))
    ImageDraw.Draw(ylabel).text((130, 12), "Accuracy (CLIP-I)", fill="black", font=font, anchor="mm")
    ylabel = ylabel.rotate(90, expand=True)
    image.paste(ylabel, (8, int((top + height - bottom) / 2 - 130)), ylabel)
    # points, then method means on top, then the legend
    color = {m: COLORS[i % len(COLORS)] for i, m in enumerate(methods)}
    for x, y, m in points:
        px, py = at(x, y)
        draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=color.get(m, "gray"))
    for m in methods:
        mine = [(x, y) for x, y, mm in points if mm == m]
        if not mine:
            continue
        mx, my = sum(p[0] for p in mine) / len(mine), sum(p[1] for p in mine) / len(mine)
        px, py = at(mx, my)
        draw.rectangle([px - 8, py - 8, px + 8, py + 8], fill=color[m], outline="black", width=2)
        draw.text((px + 12, py), label(m), fill="black", font=small, anchor="lm")
    ly = top
    draw.text((width - right + 16, ly), "method (mean: square)", fill="black", font=small, anchor="lt")
    for m in methods:
        ly += 24
        draw.ellipse([width - right + 16, ly, width - right + 28, ly + 12], fill=color[m])
        draw.text((width - right + 36, ly + 6), label(m), fill="black", font=small, anchor="lm")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
