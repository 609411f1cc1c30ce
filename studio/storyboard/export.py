"""A storyboard's picked frames as a PDF (frames in a grid, each captioned with shot number, type and description,
page numbers; each frame's infotext as the image's alternative text) and a PNG contact sheet; the picked PNGs are
copied beside them with their `parameters` chunk intact."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps
from PIL.PngImagePlugin import PngInfo

from studio.explorer.grid_image import legend_font, wrap
from studio.files.atomic import atomic_path
from studio.generation.infotext import read_image_infotext
from studio.storyboard.board import Shot, Storyboard, StoryboardStore

FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu", "/Library/Fonts",
             "C:/Windows/Fonts")
PAGE_COLUMNS, PAGE_ROWS = 3, 2  # frames per PDF page (A4 landscape)
SHEET_COLUMNS = 4
SHEET_FRAME = 256  # longest side of a frame on the contact sheet, px
MISSING = (225, 225, 225)


@dataclass
class Entry:
    shot: Shot
    path: Path | None  # the picked frame's PNG, None when the shot has none yet
    infotext: str = ""

    @property
    def title(self) -> str:
        return f"Shot {self.shot.shot} · {self.shot.type}"


@dataclass
class ExportResult:
    pdf: Path
    sheet: Path
    frames_dir: Path
    pages: int
    notes: list[str] = field(default_factory=list)


def entries(store: StoryboardStore, board: Storyboard) -> tuple[list[Entry], list[str]]:
    """Each shot with its picked frame (in shot-list order); shots without one are listed in the notes."""
    folder = store.path(board.name)
    out, notes = [], []
    for shot in board.shots:
        frame = shot.picked_frame
        path = folder / frame.file if frame else None
        if path is None or not path.is_file():
            notes.append(f"shot {shot.shot} has no frame yet: an empty box stands in for it")
            out.append(Entry(shot, None))
            continue
        out.append(Entry(shot, path, read_image_infotext(path) or ""))
    return out, notes


def caption_text(shot: Shot) -> str:
    return shot.description.strip() + (f"\n{shot.notes.strip()}" if shot.notes.strip() else "")


# --- the contact sheet -----------------------------------------------------------------------------------------


def frame_box(board: Storyboard, longest: int) -> tuple[int, int]:
    """A frame's box, `longest` px on its long side: the board's width x height, or its aspect when one is set
    (frames outpainted to it fill the box; others keep their own aspect ratio, centred)."""
    s = board.settings
    width, height = (s.width, s.height) if not s.aspect.strip() else (s.aspect_ratio(), 1.0)
    scale = longest / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def contact_sheet(board: Storyboard, items: list[Entry], columns: int = SHEET_COLUMNS) -> Image.Image:
    """The frames in rows of `columns`, each with its title and description under it, the board's name on top."""
    fw, fh = frame_box(board, SHEET_FRAME)
    pad, gap = 16, 12
    title_font, text_font = sheet_font(18, bold=True), sheet_font(14)
    line = 20
    captions = [[e.title] + wrap(caption_text(e.shot), text_font, fw)[:4] for e in items]
    caption_h = line * max(len(c) for c in captions) + 8
    cols = max(1, min(columns, len(items)))
    rows = -(-len(items) // cols)
    header = 36
    width = pad * 2 + cols * fw + (cols - 1) * gap
    height = pad * 2 + header + rows * (fh + caption_h) + (rows - 1) * gap
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, pad), board.name, fill="black", font=sheet_font(22, bold=True))
    for i, (entry, lines) in enumerate(zip(items, captions, strict=True)):
        x = pad + (i % cols) * (fw + gap)
        y = pad + header + (i // cols) * (fh + caption_h + gap)
        if entry.path is not None:
            with Image.open(entry.path) as im:
                # frames made before the size was changed keep their own aspect ratio, centred in the box
                frame = ImageOps.contain(im.convert("RGB"), (fw, fh), Image.Resampling.LANCZOS)
                sheet.paste(frame, (x + (fw - frame.width) // 2, y + (fh - frame.height) // 2))
        else:
            draw.rectangle((x, y, x + fw - 1, y + fh - 1), fill=MISSING)
            draw.text((x + 8, y + 8), "not generated", fill="black", font=text_font)
        for k, text in enumerate(lines):
            draw.text((x, y + fh + 4 + k * line), text, fill="black", font=title_font if k == 0 else text_font)
    return sheet


def sheet_font(size: int, bold: bool = False):
    """DejaVu Sans where installed (accents and other scripts), else Pillow's default font."""
    from PIL import ImageFont

    fonts = _font_files()
    if fonts is None:
        return legend_font(size)
    return ImageFont.truetype(str(fonts[1] if bold else fonts[0]), size)


def sheet_metadata(board: Storyboard, items: list[Entry]) -> PngInfo:
    """A `storyboard` text chunk: the board's name and, per shot, its caption and its frame's infotext."""
    info = PngInfo()
    info.add_text("storyboard", json.dumps({
        "storyboard": board.name,
        "shots": [{"shot": e.shot.shot, "type": e.shot.type, "description": e.shot.description,
                   "notes": e.shot.notes, "infotext": e.infotext} for e in items]}, ensure_ascii=False))
    return info


# --- the PDF ---------------------------------------------------------------------------------------------------


def _font_files() -> tuple[Path, Path] | None:
    for folder in FONT_DIRS:
        regular, bold = Path(folder) / "DejaVuSans.ttf", Path(folder) / "DejaVuSans-Bold.ttf"
        if regular.is_file() and bold.is_file():
            return regular, bold
    return None


def write_pdf(board: Storyboard, items: list[Entry], path: Path, columns: int = PAGE_COLUMNS,
              rows: int = PAGE_ROWS) -> int:
    """Write the PDF; returns its number of pages. Text is DejaVu Sans where installed (any language), else
    Helvetica (Latin-1: other characters become '?')."""
    from fpdf import FPDF

    fonts = _font_files()
    family = "DejaVu" if fonts else "Helvetica"

    def text(value: str) -> str:
        return value if fonts else value.encode("latin-1", "replace").decode("latin-1")

    class BoardPDF(FPDF):
        def header(self):
            self.set_font(family, "B", 12)
            self.cell(0, 8, text(board.name), new_x="LMARGIN", new_y="NEXT")

        def footer(self):
            self.set_y(-12)
            self.set_font(family, "", 9)
            self.cell(0, 8, f"Page {self.page_no()} of {{nb}}", align="C")

    pdf = BoardPDF(orientation="landscape", unit="mm", format="A4")
    if fonts:
        pdf.add_font("DejaVu", "", str(fonts[0]))
        pdf.add_font("DejaVu", "B", str(fonts[1]))
    pdf.set_title(board.name)
    pdf.set_creator("Studio storyboard")
    pdf.set_auto_page_break(False)
    margin, gap, caption_h = 12.0, 6.0, 22.0
    top, bottom = 22.0, 14.0
    cell_w = (pdf.w - 2 * margin - (columns - 1) * gap) / columns
    row_h = (pdf.h - top - bottom - (rows - 1) * gap) / rows
    s = board.settings
    bw, bh = (s.width, s.height) if not s.aspect.strip() else (s.aspect_ratio(), 1.0)  # the frame box's shape
    img_h = min(row_h - caption_h, cell_w * bh / bw)
    img_w = img_h * bw / bh
    per_page = columns * rows
    for i, entry in enumerate(items):
        if i % per_page == 0:
            pdf.add_page()
        k = i % per_page
        x = margin + (k % columns) * (cell_w + gap)
        y = top + (k // columns) * (row_h + gap)
        ix = x + (cell_w - img_w) / 2
        if entry.path is not None:
            with Image.open(entry.path) as im:
                fw, fh = im.size  # a frame made before the size was changed keeps its aspect ratio
            scale = min(img_w / fw, img_h / fh)
            w, h = fw * scale, fh * scale
            pdf.image(str(entry.path), x=x + (cell_w - w) / 2, y=y + (img_h - h) / 2, w=w, h=h,
                      title=text(entry.title), alt_text=text(entry.infotext or entry.title))
        else:
            pdf.set_fill_color(*MISSING)
            pdf.rect(ix, y, img_w, img_h, style="F")
        pdf.set_xy(x, y + img_h + 1.5)
        pdf.set_font(family, "B", 10)
        pdf.cell(cell_w, 5, text(entry.title), new_x="LMARGIN", new_y="NEXT")
        pdf.set_x(x)
        pdf.set_font(family, "", 8.5)
        lines = pdf.multi_cell(cell_w, 4, text(caption_text(entry.shot)), dry_run=True, output="LINES")
        shown = lines[:4]
        if len(lines) > 4:
            shown[-1] = shown[-1].rstrip()[:-1] + "…" if fonts else shown[-1].rstrip()[:-3] + "..."
        pdf.multi_cell(cell_w, 4, "\n".join(shown), align="L")
    with atomic_path(path) as tmp:
        pdf.output(str(tmp))
    return pdf.page_no()


# --- both, with the frames ---------------------------------------------------------------------------------------


def export_board(store: StoryboardStore, board: Storyboard, pdf_path: Path | None = None,
                 sheet_path: Path | None = None) -> ExportResult:
    """Write `export/<name>.pdf`, `export/<name>-contact.png` and `export/frames/<shot>.png` (the picked frames,
    byte for byte, so their infotext stays) or the paths given."""
    board.validate()
    if not board.shots:
        raise ValueError(f"storyboard {board.name!r} has no shots to export")
    folder = store.path(board.name) / "export"
    pdf_path = Path(pdf_path) if pdf_path else folder / f"{board.name}.pdf"
    if pdf_path.suffix.lower() != ".pdf":
        raise ValueError(f"the PDF's file name must end in .pdf, got {pdf_path.name}")
    sheet_path = Path(sheet_path) if sheet_path else pdf_path.with_name(f"{pdf_path.stem}-contact.png")
    items, notes = entries(store, board)
    pages = write_pdf(board, items, pdf_path)
    with atomic_path(sheet_path) as tmp:
        contact_sheet(board, items).save(tmp, format="PNG", pnginfo=sheet_metadata(board, items))
    frames_dir = pdf_path.with_name(f"{pdf_path.stem}-frames")
    frames_dir.mkdir(parents=True, exist_ok=True)
    for entry in items:
        if entry.path is not None:
            with atomic_path(frames_dir / f"{entry.shot.shot}.png") as tmp:
                shutil.copyfile(entry.path, tmp)
    return ExportResult(pdf_path, sheet_path, frames_dir, pages, notes)
