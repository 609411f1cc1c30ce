"""Dataset curation: import images from folders, zips and uploads, check and convert them, find duplicates,
crop to the training size, caption, CLIP-check, and write a training folder with a manifest of every decision.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path, PurePosixPath

from PIL import Image, ImageDraw

from studio import __version__
from studio.dataset.captioning import compose_caption
from studio.dataset.crop import CROP_MODES, apply_crop, plan_crop
from studio.dataset.sources import scan_inputs
from studio.files.atomic import atomic_dir
from studio.files.images import SkipImage, Source, load_image
from studio.files.names import check_name, safe_child

ProgressFn = Callable[[int, int, str], None]
NON_RGB_CHOICES = ("convert", "prune")
FLIP_MODES = ("none", "random", "stored")
MANIFEST = "dataset.json"
REPORT = "report.json"
THUMB_SIDE = 256


# --- the job ---------------------------------------------------------------------------------------


class DatasetExistsError(ValueError):
    """Saving would replace an earlier dataset of the same name, and the caller did not ask to replace it."""


@dataclass
class CurateJob:
    """Everything one curation run needs; the UI and the command line both build one."""

    inputs: list[Path] = field(default_factory=list)  # folders, zip files, single images (and their .txt)
    output: Path | None = None  # the dataset folder to write (replaced as a whole when it is ours)
    name: str = ""  # dataset name (kohya folder name); default: the output folder's name
    # 1. import
    size: int = 512  # training resolution: 512 for SD 1.x / SD 2.x base, 768 for SD 2.x 768-v
    crop: str = "center"  # one of crop.CROP_MODES: center, smart (saliency), entropy, bucket (keeps aspect)
    min_side: int = 256  # shorter side below this: skipped (upscaling that far only blurs)
    max_pixels: int = 64_000_000  # above this: skipped as a possible decompression bomb
    max_file_mb: int = 200  # files larger than this are not read
    non_rgb: str = "convert"  # palette, CMYK, 16-bit, alpha...: "convert" to RGB; "prune" drops grayscale
    # 2. duplicates (exact ones are always found; near ones need a CLIP model)
    near_duplicates: float | None = None  # CLIP image cosine at or above which two images are "the same"
    # 3. captions
    caption_model: str = "none"  # none, demo-tiny, a hub id (Salesforce/blip-image-captioning-base), a folder
    caption_prefix: str = ""  # e.g. a trigger word "sks," or "a painting in the style of"
    caption_suffix: str = ""
    keep_captions: bool = True  # captions that came with the images (.txt, metadata.jsonl) are not replaced
    caption_batch: int = 8
    # 4. CLIP check (seed 001: image-caption pairs under 0.2 removed)
    clip_model: str = "ViT-L-14"  # used only for near_duplicates or clip_threshold
    clip_threshold: float | None = None
    # 5. augmentation, recorded for the trainers
    flip: str = "none"  # none, random (trainers flip with flip_p), stored (mirrored copies written)
    flip_p: float = 0.5
    repeats: int | None = None  # times each image is seen per epoch (seed 000: 4 images x 100 repeats);
    # None: taken from kohya "<repeats>_<name>" folders when the input has them, else 1

    def validate(self) -> None:
        """Raise ValueError naming the bad value and what would be right."""
        for name in ("size", "min_side", "max_pixels", "max_file_mb", "caption_batch", "repeats"):
            value = getattr(self, name)
            if name == "repeats" and value is None:
                continue
            if isinstance(value, float) and value.is_integer():
                setattr(self, name, int(value))
            elif isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name.replace('_', ' ')} must be a whole number, got {value!r}")
        if self.size % 8 or not 64 <= self.size <= 2048:
            raise ValueError(f"size must be a multiple of 8 between 64 and 2048 (512 for SD 1.x, 768 for "
                             f"SD 2.x 768-v), got {self.size}")
        if self.crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {', '.join(CROP_MODES)}, got {self.crop!r}")
        if self.min_side < 1:
            raise ValueError(f"minimum side must be at least 1 px, got {self.min_side}")
        if self.max_pixels < self.min_side**2:
            raise ValueError(f"max pixels ({self.max_pixels}) is below min side squared "
                             f"({self.min_side ** 2})")
        if self.max_file_mb < 1:
            raise ValueError(f"max file size must be at least 1 MB, got {self.max_file_mb}")
        if self.non_rgb not in NON_RGB_CHOICES:
            raise ValueError(f"non-RGB handling must be one of {', '.join(NON_RGB_CHOICES)}, "
                             f"got {self.non_rgb!r}")
        if self.near_duplicates is not None and not 0 < self.near_duplicates <= 1:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {self.near_duplicates}")
        if self.clip_threshold is not None and not -1 <= self.clip_threshold <= 1:
            raise ValueError(f"CLIP threshold is a cosine in [-1, 1] (0.2 is usual), "
                             f"got {self.clip_threshold}")
        if self.caption_batch < 1:
            raise ValueError(f"caption batch size must be at least 1, got {self.caption_batch}")
        if self.flip not in FLIP_MODES:
            raise ValueError(f"flip must be one of {', '.join(FLIP_MODES)}, got {self.flip!r}")
        if not 0 <= self.flip_p <= 1:
            raise ValueError(f"flip probability must be between 0 and 1, got {self.flip_p}")
        if self.repeats is not None and not 1 <= self.repeats <= 10_000:
            raise ValueError(f"repeats must be between 1 and 10000, got {self.repeats}")
        if self.name:
            check_name(self.name, "dataset")  # refused as typed, never changed (a/b is not a-b)

    def settings(self) -> dict:
        """The job without its paths: what the manifest records under "settings"."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("inputs", "output")}


# --- per-image decisions -------------------------------------------------------------------------


@dataclass
class Item:
    """One input file and everything decided about it."""

    source: Source
    skipped: str = ""  # why the file is not usable at all (empty when it is)
    removed: str = ""  # why a usable image was left out (duplicate, CLIP score, by hand); reversible
    removed_by: str = ""  # "duplicate", "clip", "user"
    notes: list[str] = field(default_factory=list)  # conversions and corrections made, in words
    sha256: str = ""  # of the file's bytes
    pixel_hash: str = ""  # of the decoded RGB pixels: the same picture saved twice in other formats
    original_size: tuple[int, int] = (0, 0)  # after EXIF rotation
    original_mode: str = ""
    crop_box: tuple[int, int, int, int] = (0, 0, 0, 0)
    out_size: tuple[int, int] = (0, 0)
    name: str = ""  # output file stem
    caption: str = ""
    caption_source: str = ""  # "sidecar", "metadata.jsonl", "<captioner name>", "edited"
    clip_score: float | None = None
    image: Image.Image | None = field(default=None, repr=False)  # the training image, until written
    thumb: Image.Image | None = field(default=None, repr=False)  # the original with the crop box drawn

    @property
    def kept(self) -> bool:
        return not self.skipped and not self.removed

    @property
    def converted(self) -> bool:
        return any(n.startswith("converted") for n in self.notes)

    def record(self) -> dict:
        """The manifest's entry for this item (no pixels)."""
        out = {"source": self.source.label}
        if self.skipped:
            return {**out, "reason": self.skipped}
        out.update(file=f"{self.name}.png", sha256=self.sha256, original_size=list(self.original_size),
                   original_mode=self.original_mode, crop={"box": list(self.crop_box)},
                   size=list(self.out_size),
                   caption=self.caption, caption_source=self.caption_source, clip_score=self.clip_score,
                   notes=list(self.notes))
        if self.source.repeats:
            out["source_repeats"] = self.source.repeats
        if self.removed:
            out["reason"] = self.removed
        return out


@dataclass
class DuplicatePair:
    a: int  # item indices; `a` is the one kept by default (the first, or the larger picture)
    b: int
    kind: str  # "exact" (same bytes or same pixels) or "near" (CLIP image cosine)
    similarity: float = 1.0
    keep: str = "a"  # "a", "b" or "both" (not duplicates after all)


@dataclass
class Curation:
    """A curation in progress: what the UI holds between steps and the command line runs through."""

    job: CurateJob
    items: list[Item] = field(default_factory=list)
    pairs: list[DuplicatePair] = field(default_factory=list)
    interrupted: bool = False

    def kept(self) -> list[Item]:
        return [it for it in self.items if it.kept]

    @property
    def repeats(self) -> int:
        """The job's repeats, else the most common kohya folder repeats among the kept images, else 1."""
        if self.job.repeats is not None:
            return self.job.repeats
        found = [it.source.repeats for it in self.kept() if it.source.repeats]
        return max(set(found), key=found.count) if found else 1

    def usable(self) -> list[Item]:
        """Images that loaded (kept or removed by a reversible decision)."""
        return [it for it in self.items if not it.skipped]


# --- 1. import -----------------------------------------------------------------------------------


def prepare(item: Item, image: Image.Image, job: CurateJob) -> None:
    """Plan the crop, make the training image and a preview of where the crop falls."""
    box, target = plan_crop(image, job.size, job.crop)
    item.crop_box, item.out_size = tuple(int(v) for v in box), target
    item.image = apply_crop(image, box, target)
    item.thumb = crop_preview(image, box)


def crop_preview(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """A small copy of the whole image, dimmed outside the crop, with the crop outlined."""
    scale = min(1.0, THUMB_SIDE / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    thumb = image.resize(size, Image.Resampling.BILINEAR)
    left, top, right, bottom = (round(v * scale) for v in box)
    dim = Image.blend(thumb, Image.new("RGB", size, (0, 0, 0)), 0.55)
    dim.paste(thumb.crop((left, top, right, bottom)), (left, top))
    outline = (left, top, max(left, right - 1), max(top, bottom - 1))
    ImageDraw.Draw(dim).rectangle(outline, outline=(255, 200, 0), width=2)
    return dim


def import_images(job: CurateJob, on_progress: ProgressFn | None = None,
                  cancel: threading.Event | None = None) -> Curation:
    """Scan, load, convert and crop every input; exact duplicates are paired (the first one kept)."""
    job.validate()
    if not job.inputs:
        raise ValueError("no input: give a folder, a zip file or images")
    max_bytes = job.max_file_mb * 1_000_000
    items = [Item(source, skipped=reason) for source, reason in scan_inputs(job.inputs, max_bytes)]
    curation = Curation(job, items)
    total = len(items)
    for i, item in enumerate(items):
        if cancel is not None and cancel.is_set():
            curation.interrupted = True
            for rest in items[i:]:
                rest.skipped = rest.skipped or "not imported: stopped"
            break
        if not item.skipped:
            try:
                decoded = load_image(item.source, job.min_side, job.max_pixels, max_bytes,
                                     prune_gray=job.non_rgb == "prune")
                item.sha256, item.pixel_hash = decoded.sha256, decoded.pixel_hash
                item.original_mode, item.original_size = decoded.original_mode, decoded.original_size
                item.notes = decoded.notes
                prepare(item, decoded.image, job)
            except SkipImage as e:
                item.skipped = str(e)
            except Exception as e:  # one bad file must never end the import
                item.skipped = f"could not be processed: {type(e).__name__}: {e}"
        if on_progress:
            on_progress(i + 1, total, f"imported {item.source.label}")
    for item in curation.usable():
        if item.source.caption:
            item.caption = item.source.caption
            item.caption_source = item.source.caption_file or "sidecar"
    assign_names(curation.items)
    curation.pairs = find_exact_duplicates(curation.items)
    apply_duplicate_choices(curation)
    return curation


def recrop(curation: Curation, size: int, crop: str, on_progress: ProgressFn | None = None,
           cancel: threading.Event | None = None) -> bool:
    """Crop every usable image again at a new size or mode; captions and choices stay, CLIP scores go (the
    picture changed). All or nothing: a stop leaves the earlier crops. Returns whether it finished."""
    job = replace(curation.job, size=size, crop=crop)
    job.validate()
    todo = curation.usable()
    fresh: list[tuple[Item, Item | str]] = []
    for i, item in enumerate(todo):
        if cancel is not None and cancel.is_set():
            return False
        probe = Item(item.source)
        try:
            decoded = load_image(item.source, job.min_side, job.max_pixels, job.max_file_mb * 1_000_000,
                                 prune_gray=job.non_rgb == "prune")
            prepare(probe, decoded.image, job)
            fresh.append((item, probe))
        except SkipImage as e:  # the file changed since the import
            fresh.append((item, f"{e} (on re-crop)"))
        if on_progress:
            on_progress(i + 1, len(todo), f"cropped {item.source.label}")
    for item, result in fresh:
        if isinstance(result, str):
            item.skipped, item.image, item.thumb = result, None, None
        else:
            item.crop_box, item.out_size, item.image, item.thumb = (result.crop_box, result.out_size,
                                                                    result.image, result.thumb)
        item.clip_score = None
    items = curation.items
    curation.pairs = [p for p in curation.pairs if not items[p.a].skipped and not items[p.b].skipped]
    apply_duplicate_choices(curation)
    curation.job = job
    return True


def assign_names(items: list[Item]) -> None:
    """Output stems from the source names, made unique (cat, cat-2, ...)."""
    taken: set[str] = set()
    for item in items:
        if item.skipped:
            continue
        base = _slug(PurePosixPath(item.source.member or item.source.label).stem) or "image"
        name, n = base, 1
        while name.lower() in taken or name.lower().endswith("_flip"):
            n += 1
            name = f"{base}-{n}"
        taken.add(name.lower())
        item.name = name


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()).strip("._")[:80]


# --- 2. duplicates -------------------------------------------------------------------------------


def find_exact_duplicates(items: list[Item]) -> list[DuplicatePair]:
    """Pairs of usable items with the same bytes or the same decoded pixels; the first one is `a`."""
    pairs, first_by_hash = [], {}
    for i, item in enumerate(items):
        if item.skipped:
            continue
        for key in (("file", item.sha256), ("pixels", item.pixel_hash)):
            if key in first_by_hash:
                pairs.append(DuplicatePair(first_by_hash[key], i, "exact"))
                break
        else:
            first_by_hash[("file", item.sha256)] = i
            first_by_hash[("pixels", item.pixel_hash)] = i
    return pairs


def find_near_duplicates(items: list[Item], embeddings, threshold: float,
                         exclude: Iterable[tuple[int, int]] = ()) -> list[DuplicatePair]:
    """Pairs of usable items whose image embeddings (unit vectors, a row per item) have cosine >= threshold.

    `a` is the larger picture (more pixels), which is the one kept unless the user picks the other.
    """
    import torch

    emb = torch.as_tensor(embeddings, dtype=torch.float32)
    if emb.shape[0] != len(items):
        raise ValueError(f"need one embedding per item, got {emb.shape[0]} for {len(items)} items")
    usable = [i for i, it in enumerate(items) if not it.skipped and not torch.isnan(emb[i]).any()]
    seen = {tuple(sorted(p)) for p in exclude}
    sims = emb[usable] @ emb[usable].T
    pairs = []
    for x in range(len(usable)):
        for y in range(x + 1, len(usable)):
            i, j = usable[x], usable[y]
            sim = float(sims[x, y])
            if sim >= threshold and (i, j) not in seen:
                area_i = items[i].original_size[0] * items[i].original_size[1]
                area_j = items[j].original_size[0] * items[j].original_size[1]
                a, b = (j, i) if area_j > area_i else (i, j)
                pairs.append(DuplicatePair(a, b, "near", round(sim, 4)))
    return pairs


def apply_duplicate_choices(curation: Curation) -> None:
    """Mark the item not kept in each pair as removed; earlier duplicate removals are re-decided."""
    for item in curation.items:
        if item.removed_by == "duplicate":
            item.removed, item.removed_by = "", ""
    for pair in curation.pairs:
        if pair.keep == "both":
            continue
        if pair.keep not in ("a", "b"):
            raise ValueError(f"keep must be 'a', 'b' or 'both', got {pair.keep!r}")
        keep, drop = (pair.a, pair.b) if pair.keep == "a" else (pair.b, pair.a)
        item = curation.items[drop]
        if item.removed_by in ("", "duplicate") and not item.skipped:
            what = ("exact duplicate" if pair.kind == "exact"
                    else f"near duplicate (CLIP cosine {pair.similarity:.3f})")
            item.removed, item.removed_by = f"{what} of {curation.items[keep].source.label}", "duplicate"


# --- 3. captions, 4. CLIP check --------------------------------------------------------------------


def caption_items(curation: Curation, captioner, on_progress: ProgressFn | None = None,
                  cancel: threading.Event | None = None) -> int:
    """Caption the kept images (those without a caption that came with them, unless told to replace those).

    Returns the number captioned; a stop leaves the rest as they were.
    """
    job = curation.job
    todo = [it for it in curation.kept()
            if not (job.keep_captions and it.caption_source and it.caption_source != captioner.name)]
    texts = captioner.caption_all([it.image for it in todo], job.caption_batch, on_progress, cancel)
    done = 0
    for item, text in zip(todo, texts, strict=True):
        if text is None:
            curation.interrupted = True
            continue
        item.caption = compose_caption(text, job.caption_prefix, job.caption_suffix)
        item.caption_source = captioner.name
        done += 1
    return done


def set_caption(curation: Curation, index: int, text: str) -> bool:
    """A caption edited by hand; returns whether it changed."""
    item = curation.items[index]
    text = " ".join((text or "").split())
    if text == item.caption:
        return False
    item.caption, item.caption_source = text, "edited"
    return True


def set_kept(curation: Curation, index: int, keep: bool) -> None:
    """Leave an image out by hand, or take back such a choice (other removals have their own controls)."""
    item = curation.items[index]
    if item.skipped:
        return
    if not keep and item.kept:
        item.removed, item.removed_by = "left out by hand", "user"
    elif keep and item.removed_by == "user":
        item.removed, item.removed_by = "", ""


def score_items(curation: Curation, scorer, on_progress: ProgressFn | None = None,
                cancel: threading.Event | None = None) -> int:
    """CLIP score (image-caption cosine) of every usable image that has a caption; returns how many scored."""
    todo = [it for it in curation.usable() if it.caption]
    scores = scorer.score([it.image for it in todo], [it.caption for it in todo], on_progress, cancel)
    n = 0
    for item, value in zip(todo, scores, strict=True):
        if value == value:  # NaN: not reached before Stop
            item.clip_score, n = round(value, 4), n + 1
        else:
            curation.interrupted = True
    return n


def apply_clip_filter(curation: Curation, threshold: float | None) -> list[Item]:
    """Remove pairs scoring below `threshold` (re-deciding earlier CLIP removals); returns those removed."""
    for item in curation.items:
        if item.removed_by == "clip":
            item.removed, item.removed_by = "", ""
    if threshold is None:
        return []
    removed = []
    for item in curation.items:
        if item.kept and item.clip_score is not None and item.clip_score < threshold:
            item.removed = f"CLIP score {item.clip_score:.3f} below the threshold {threshold}"
            item.removed_by = "clip"
            removed.append(item)
    return removed


def near_duplicate_pass(curation: Curation, scorer, threshold: float, on_progress: ProgressFn | None = None,
                        cancel: threading.Event | None = None) -> list[DuplicatePair]:
    """Embed the usable images and add near-duplicate pairs (exact pairs stay as they are)."""
    import torch

    usable = curation.usable()
    emb = torch.full((len(curation.items), scorer.dim), float("nan"))
    if usable:
        idx = [curation.items.index(it) for it in usable]
        emb[idx] = scorer.image_embeddings([it.image for it in usable], on_progress, cancel)
    curation.pairs = [p for p in curation.pairs if p.kind == "exact"]
    exact = [(p.a, p.b) for p in curation.pairs]
    new = find_near_duplicates(curation.items, emb, threshold, exclude=exact)
    curation.pairs += new
    apply_duplicate_choices(curation)
    return new


# --- 5. write ------------------------------------------------------------------------------------


def check_output(output: Path, inputs: Iterable[Path], replace: bool = True) -> Path:
    """Refuse an output folder that would overwrite someone's files or the inputs themselves (or, without
    `replace`, an earlier studio dataset)."""
    output = Path(output).expanduser().resolve()
    for raw in inputs:
        src = Path(raw).expanduser().resolve()
        if output == src or src in output.parents or output in src.parents:
            raise ValueError(f"the output folder {output} overlaps the input {src}; write the dataset "
                             "elsewhere (inputs are never modified)")
    if output.exists():
        if not output.is_dir():
            raise ValueError(f"output {output} exists and is not a folder")
        if any(output.iterdir()) and not (output / MANIFEST).is_file():
            raise ValueError(f"output folder {output} already holds files that are not a studio dataset; "
                             "choose a new or empty folder")
        if not replace and any(output.iterdir()):
            raise DatasetExistsError(f"a dataset named {output.name!r} already exists in {output.parent.name}/; "
                                     "choose another name, or ask to replace it")
    return output


def write_dataset(curation: Curation, output: Path | None = None, replace: bool = False) -> Path:
    """Write images, .txt captions, metadata.jsonl, dataset.json and report.json in one atomic step; an earlier
    studio dataset there is replaced only with `replace` (else DatasetExistsError)."""
    job = curation.job
    output = check_output(output or job.output or Path("dataset"), job.inputs, replace)
    kept = curation.kept()
    if not kept:
        raise ValueError("no images to write: every file was skipped or removed (see the report)")
    with atomic_dir(output) as tmp:
        rows = []
        for item in kept:
            item.image.save(tmp / f"{item.name}.png", optimize=False)
            (tmp / f"{item.name}.txt").write_text(item.caption, encoding="utf-8")
            rows.append({"file_name": f"{item.name}.png", "text": item.caption})
            if job.flip == "stored":
                mirrored = item.image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                mirrored.save(tmp / f"{item.name}_flip.png")
                (tmp / f"{item.name}_flip.txt").write_text(item.caption, encoding="utf-8")
                rows.append({"file_name": f"{item.name}_flip.png", "text": item.caption})
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                            encoding="utf-8")
        manifest = build_manifest(curation, output)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
        (tmp / REPORT).write_text(json.dumps(build_report(curation), indent=2, ensure_ascii=False),
                                  encoding="utf-8")
    return output


def build_manifest(curation: Curation, output: Path) -> dict:
    job = curation.job
    kept = curation.kept()
    return {
        "format": "studio-dataset",
        "version": 1,
        "name": dataset_name(job, output),
        "created": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "studio_version": __version__,
        "sources": [str(Path(p).expanduser().resolve()) for p in job.inputs],
        "settings": job.settings(),
        "training": {"resolution": job.size, "buckets": job.crop == "bucket", "repeats": curation.repeats,
                     "flip": job.flip, "flip_p": job.flip_p if job.flip == "random" else 0.0,
                     "caption_extension": ".txt", "num_images": len(kept),
                     "images_per_epoch": len(kept) * curation.repeats * (2 if job.flip == "stored" else 1)},
        "images": [it.record() for it in kept],
        "removed": [it.record() for it in curation.items if it.removed and not it.skipped],
        "skipped": [it.record() for it in curation.items if it.skipped],
        "duplicates": [{**asdict(p), "a": curation.items[p.a].source.label,
                        "b": curation.items[p.b].source.label} for p in curation.pairs],
        "interrupted": curation.interrupted,
    }


def build_report(curation: Curation) -> dict:
    """What happened to every input: kept (with conversions), removed and skipped, with reasons."""
    kept = curation.kept()
    return {
        "counts": {"inputs": len(curation.items), "kept": len(kept),
                   "converted": sum(it.converted for it in kept),
                   "removed": sum(1 for it in curation.items if it.removed and not it.skipped),
                   "skipped": sum(1 for it in curation.items if it.skipped)},
        "kept": [{"source": it.source.label, "file": f"{it.name}.png", "notes": it.notes} for it in kept],
        "converted": [{"source": it.source.label, "notes": it.notes} for it in kept if it.converted],
        "removed": [{"source": it.source.label, "reason": it.removed}
                    for it in curation.items if it.removed and not it.skipped],
        "skipped": [{"source": it.source.label, "reason": it.skipped} for it in curation.items if it.skipped],
        "interrupted": curation.interrupted,
    }


def dataset_name(job: CurateJob, output: Path | None) -> str:
    """The name the user gave (check_name'd, never changed), else one made from the output folder's name."""
    if job.name:
        return check_name(job.name, "dataset")
    return (_slug(Path(output).name) if output else "") or "dataset"


def kohya_target(parent: Path, name: str, repeats: int, replace: bool = False) -> Path:
    """parent/<repeats>_<name>/, refused when it holds someone else's files or (without `replace`) an earlier
    export of the studio (DatasetExistsError)."""
    name = check_name(name, "dataset")
    if int(repeats) < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    target = safe_child(Path(parent), f"{int(repeats)}_{name}")
    if target.exists() and any(target.iterdir()):
        if not (target / ".studio-kohya").is_file():
            raise ValueError(f"{target} already holds files not written by the studio; choose another folder")
        if not replace:
            raise DatasetExistsError(f"a kohya export {target.name!r} already exists in {target.parent.name}/; "
                                     "choose another name, or ask to replace it")
    return target


def export_kohya(dataset_dir: Path, parent: Path, name: str | None = None,
                 repeats: int | None = None, replace: bool = False) -> Path:
    """Copy a studio dataset into kohya's layout: parent/<repeats>_<name>/ with images and .txt captions; an
    earlier export there is replaced only with `replace` (else DatasetExistsError)."""
    dataset_dir = Path(dataset_dir)
    manifest_path = dataset_dir / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"{dataset_dir} is not a studio dataset (no {MANIFEST})")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    name = name or manifest.get("name") or "dataset"
    repeats = int(repeats or manifest.get("training", {}).get("repeats", 1))
    target = kohya_target(parent, name, repeats, replace)
    with atomic_dir(target) as tmp:
        for path in sorted(dataset_dir.iterdir()):
            if path.suffix.lower() in (".png", ".txt") and path.is_file():
                shutil.copy2(path, tmp / path.name)
        # kohya reads captions with --caption_extension .txt; the marker lets the studio replace this folder
        (tmp / ".studio-kohya").write_text(f"exported from {dataset_dir}\n", encoding="utf-8")
    return target


def read_manifest(dataset_dir: Path) -> dict:
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{dataset_dir} is not a studio dataset (no {MANIFEST})")
    return json.loads(path.read_text(encoding="utf-8"))


# --- the whole recipe (command line) ----------------------------------------------------------------


@dataclass
class CurateResult:
    output: Path
    curation: Curation
    report: dict
    kohya: Path | None = None


def curate(job: CurateJob, cache_dir: Path, device: str = "auto", on_progress: ProgressFn | None = None,
           cancel: threading.Event | None = None, kohya_parent: Path | None = None,
           replace: bool = False) -> CurateResult:
    """Import -> duplicates -> captions -> CLIP check -> write, deciding duplicates automatically. An earlier
    dataset (or kohya export) of the same name is replaced only with `replace`, else DatasetExistsError before
    any work."""
    # 1. validate, before any model loads
    job.validate()
    if job.output is None:
        raise ValueError("an output folder is required")
    check_output(job.output, job.inputs, replace)

    def step(label: str) -> ProgressFn | None:
        return None if on_progress is None else (lambda d, t, m: on_progress(d, t, f"{label}: {m}"))

    # 2. import, convert, crop; exact duplicates (the first one is kept)
    curation = import_images(job, step("import"), cancel)
    scorer = None
    if job.near_duplicates is not None or job.clip_threshold is not None:
        from studio.dataset.clipscore import load_clip_scorer

        scorer = load_clip_scorer(job.clip_model, cache_dir, device)
    # 3. near duplicates (the larger picture is kept)
    if scorer is not None and job.near_duplicates is not None:
        near_duplicate_pass(curation, scorer, job.near_duplicates, step("duplicates"), cancel)
    # 4. captions
    if job.caption_model not in ("", "none"):
        from studio.dataset.captioning import load_captioner

        captioner = load_captioner(job.caption_model, cache_dir, device)
        caption_items(curation, captioner, step("captions"), cancel)
    elif job.caption_prefix or job.caption_suffix:
        for item in curation.kept():
            item.caption = compose_caption(item.caption, job.caption_prefix, job.caption_suffix)
    # 5. CLIP check
    if scorer is not None and job.clip_threshold is not None:
        score_items(curation, scorer, step("CLIP"), cancel)
        apply_clip_filter(curation, job.clip_threshold)
    # 6. write
    if not curation.kept():
        report = build_report(curation)
        why = "; ".join(f"{e['source']}: {e['reason']}" for e in (report["skipped"] + report["removed"])[:5])
        raise ValueError(f"no usable images in the input ({len(curation.items)} files looked at). {why}")
    if kohya_parent is not None:  # refused before the dataset is written, not after
        kohya_target(kohya_parent, dataset_name(job, Path(job.output)), curation.repeats, replace)
    output = write_dataset(curation, job.output, replace=replace)
    kohya = None
    if kohya_parent is not None:
        kohya = export_kohya(output, kohya_parent, dataset_name(job, output), curation.repeats, replace=replace)
    return CurateResult(output, curation, build_report(curation), kohya)
