"""Evaluate a folder of generated images against a folder of reference images: a typed job, validated up front,
run with progress and Stop, giving a JSON report (per prompt and overall, with warnings)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from studio.evaluate import metrics as M

METRICS = ("clip-i", "clip-t", "dino", "fid", "kid", "captions")
DEFAULT_METRICS = ("clip-i", "clip-t")
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
MAX_IMAGE_PIXELS = 64_000_000  # larger images are skipped before decoding (possible decompression bombs)
MAX_IMAGE_BYTES = 200_000_000
ProgressFn = Callable[[int, int, str], None]


class Cancelled(RuntimeError):
    """Stop was pressed."""


@dataclass
class EvaluateJob:
    generated: str  # folder of generated images
    references: str = ""  # folder of reference (real) images: CLIP-I, DINO, FID, KID need it
    prompts: str = ""  # file giving each generated image's prompt (else: the PNG's parameters, else name.txt)
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    clip_model: str = "ViT-L-14"  # open_clip spec (studio.clipscore), or demo-tiny
    dino_model: str = "facebook/dino-vits16"  # hub id, local folder, or demo-tiny
    fid_features: str = "inception"  # inception[:/weights.pth] | clip | dino | demo-tiny
    caption_model: str = "Salesforce/blip-image-captioning-base"  # BLIP/BLIP-2 for "captions", or demo-tiny
    style_phrases: list[str] = field(default_factory=list)  # also removed from prompts for CLIP-T
    device: str = "auto"

    def validate(self) -> None:
        """Raise ValueError naming the bad value. Nothing is corrected silently."""
        if isinstance(self.metrics, str):
            self.metrics = [m.strip() for m in self.metrics.split(",") if m.strip()]
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise ValueError(f"metrics must be some of {', '.join(METRICS)}, got {', '.join(self.metrics) or 'none'}")
        folder = Path(str(self.generated)).expanduser()
        if not str(self.generated).strip() or not folder.is_dir():
            raise ValueError(f"generated images folder {self.generated!r} does not exist")
        needs_refs = [m for m in self.metrics if m in ("clip-i", "dino", "fid", "kid")]
        if needs_refs and not str(self.references).strip():
            raise ValueError(f"{', '.join(needs_refs)} compare with reference images: give a references folder")
        if str(self.references).strip() and not Path(str(self.references)).expanduser().is_dir():
            raise ValueError(f"references folder {self.references!r} does not exist")
        if str(self.prompts).strip() and not Path(str(self.prompts)).expanduser().is_file():
            raise ValueError(f"prompts file {self.prompts!r} does not exist")
        if not (self.fid_features in ("inception", "clip", "dino", "demo-tiny")
                or str(self.fid_features).startswith("inception:")):
            raise ValueError("FID features must be inception, inception:/path/to/weights.pth, clip, dino or "
                             f"demo-tiny, got {self.fid_features!r}")


# --- reading -----------------------------------------------------------------------------------


def read_images(folder: Path) -> tuple[list[Path], list[Image.Image], dict[str, str]]:
    """The images directly in `folder`, sorted by name, as RGB; unreadable or oversized files (header checked before
    decoding) are skipped with the reason."""
    from studio.files.images import SkipImage, Source, load_image

    paths, images, skipped = [], [], {}
    for path in sorted(Path(folder).expanduser().iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_EXTS or path.name.startswith("."):
            continue
        try:
            images.append(load_image(Source(path.name, path), 1, MAX_IMAGE_PIXELS, MAX_IMAGE_BYTES).image)
            paths.append(path)
        except SkipImage as e:
            skipped[path.name] = str(e)
    return paths, images, skipped


def read_prompts(paths: list[Path], prompts_file: str = "") -> list[str | None]:
    """Each image's prompt: from the prompts file (.json {file: prompt}, or .txt with one line for every image or
    one line per image in name order), else the PNG's generation parameters, else a `name.txt` beside it."""
    from studio.generation.infotext import parse_infotext, read_image_infotext

    if prompts_file:
        path = Path(prompts_file).expanduser()
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, list):
                data = {str(e["file"]): str(e["prompt"]) for e in data}
            if not isinstance(data, dict):
                raise ValueError(f"{path.name} must map file names to prompts")
            missing = [p.name for p in paths if p.name not in data and p.stem not in data]
            if missing:
                raise ValueError(f"{path.name} gives no prompt for {', '.join(missing[:5])}")
            return [str(data.get(p.name, data.get(p.stem))) for p in paths]
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if len(lines) == 1:
            return lines * len(paths)
        if len(lines) != len(paths):
            raise ValueError(f"{path.name} has {len(lines)} prompts for {len(paths)} images: give one line for every "
                             "image, or one per image in file-name order, or a .json {file: prompt}")
        return lines
    out: list[str | None] = []
    for p in paths:
        text = read_image_infotext(p) if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") else None
        if text:
            out.append(parse_infotext(text).get("prompt", "") or None)
        elif p.with_suffix(".txt").is_file():
            out.append(p.with_suffix(".txt").read_text(encoding="utf-8").strip() or None)
        else:
            out.append(None)
    return out


# --- the run -----------------------------------------------------------------------------------


@dataclass
class Embedders:
    """The networks an evaluation needs, loaded once (the experiment runner reuses them across cells)."""

    clip: object = None
    dino: object = None
    fid: object = None
    captioner: object = None


def load_embedders(job: EvaluateJob, cache_dir: Path) -> Embedders:
    from studio.dataset.clipscore import ClipLoadError, load_clip_scorer
    from studio.evaluate.encoders import EncoderLoadError, load_dino, load_fid_features

    metrics = set(job.metrics)
    out = Embedders()
    try:
        if metrics & {"clip-i", "clip-t"} or (metrics & {"fid", "kid"} and job.fid_features == "clip"):
            out.clip = load_clip_scorer(job.clip_model, cache_dir, job.device)
    except ClipLoadError as e:
        raise ValueError(str(e)) from e
    try:
        if "dino" in metrics or (metrics & {"fid", "kid"} and job.fid_features == "dino"):
            out.dino = load_dino(job.dino_model, cache_dir, job.device)
        if metrics & {"fid", "kid"}:
            out.fid = load_fid_features(job.fid_features, cache_dir, job.device, out.clip, out.dino)
    except EncoderLoadError as e:
        raise ValueError(str(e)) from e
    if "captions" in metrics:
        from studio.dataset.captioning import CaptionerLoadError, load_captioner

        try:
            out.captioner = load_captioner(job.caption_model, cache_dir, job.device)
        except CaptionerLoadError as e:
            raise ValueError(str(e)) from e
    return out


def evaluate_folders(job: EvaluateJob, cache_dir: Path, on_progress: ProgressFn | None = None,
                     cancel: threading.Event | None = None, embedders: Embedders | None = None) -> dict:
    """Run the job; the report (a JSON-ready dict) has overall metrics, per-prompt rows, per-image rows, warnings."""
    # 1. validate and read
    job.validate()
    progress = on_progress or (lambda done, total, info: None)
    gen_paths, generated, skipped = read_images(Path(job.generated))
    if not generated:
        raise ValueError(f"no images in {job.generated}")
    ref_paths, references, ref_skipped = (read_images(Path(job.references)) if str(job.references).strip()
                                          else ([], [], {}))
    if str(job.references).strip() and not references:
        raise ValueError(f"no images in {job.references}")
    prompts = read_prompts(gen_paths, job.prompts)
    if "clip-t" in job.metrics and any(p is None for p in prompts):
        missing = [p.name for p, q in zip(gen_paths, prompts, strict=True) if q is None]
        raise ValueError(f"CLIP-T needs each image's prompt; none found for {', '.join(missing[:5])} (give a prompts "
                         "file, or images with generation parameters or a .txt beside them)")
    steps = ["load"] + [m for m in ("clip-i", "dino", "fid", "captions") if m in job.metrics or
                        (m == "fid" and "kid" in job.metrics)]
    done = 0

    def step(info: str) -> None:
        nonlocal done
        if cancel is not None and cancel.is_set():
            raise Cancelled("stopped")
        progress(done, len(steps), info)
        done += 1

    # 2. models
    step("loading models")
    emb = embedders or load_embedders(job, cache_dir)
    report: dict = {"generated": str(job.generated), "references": str(job.references) or None,
                    "job": asdict(job), "counts": {"generated": len(generated), "references": len(references)},
                    "skipped": {**skipped, **{f"references/{k}": v for k, v in ref_skipped.items()}},
                    "metrics": {}, "per_prompt": [], "images": [], "warnings": []}
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt or "", []).append(i)
    texts = {p: M.strip_style(p, job.style_phrases) for p in groups}
    rows = {p: {"prompt": p or None, "text": texts[p] if p else None, "images": len(ix)} for p, ix in groups.items()}
    per_image = [{"file": p.name, "prompt": q} for p, q in zip(gen_paths, prompts, strict=True)]

    # 3. CLIP-I and CLIP-T (one CLIP pass over every image)
    if {"clip-i", "clip-t"} & set(job.metrics):
        step("CLIP embeddings")
        gen_emb = emb.clip.image_embeddings(generated, cancel=cancel)
        ref_emb = emb.clip.image_embeddings(references, cancel=cancel) if references else None
        text_emb = emb.clip.text_embeddings([texts[p] for p in groups]) if "clip-t" in job.metrics else None
        for k, (p, ix) in enumerate(groups.items()):
            if "clip-i" in job.metrics:
                rows[p]["clip_i"] = M.clip_i_accuracy(gen_emb[ix], ref_emb)
            if "clip-t" in job.metrics:
                rows[p]["clip_t"] = M.clip_t(text_emb[k], gen_emb[ix])
                for i in ix:
                    per_image[i]["clip_t"] = float(M.cosine_matrix(text_emb[k], gen_emb[i])[0, 0])
        for key in ("clip_i", "clip_t"):
            if key.replace("_", "-") in job.metrics:
                report["metrics"][key] = M.mean(r[key] for r in rows.values())
        report["models"] = {"clip": job.clip_model}
    report.setdefault("models", {})

    # 4. DINO
    if "dino" in job.metrics:
        step("DINO embeddings")
        gen_dino = emb.dino.image_embeddings(generated)
        ref_dino = emb.dino.image_embeddings(references)
        for p, ix in groups.items():
            rows[p]["dino"] = M.dino_similarity(gen_dino[ix], ref_dino)
        report["metrics"]["dino"] = M.dino_similarity(gen_dino, ref_dino)
        report["models"]["dino"] = job.dino_model

    # 5. FID and KID
    if {"fid", "kid"} & set(job.metrics):
        step(f"{emb.fid.name} features")
        real, fake = emb.fid.features(references), emb.fid.features(generated)
        report["models"]["fid_features"] = emb.fid.name
        if "fid" in job.metrics:
            report["metrics"]["fid"] = M.frechet_distance(real, fake)
            warning = M.fid_warning(len(real), len(fake), emb.fid.dim)
            if warning:
                report["warnings"].append(warning)
        if "kid" in job.metrics:
            report["metrics"]["kid_mean"], report["metrics"]["kid_std"] = M.kernel_inception_distance(real, fake)

    # 6. BLIP captions of the generated images next to their prompts (seed 003's check)
    if "captions" in job.metrics:
        step("captions")
        captions = emb.captioner.caption_all(generated, cancel=cancel)
        for row, caption in zip(per_image, captions, strict=True):
            row["caption"] = caption
        report["models"]["captioner"] = job.caption_model
    progress(len(steps), len(steps), "done")
    report["warnings"] += demo_warnings(report["models"])
    report["per_prompt"] = list(rows.values())
    report["images"] = per_image
    return report


def demo_warnings(models: dict) -> list[str]:
    """A warning for each score made with a built-in demo-tiny encoder: its weights are random, so the number
    says the pipeline ran, not how good the images are."""
    labels = {"clip": "CLIP-I and CLIP-T", "dino": "DINO", "fid_features": "FID and KID", "captioner": "the captions"}
    return [f"{labels.get(kind, kind)} come from demo-tiny, a {kind.replace('_features', '')} model with random "
            "weights: the numbers only show that scoring works, not how good the images are; choose a real model "
            "for scores that mean something" for kind, name in models.items() if str(name) == "demo-tiny"]


def write_report(report: dict, path: Path) -> Path:
    from studio.files.atomic import write_text

    write_text(path, json.dumps(report, indent=2, ensure_ascii=False, default=_json_default) + "\n")
    return Path(path)


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
