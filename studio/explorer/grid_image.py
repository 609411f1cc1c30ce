"""Draw an X/Y/Z plot: cell images in columns (X) and rows (Y) with legends, one grid per Z value side by side
under its Z title. The layout is computed before anything runs, so the size guard knows the final size."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
MISSING = (232, 232, 232)  # a cell that was not run (stopped grid)
INK = (0, 0, 0)
GAP = 16  # between the grids of two Z values


def legend_font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_width(font, text: str) -> int:
    return int(font.getlength(text)) if text else 0


def wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels; a word longer than the width is cut between characters."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if _text_width(font, candidate) <= width or not line and _text_width(font, word) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for ch in word:  # too long for a line of its own: cut it
                if line and _text_width(font, line + ch) > width:
                    lines.append(line)
                    line = ""
                line += ch
        lines.append(line)
    return lines


@dataclass
class GridLayout:
    col_widths: list[int]
    row_heights: list[int]
    x_labels: list[list[str]]  # wrapped lines per column ([] when there is no X legend)
    y_labels: list[list[str]]
    z_labels: list[list[str]]
    font_size: int
    line_height: int
    pad: int
    left: int  # width of the Y legend band
    top: int  # height of the X legend band
    title: int  # height of the Z title band
    texts: tuple[list[str], list[str], list[str]] = ([], [], [])  # the X, Y and Z labels before wrapping

    @property
    def sub_size(self) -> tuple[int, int]:
        return self.left + sum(self.col_widths), self.title + self.top + sum(self.row_heights)

    @property
    def size(self) -> tuple[int, int]:
        w, h = self.sub_size
        n = max(1, len(self.z_labels))
        return n * w + (n - 1) * GAP, h


def grid_layout(col_widths: list[int], row_heights: list[int], x_labels: list[str], y_labels: list[str],
                z_labels: list[str]) -> GridLayout:
    """Legend bands sized for the labels: X above the columns, Y left of the rows, Z above each grid.
    An empty label list means that axis is "Nothing" and gets no band."""
    font_size = max(12, (min(col_widths) + min(row_heights)) // 25)  # A1111: (width + height) // 25
    font = legend_font(font_size)
    line_height = int(font_size * 1.25)
    pad = max(4, font_size // 3)
    x_lines = [wrap(t, font, w - 2 * pad) for t, w in zip(x_labels, col_widths, strict=True)] if x_labels else []
    top = 2 * pad + line_height * max((len(lines) for lines in x_lines), default=0) if x_lines else 0
    left = 0
    y_lines: list[list[str]] = []
    if y_labels:
        widest = max(_text_width(font, t) for t in y_labels)
        # as wide as the longest label, up to the widest column (then wrapped), never narrower than a few letters
        left = 2 * pad + min(max(widest, font_size * 3), max(max(col_widths), font_size * 6))
        y_lines = [wrap(t, font, left - 2 * pad) for t in y_labels]
    sub_width = left + sum(col_widths)
    z_lines = [wrap(t, font, sub_width - 2 * pad) for t in z_labels] if z_labels else []
    title = 2 * pad + line_height * max(len(lines) for lines in z_lines) if z_lines else 0
    return GridLayout(list(col_widths), list(row_heights), x_lines, y_lines, z_lines, font_size, line_height, pad,
                      left, top, title, (list(x_labels), list(y_labels), list(z_labels)))


@dataclass
class DrawnLabel:
    text: str
    box: tuple[int, int, int, int]  # the band area the label was drawn in (left, top, right, bottom)


@dataclass
class GridDrawing:
    image: Image.Image
    layout: GridLayout
    labels: list[DrawnLabel] = field(default_factory=list)
    cell_boxes: dict[tuple[int, int, int], tuple[int, int, int, int]] = field(default_factory=dict)


def _draw_lines(draw: ImageDraw.ImageDraw, lines: list[str], box: tuple[int, int, int, int], layout: GridLayout,
                font) -> None:
    left, top, right, bottom = box
    y = top + (bottom - top - layout.line_height * len(lines)) // 2
    for line in lines:
        x = left + (right - left - _text_width(font, line)) // 2
        draw.text((x, y), line, fill=INK, font=font)
        y += layout.line_height


def draw_grid(cells: dict[tuple[int, int, int], Image.Image | None], layout: GridLayout, z_index: list[int] | None = None
              ) -> GridDrawing:
    """Paste cell (ix, iy, iz) into column ix, row iy of the grid of Z value iz (centred in its slot; a missing
    cell is a grey tile), and write the legends. `z_index` picks which Z grids to draw (default: all)."""
    nz = max(1, len(layout.z_labels))
    z_index = list(range(nz)) if z_index is None else z_index
    sub_w, sub_h = layout.sub_size
    width = len(z_index) * sub_w + (len(z_index) - 1) * GAP
    image = Image.new("RGB", (width, sub_h), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = legend_font(layout.font_size)
    out = GridDrawing(image, layout)
    for slot, iz in enumerate(z_index):
        x0 = slot * (sub_w + GAP)
        if layout.z_labels:
            box = (x0, 0, x0 + sub_w, layout.title)
            _draw_lines(draw, layout.z_labels[iz], box, layout, font)
            out.labels.append(DrawnLabel(layout.texts[2][iz], box))
        grid_top = layout.title + layout.top
        col_x = [x0 + layout.left + sum(layout.col_widths[:i]) for i in range(len(layout.col_widths))]
        row_y = [grid_top + sum(layout.row_heights[:i]) for i in range(len(layout.row_heights))]
        # every Z grid carries its own X and Y legends, so each reads on its own
        for ix, lines in enumerate(layout.x_labels):
            box = (col_x[ix], layout.title, col_x[ix] + layout.col_widths[ix], grid_top)
            _draw_lines(draw, lines, box, layout, font)
            out.labels.append(DrawnLabel(layout.texts[0][ix], box))
        for iy, lines in enumerate(layout.y_labels):
            box = (x0, row_y[iy], x0 + layout.left, row_y[iy] + layout.row_heights[iy])
            _draw_lines(draw, lines, box, layout, font)
            out.labels.append(DrawnLabel(layout.texts[1][iy], box))
        for ix, cx in enumerate(col_x):
            for iy, cy in enumerate(row_y):
                cell = cells.get((ix, iy, iz))
                slot_w, slot_h = layout.col_widths[ix], layout.row_heights[iy]
                if cell is None:
                    draw.rectangle((cx, cy, cx + slot_w - 1, cy + slot_h - 1), fill=MISSING, outline=BACKGROUND)
                    continue
                px, py = cx + (slot_w - cell.width) // 2, cy + (slot_h - cell.height) // 2
                image.paste(cell.convert("RGB"), (px, py))
                out.cell_boxes[(ix, iy, iz)] = (px, py, px + cell.width, py + cell.height)
    return out
