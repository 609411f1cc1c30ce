"""A text-to-image, image-to-image, inpainting or outpainting request as a typed job (A1111's parameters),
validated before any model work; the init image and mask are read through the checked loaders of
studio.files.images and fitted per A1111's modes (studio.generation.masking)."""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from studio.config import Limits, check_known_keys, real_number, text, whole_number
from studio.files.images import SkipImage, Source, load_image, open_checked, to_rgb
from studio.generation import hires, masking, samplers
from studio.generation.prompt_syntax import check_prompt_limits

MAX_SEED = 2**32 - 1
# A1111's img2img resize modes (its "Just resize (latent upscale)" is not offered)
RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill")
# an init image is refused above these, before it is decoded
MAX_INIT_PIXELS = 64_000_000
MAX_INIT_BYTES = 200_000_000


@dataclass
class GenerateJob:
    prompt: str
    negative_prompt: str = ""
    sampler: str = "DPM++ 2M"  # A1111 name (samplers.SAMPLERS)
    schedule: str = "Karras"  # A1111 schedule type (samplers.SCHEDULE_TYPES)
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int = -1  # -1: a random seed, reported back
    width: int = 512
    height: int = 512
    batch_size: int = 1  # images per denoising pass
    batch_count: int = 1  # passes one after another
    clip_skip: int = 1  # A1111 "Clip skip": 2 uses the text encoder's penultimate layer
    # image to image: a file path or a PIL image (None: text to image), how much of it is redrawn (A1111's
    # "Denoising strength": 0 keeps it, 1 redraws it all) and how it is fitted to width x height
    init_image: str | os.PathLike | Image.Image | None = None
    denoising_strength: float = 0.75
    resize_mode: str = "Just resize"
    # inpainting (with init_image): a mask picture (white or painted = redraw) and A1111's options
    mask: str | os.PathLike | Image.Image | None = None
    mask_blur: int = 4
    mask_mode: str = "Inpaint masked"  # or "Inpaint not masked"
    masked_content: str = "original"  # "fill", "original", "latent noise", "latent nothing"
    inpaint_area: str = "Whole picture"  # or "Only masked": the mask's area is drawn at the full size
    inpaint_padding: int = 32  # "Only masked padding, pixels"
    # outpainting (with init_image): pixels added per side ({"left": 64} or "left=64,right=64"); the new bands
    # are drawn, the init (fitted to width x height) is kept
    outpaint: dict | str | None = None
    # hires fix (text to image): a second pass at hires_scale x the size (or hires_width x hires_height), from the
    # first pass upscaled by hires_upscaler (a latent upscaler, Lanczos, Nearest or a file in upscalers/), redrawn at
    # hires_denoising with hires_steps (0: steps), hires_sampler ("": the same) and hires prompts ("": the same)
    hires_fix: bool = False
    hires_scale: float = 2.0
    hires_upscaler: str = hires.DEFAULT_UPSCALER
    hires_steps: int = 0
    hires_denoising: float = 0.7
    hires_width: int = 0
    hires_height: int = 0
    hires_sampler: str = ""
    hires_prompt: str = ""
    hires_negative_prompt: str = ""
    # ControlNets (A1111's ControlNet units, studio.generation.controls.ControlUnit or dicts): each a model, a
    # picture, a preprocessor, weight, start/end, control mode and resize mode; several add up
    controls: list = field(default_factory=list)
    # regional prompts: a layout ("cols 1,1", "rows 2,1") and one prompt per region; the prompt above is what the
    # regions share (setting, style) and goes before each region's own
    regions: str = ""
    region_prompts: list = field(default_factory=list)
    region_mode: str = "Attention"  # Regional Prompter's: "Attention" (cross-attention per region) or "Latent"
    # IP-Adapter image prompts (issue 23; studio.generation.ip_adapter.IPAdapterUnit or dicts): each an adapter in
    # ipadapter/, its pictures, scale and start/end
    ip_adapters: list = field(default_factory=list)

    @classmethod
    def from_dict(cls, values: dict) -> GenerateJob:
        """A job from a preset or API dict; unknown keys are an error, not silently dropped."""
        check_known_keys(cls, values, "generation")
        return cls(**values)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["controls"] = [c.to_dict() if hasattr(c, "to_dict") else c for c in self.controls]
        out["ip_adapters"] = [u.to_dict() if hasattr(u, "to_dict") else u for u in self.ip_adapters]  # IP-Adapter
        return out

    def validate(self, limits: Limits | None = None) -> None:
        """Raise ValueError naming the bad value and what would be right. Nothing is corrected (20.0 becomes 20,
        the same number). `limits` (default: Limits.from_env()) bounds the prompts and the work."""
        limits = limits or Limits.from_env()
        for name, label in (("prompt", "prompt"), ("negative_prompt", "negative prompt")):
            check_prompt_limits(text(label, getattr(self, name)), label, limits)
        text("sampler", self.sampler)
        text("schedule type", self.schedule)
        self.steps = whole_number("steps", self.steps, 1, 150)
        for name in ("width", "height"):
            value = whole_number(name, getattr(self, name))
            if value % 8 != 0:
                lo, hi = value - value % 8, value - value % 8 + 8
                raise ValueError(f"{name} must be a multiple of 8, got {value} (try {lo or 8} or {hi})")
            setattr(self, name, whole_number(name, value, 64, 2048))
        self.batch_size = whole_number("batch size", self.batch_size, 1, 16)
        self.batch_count = whole_number("batch count", self.batch_count, 1, 100)
        real_number("CFG scale", self.cfg_scale, 0, 30)
        self.clip_skip = whole_number("clip skip", self.clip_skip, 1, 12)
        seed = whole_number("seed", self.seed)
        if not -1 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be -1 (random) or between 0 and {MAX_SEED}, got {seed}")
        self.seed = seed
        samplers.check(self.sampler, self.schedule)
        if self.init_image is not None:
            if not isinstance(self.init_image, (str, os.PathLike, Image.Image)):
                raise ValueError(f"init image must be an image file's path or an image, got "
                                 f"{type(self.init_image).__name__}")
            if isinstance(self.init_image, (str, os.PathLike)) and not Path(self.init_image).is_file():
                raise ValueError(f"init image {Path(self.init_image).name!r} does not exist")
            self.denoising_strength = real_number("denoising strength", self.denoising_strength, 0, 1)
            if text("resize mode", self.resize_mode) not in RESIZE_MODES:
                raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")
        self._validate_inpaint()
        self._validate_hires(limits)
        from studio.generation.controls import check_units

        self.controls = check_units(self.controls)
        from studio.generation import ip_adapter  # IP-Adapter units, checked like the ControlNet units

        self.ip_adapters = ip_adapter.check_units(self.ip_adapters)
        self._validate_regions(limits)
        width, height = self.frame_size()
        images = self.batch_size * self.batch_count
        cost, what = work(images, self.steps, width, height), describe_work(images, self.steps, width, height)
        second = self.hires_pass()
        if second is not None:
            steps = second.steps or self.steps
            cost += work(images, steps, second.width, second.height)
            what += f", plus {describe_work(images, steps, second.width, second.height)} for the hires fix"
        limits.check("max_work", cost, what)

    def _validate_regions(self, limits: Limits) -> None:
        from studio.generation import regions
        from studio.generation.prompt_syntax import extract_network_tags

        if not text("regions", self.regions).strip():
            if self.region_prompts:
                raise ValueError("region prompts need a regions layout, like 'cols 1,1'")
            self.regions = ""
            return
        _, shares = regions.parse_layout(self.regions)
        if self.region_mode not in regions.MODES:
            raise ValueError(f"region mode must be one of {', '.join(regions.MODES)}, got {self.region_mode!r}")
        if not isinstance(self.region_prompts, (list, tuple)) or len(self.region_prompts) != len(shares):
            count = len(self.region_prompts) if isinstance(self.region_prompts, (list, tuple)) else "no"
            raise ValueError(f"regions {self.regions!r} has {len(shares)} regions: give one prompt for each "
                             f"({count} given)")
        for k, prompt in enumerate(self.region_prompts, 1):
            check_prompt_limits(text(f"region {k} prompt", prompt), f"region {k} prompt", limits)
            if extract_network_tags(prompt)[1]:
                raise ValueError(f"region {k} prompt: <lora:...> tags act on the whole picture; put them in the "
                                 "prompt")
        self.region_prompts = list(self.region_prompts)

    def _validate_hires(self, limits: Limits) -> None:
        if not isinstance(self.hires_fix, bool):
            raise ValueError(f"hires fix must be true or false, got {self.hires_fix!r}")
        if not self.hires_fix:
            return
        if self.init_image is not None:
            raise ValueError("hires fix is for text to image; for a picture, upscale it and use image to image")
        real_number("hires scale", self.hires_scale, 1, 4)
        self.hires_steps = whole_number("hires steps", self.hires_steps, 0, 150)
        self.hires_denoising = real_number("hires denoising strength", self.hires_denoising, 0, 1)
        for name in ("hires_width", "hires_height"):
            value = whole_number(name.replace("_", " "), getattr(self, name), 0, 2048)
            setattr(self, name, value)
        text("hires upscaler", self.hires_upscaler)
        if self.hires_sampler:
            samplers.check(text("hires sampler", self.hires_sampler), self.schedule)
        for name, label in (("hires_prompt", "hires prompt"), ("hires_negative_prompt", "hires negative prompt")):
            check_prompt_limits(text(label, getattr(self, name)), label, limits)
        width, height = self.hires_pass().width, self.hires_pass().height
        if max(width, height) > 2048:
            raise ValueError(f"hires fix to {width}x{height} is over 2048 px a side; use a smaller scale")

    def hires_pass(self) -> hires.HiresPass | None:
        """The hires fix's second pass (its target size on the 8-px grid), or None when the fix is off."""
        if not self.hires_fix:
            return None
        width, height = hires.target_size(self.width, self.height, float(self.hires_scale), int(self.hires_width),
                                          int(self.hires_height))
        return hires.HiresPass(width, height, self.hires_upscaler, int(self.hires_steps),
                               float(self.hires_denoising), self.hires_sampler or None, self.schedule,
                               self.hires_prompt, self.hires_negative_prompt)

    def _validate_inpaint(self) -> None:
        self.outpaint = masking.parse_outpaint(self.outpaint)
        if self.mask is None and not self.outpaint:
            return
        what = "a mask" if self.mask is not None else "outpainting"
        if self.init_image is None:
            raise ValueError(f"{what} needs an init image: the picture to paint into")
        if self.mask is not None and self.outpaint:
            raise ValueError("a job either inpaints with a mask or outpaints, not both: outpaint first, then inpaint "
                             "the result")
        if self.mask is not None:
            if not isinstance(self.mask, (str, os.PathLike, Image.Image)):
                raise ValueError(f"mask must be an image file's path or an image, got {type(self.mask).__name__}")
            if isinstance(self.mask, (str, os.PathLike)) and not Path(self.mask).is_file():
                raise ValueError(f"mask {Path(self.mask).name!r} does not exist")
        self.mask_blur = whole_number("mask blur", self.mask_blur, 0, 64)
        self.inpaint_padding = whole_number("only masked padding", self.inpaint_padding, 0, 256)
        for label, value, choices in (("mask mode", self.mask_mode, masking.MASK_MODES),
                                      ("masked content", self.masked_content, masking.MASKED_CONTENT),
                                      ("inpaint area", self.inpaint_area, masking.INPAINT_AREAS)):
            if text(label, value) not in choices:
                raise ValueError(f"{label} must be one of {', '.join(choices)}, got {value!r}")
        width, height = self.frame_size()
        if max(width, height) > 2048:
            raise ValueError(f"outpainting {self.width}x{self.height} to {width}x{height} is over 2048 px a side; "
                             "add less")

    @property
    def is_inpaint(self) -> bool:
        return self.init_image is not None and (self.mask is not None or bool(self.outpaint))

    def frame_size(self) -> tuple[int, int]:
        """(width, height) of the generation: the job's size, plus what outpainting adds."""
        pads = masking.parse_outpaint(self.outpaint) if self.outpaint else {}
        return (self.width + pads.get("left", 0) + pads.get("right", 0),
                self.height + pads.get("top", 0) + pads.get("bottom", 0))

    def inpaint_plan(self) -> masking.InpaintPlan | None:
        """The inpainting (or outpainting) set-up of this job, from its checked init image and mask; None when the
        job has neither. Raises ValueError for an unreadable or oversized mask."""
        if not self.is_inpaint:
            return None
        if self.outpaint:
            canvas, mask = masking.outpaint_canvas(self.init_picture(), self.outpaint,
                                                   overlap=max(8, 2 * self.mask_blur))
            width, height = canvas.size
            return masking.plan_inpaint(canvas, mask, width, height, "Just resize", self.mask_blur,
                                        "Inpaint masked", "original", "Whole picture")
        image = load_init_image(self.init_image)
        return masking.plan_inpaint(image, load_mask(self.mask), self.width, self.height, self.resize_mode,
                                    self.mask_blur, self.mask_mode, self.masked_content, self.inpaint_area,
                                    self.inpaint_padding)


    @property
    def is_img2img(self) -> bool:
        return self.init_image is not None

    def denoise_steps(self) -> int:
        """The steps that run: all of them for text to image; steps x strength (rounded down) for image to image,
        as diffusers' img2img pipelines and A1111's default "img2img steps" setting count them."""
        if not self.is_img2img or self.denoising_strength >= 1:
            return self.steps
        return min(int(self.steps * self.denoising_strength), self.steps)

    def init_picture(self) -> Image.Image:
        """The init image as upright RGB, fitted to width x height by `resize_mode`. A file is checked (size on disk,
        format, pixel count) before it is decoded; a refused one raises ValueError saying why."""
        return resize_image(load_init_image(self.init_image), self.resize_mode, self.width, self.height)


def load_mask(value: str | os.PathLike | Image.Image) -> Image.Image:
    """A mask picture in its own mode (alpha kept: a painted layer is a mask), checked before decoding like an init
    image, EXIF rotation applied."""
    from PIL import ImageOps

    if isinstance(value, Image.Image):
        image = value
    else:
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"mask {path.name!r} does not exist")
        try:
            image = open_checked(Source(path.name, path), MAX_INIT_PIXELS, MAX_INIT_BYTES)
        except SkipImage as e:
            raise ValueError(f"mask {path.name}: {e}") from None
    if image.width * image.height > MAX_INIT_PIXELS:
        raise ValueError(f"mask of {image.width}x{image.height} is over the limit of {MAX_INIT_PIXELS / 1e6:.0f} "
                         "megapixels")
    return ImageOps.exif_transpose(image)


def load_init_image(value: str | os.PathLike | Image.Image) -> Image.Image:
    """An init image as upright RGB through studio.files.images (a file's header is checked before decoding)."""
    if isinstance(value, Image.Image):
        if value.width * value.height > MAX_INIT_PIXELS:
            raise ValueError(f"init image of {value.width}x{value.height} is over the limit of "
                             f"{MAX_INIT_PIXELS / 1e6:.0f} megapixels")
        return to_rgb(value, [])
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"init image {path.name!r} does not exist")
    try:
        return load_image(Source(path.name, path), min_side=8, max_pixels=MAX_INIT_PIXELS,
                          max_bytes=MAX_INIT_BYTES).image
    except SkipImage as e:
        raise ValueError(f"init image {path.name}: {e}") from None


def resize_image(image: Image.Image, mode: str, width: int, height: int) -> Image.Image:
    """A1111's img2img resize (modules/images.py resize_image, Lanczos): "Just resize" stretches to the size; "Crop
    and resize" scales to cover it and crops the centre; "Resize and fill" scales to fit inside it and fills the
    rest by stretching the image's edge rows or columns outwards."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    lanczos = Image.Resampling.LANCZOS
    if mode == "Just resize" or image.size == (width, height):
        return image.resize((width, height), resample=lanczos)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == "Crop and resize":
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
    else:
        src_w = width if ratio < src_ratio else image.width * height // image.height
        src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=lanczos)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == "Resize and fill":
        if ratio < src_ratio:  # wider than the frame: bands above and below
            fill = height // 2 - src_h // 2
            if fill > 0:
                out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
                out.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                          box=(0, fill + src_h))
        elif ratio > src_ratio:  # taller: bands left and right
            fill = width // 2 - src_w // 2
            if fill > 0:
                out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
                out.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                          box=(fill + src_w, 0))
    return out


def work(images: int, steps: int, width: int, height: int) -> float:
    """The cost measure of Limits.max_work: images x steps x megapixels."""
    return images * steps * width * height / 1e6


def describe_work(images: int, steps: int, width: int, height: int) -> str:
    return (f"{images:,} image{'s' if images != 1 else ''} x {steps} steps x {width}x{height} px is "
            f"{work(images, steps, width, height):,.0f} step-megapixels of work")


def resolve_seed(seed: int) -> int:
    return random.randint(0, MAX_SEED) if seed == -1 else seed
