"""Generating storyboard shots: each candidate a Generate image of the shot's prompt, following the shot's
reference through the ControlNet when it has one and its characters' reference pictures through their IP-Adapters
(the board's cast); frames and the project are saved as they finish."""

from __future__ import annotations

import random
import threading
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from studio.config import LimitExceeded, whole_number
from studio.control.controlnet import ControlNetLoader
from studio.control.preprocess import canny_map, fit_to_frame, read_reference
from studio.files.atomic import atomic_dir, atomic_path
from studio.files.names import safe_child
from studio.generation import ip_adapter, masking
from studio.generation.denoise import Control, denoise, encode_init, pass_noise_is_shared
from studio.generation.generate import Generator, build_infotext
from studio.generation.infotext import format_infotext, parse_infotext, png_info
from studio.generation.job import MAX_SEED, GenerateJob, describe_work, load_mask, resolve_seed, work
from studio.generation.oom import generation_advice, run_with_advice
from studio.models import speed
from studio.models.manager import ModelManager
from studio.storyboard.board import (
    PER_PASS,
    Character,
    Frame,
    ProgressFn,
    Refinement,
    Shot,
    Storyboard,
    StoryboardStore,
)


@dataclass
class ShotResult:
    shot: str
    frames: list[Frame]
    controlnet: bool
    canny: Path | None = None
    characters: list[str] = field(default_factory=list)  # the cast members drawn from their pictures


@dataclass
class CastPlan:
    """A shot's characters as a job takes them: an IP-Adapter unit per character with pictures (at most
    ip_adapter.MAX_ADAPTERS) and those units' pictures, read (checked) before any model work."""

    characters: list[Character] = field(default_factory=list)  # all the shot's characters (their prompt words)
    units: list[ip_adapter.IPAdapterUnit] = field(default_factory=list)
    pictures: list[list[Image.Image]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # the characters of `units`, in order


@dataclass
class StoryboardResult:
    board: Storyboard
    shots: list[ShotResult] = field(default_factory=list)
    interrupted: bool = False
    message: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class RefineResult:
    """A candidate made from another (Refine frame, Outpaint to the board's aspect): the new frame (None when
    stopped: nothing is kept), its index in the shot's frames, and what the user should know."""

    board: Storyboard
    shot: str
    frame: Frame | None
    index: int | None
    interrupted: bool = False
    message: str = ""
    notes: list[str] = field(default_factory=list)


def controlnet_fields(name: str, hash_: str, shot: Shot, width: int, height: int) -> dict:
    """The ControlNet unit in a frame's infotext, as sd-webui-controlnet writes it (one quoted field)."""
    model = f"{name} [{hash_}]" if hash_ else name
    unit = (f"Module: canny, Model: {model}, Weight: {shot.control_scale:g}, Resize Mode: Crop and Resize, "
            f"Processor Res: {min(width, height)}, Threshold A: {shot.canny_low}, Threshold B: {shot.canny_high}, "
            f"Guidance Start: {shot.control_start:g}, Guidance End: {shot.control_end:g}, Control Mode: Balanced")
    return {"ControlNet 0": unit}


def add_fields(infotext: str, extra: dict) -> str:
    """`infotext` with `extra` pairs put before its Version (so A1111 and PNG info read them)."""
    params = parse_infotext(infotext)
    prompt, negative = params.pop("prompt"), params.pop("negative_prompt")
    version = params.pop("Version", None)
    return format_infotext(prompt, negative, {**params, **extra, "Version": version})


def shot_seeds(shot: Shot, n: int, rng: random.Random | None = None) -> list[int]:
    """The candidates' seeds: the locked seed and the next ones, or a fresh random run of n seeds."""
    if shot.seed >= 0:
        if shot.seed + n - 1 > MAX_SEED:
            raise ValueError(f"shot {shot.shot}: seed {shot.seed} + {n} candidates passes the largest seed {MAX_SEED}")
        base = shot.seed
    else:
        base = (rng or random).randint(0, MAX_SEED - n + 1)
    return [base + i for i in range(n)]


class StoryboardRunner:
    """Generates storyboard shots on the manager's current model with the generator's prompt encoding."""

    def __init__(self, manager: ModelManager, store: StoryboardStore, controlnet_dir: Path,
                 generator: Generator | None = None, allow_paths: bool = False):
        self.manager = manager
        self.store = store
        self.generator = generator or Generator(manager)
        self.controlnets = ControlNetLoader(controlnet_dir, manager.cfg.cache_dir, manager.cfg.assets_dir)
        self.allow_paths = allow_paths  # ControlNet given as a path (command line only)
        self.per_pass = PER_PASS

    def control_image(self, board: Storyboard, shot: Shot, size: tuple[int, int] | None = None) -> tuple:
        """(reference fitted to the frame, its canny map) for a shot with a reference; `size` (default: the board's
        width x height) is the frame's."""
        s = board.settings
        width, height = size or (s.width, s.height)
        ref = read_reference(self.store.reference_path(board, shot))
        fitted = fit_to_frame(ref.image, width, height)
        return fitted, canny_map(fitted, shot.canny_low, shot.canny_high)

    def check_hires_upscaler(self, board: Storyboard) -> None:
        """A board hires fix through a pixel upscaler: the name must resolve (a file in upscalers/) before any
        denoising, as Generate checks it."""
        second = board.settings.job("", 0).hires_pass()
        if second is not None and not second.in_latent_space:
            from studio.upscale.library import resolve_upscaler

            resolve_upscaler(second.upscaler, self.manager.cfg.upscalers_dir)

    # the cast: characters' reference pictures through IP-Adapters ------------------------------------------------

    @property
    def ipadapter_dir(self) -> Path:
        return self.generator.ip_adapters.folder or self.manager.cfg.ipadapter_dir

    def adapter_for(self, character: Character) -> str:
        return cast_adapter(character, self.ipadapter_dir)

    def cast_plan(self, board: Storyboard, shot: Shot, pictures: dict | None = None,
                  notes: list[str] | None = None) -> CastPlan:
        """The shot's characters as IP-Adapter units, their adapters found and their pictures read (checked before
        decoding; `pictures` keeps them by character across shots). A character without pictures adds only their
        prompt words; beyond ip_adapter.MAX_ADAPTERS the first ones get units (`notes` says so)."""
        pictures = {} if pictures is None else pictures
        notes = [] if notes is None else notes
        plan = CastPlan(board.shot_cast(shot))
        with_pictures = [c for c in plan.characters if c.pictures]
        for c in plan.characters:
            if not c.pictures:
                note = (f"character {c.name} has no reference pictures: only their prompt words are used (add "
                        "pictures under Cast)")
                if note not in notes:
                    notes.append(note)
        limit = ip_adapter.MAX_ADAPTERS
        if len(with_pictures) > limit:
            notes.append(f"shot {shot.shot}: {len(with_pictures)} characters with pictures "
                         f"({', '.join(c.name for c in with_pictures)}); at most {limit} IP-Adapters at once, so "
                         f"{', '.join(c.name for c in with_pictures[limit:])} only by their prompt words")
            with_pictures = with_pictures[:limit]
        for c in with_pictures:
            name = self.adapter_for(c)
            paths = self.store.character_pictures(board, c)
            if c.name not in pictures:
                try:
                    pictures[c.name] = ip_adapter.IPAdapterUnit(name, [str(p) for p in paths]).pictures()
                except ValueError as e:
                    raise ValueError(f"cast: character {c.name!r}: {e}") from None
            plan.units.append(ip_adapter.IPAdapterUnit(name, [str(p) for p in paths], c.scale))
            plan.pictures.append(pictures[c.name])
            plan.names.append(c.name)
        try:
            ip_adapter.check_units(plan.units)
        except ValueError as e:
            raise ValueError(f"shot {shot.shot}: {e}") from None
        return plan

    def check_adapters(self, plans: list[CastPlan], unet) -> None:
        """Every adapter the plans use opened against the loaded UNet (its family, layers and image encoder),
        before any shot runs; an error names the characters."""
        seen = {}
        for plan in plans:
            for unit, name in zip(plan.units, plan.names, strict=True):
                seen.setdefault(unit.name, []).append(name)
        for adapter, names in seen.items():
            try:
                self.generator.ip_adapters.open(adapter, unet)
            except ip_adapter.IPAdapterError as e:
                who = ", ".join(dict.fromkeys(names))
                raise ip_adapter.IPAdapterError(f"cast: character {who}: {e}") from None

    def run(self, board: Storyboard, shots: list[str] | None = None, only_missing: bool = False,
            on_progress: ProgressFn | None = None, cancel: threading.Event | None = None,
            rng: random.Random | None = None) -> StoryboardResult:
        """Generate the candidates of `shots` (all when None; with `only_missing`, those without frames). Every
        other shot's files stay as they are. The project is saved after each shot, so Stop keeps finished ones."""
        # 1. validate the board and pick the shots; the work of the chosen ones within max_work
        limits = self.manager.cfg.limits
        board.validate(limits)
        chosen = [board.shot(n) for n in shots] if shots is not None else list(board.shots)
        if only_missing:
            chosen = [s for s in chosen if not s.frames]
        images = sum(board.candidates_of(shot) for shot in chosen)
        st = board.settings
        cost, what = work(images, st.steps, st.width, st.height), describe_work(images, st.steps, st.width, st.height)
        second = st.job("", 0).hires_pass()
        if second is not None:
            steps = second.steps or st.steps
            cost += work(images, steps, second.width, second.height)
            what += f", plus {describe_work(images, steps, second.width, second.height)} for the hires fix"
        limits.check("max_work", cost, f"{len(chosen):,} shots: {what}")
        self.check_hires_upscaler(board)
        if self.manager.current is None:
            raise RuntimeError("no model is loaded; load one first")
        for shot in chosen:
            board.prompt(shot)
            if shot.reference:
                self.store.reference_path(board, shot)
        result = StoryboardResult(board)
        if not chosen:
            result.message = "nothing to generate"
            return result
        # the cast: each shot's characters' adapters (file and image encoder) and pictures, before any shot runs
        pictures: dict[str, list] = {}
        plans = {shot.shot: self.cast_plan(board, shot, pictures, result.notes) for shot in chosen}
        s = board.settings
        total = sum(self.board_steps(board, shot) for shot in chosen)
        done = 0
        with self.manager.lock:
            # the model is taken under the lock (a model switch waits for it): every shot runs on this one
            model = self.manager.current
            if model is None:
                raise RuntimeError("no model is loaded; load one first")
            # every chosen shot's prompt within max_prompt_chunks (the tokenizer only), before any model work
            for shot in chosen:
                try:
                    self.generator.check_chunks(s.job(board.prompt(shot), 0), model)
                except LimitExceeded as e:
                    raise LimitExceeded(e.name, e.limit, f"shot {shot.shot}: {e.what}") from None
            # 2. the IP-Adapters and the ControlNet for this model, before any denoising: a missing or unfitting one
            # fails now, not after half the board
            self.check_adapters(list(plans.values()), model.pipe.unet)
            controlnet = None
            if any(shot.reference for shot in chosen):
                controlnet = self.controlnets.load(s.controlnet, model.pipe._execution_device, model.pipe.unet.dtype,
                                                   model.pipe.unet.config.cross_attention_dim, self.allow_paths,
                                                   compile_as=speed.compiled_as(model.pipe.unet), xl=model.is_xl)
            model_hash = self.manager.model_hash(model)
            board.model = model.name
            for number, shot in enumerate(chosen, start=1):
                if cancel is not None and cancel.is_set():
                    result.interrupted = True
                    break
                label = f"shot {shot.shot} ({number}/{len(chosen)})"
                n = board.candidates_of(shot)
                per_pass = 1 if pass_noise_is_shared(s.sampler) else self.per_pass
                try:
                    # out of GPU memory: freed, and a message with what to change (studio.oom)
                    shot_result, done = run_with_advice(
                        lambda shot=shot, label=label, done=done: self._run_shot(
                            board, shot, model, model_hash, controlnet, label, done, total, on_progress, cancel, rng,
                            result.notes, plans[shot.shot]),
                        f"shot {shot.shot}", lambda n=n, per_pass=per_pass: generation_advice(
                            min(n, per_pass), s.width, s.height, self.manager.memory, "number of candidates",
                            f"a shot's candidates are denoised up to {per_pass} at a time"))
                except _Stopped:
                    result.interrupted = True
                    break
                result.shots.append(shot_result)
                self.store.save(board)
        if result.interrupted:
            result.message = (f"stopped: {len(result.shots)} of {len(chosen)} shots done; the shot that was running "
                              "keeps its earlier candidates")
        return result

    # candidates made from candidates: Refine frame, Outpaint to the board's aspect ---------------------------

    def source_frame(self, board: Storyboard, shot_number: str, index: int | None = None) -> tuple:
        """(shot, index, frame, its file's path) of the candidate to work from: `index`, or the picked one."""
        shot = board.shot(shot_number)
        if not shot.frames:
            raise ValueError(f"shot {shot.shot} has no candidates yet; generate it first")
        k = shot.picked if index is None else whole_number(f"shot {shot.shot}: candidate", index, 0,
                                                             len(shot.frames) - 1)
        frame = shot.frames[k]
        path = safe_child(self.store.path(board.name), frame.file)
        if not path.is_file():
            raise ValueError(f"shot {shot.shot}: candidate #{k}'s file {frame.file} is missing; generate the shot "
                             "again")
        return shot, k, frame, path

    def refine(self, board: Storyboard, shot_number: str, strength: float = 0.5, mask=None, description: str = "",
               seed: int | None = None, index: int | None = None, mask_blur: int = 4,
               masked_content: str = "original", inpaint_area: str = "Whole picture",
               on_progress: ProgressFn | None = None, cancel: threading.Event | None = None) -> RefineResult:
        """Image to image (or, with `mask`: a path or picture, white or painted = redraw, inpainting) of a candidate
        (`index`, default the picked one) at its own size: Generate's job with the board's settings, the shot's
        prompt (its description replaced by `description` when given; the type's template, LoRA and the board's
        style stay), the candidate's seed (`seed` None; -1: a random one) and the shot's ControlNet when it has a
        reference. The result is added as a new candidate (the others stay) and recorded in the shot's history."""
        shot, k, frame, path = self.source_frame(board, shot_number, index)
        # the shot's characters stay (their prompt words and pictures) when the description is replaced
        prompt = board.prompt(replace(shot, description=description) if (description or "").strip() else shot,
                              board.shot_cast(shot))
        job = self._frame_job(board, prompt, frame, path, seed)
        job.denoising_strength = strength
        job.mask = mask
        job.mask_blur, job.masked_content, job.inpaint_area = mask_blur, masked_content, inpaint_area
        action = "inpaint" if mask is not None else "img2img"
        return self._derive(board, shot, k, frame, job, action, True, on_progress, cancel)

    def outpaint(self, board: Storyboard, shot_number: str, strength: float = 1.0, seed: int | None = None,
                 index: int | None = None, mask_blur: int = 4, on_progress: ProgressFn | None = None,
                 cancel: threading.Event | None = None) -> RefineResult:
        """A candidate extended to the board's aspect (BoardSettings.aspect_ratio): even bands added left and right
        (or top and bottom) by masking.pads_for_aspect, drawn by Generate's outpainting with the shot's prompt and
        the candidate's seed; the candidate's pixels are kept away from the seam. Runs without the ControlNet (the
        reference is fitted to the frame, not to the wider canvas). A new candidate, recorded in the history."""
        shot, k, frame, path = self.source_frame(board, shot_number, index)
        with Image.open(path) as im:
            width, height = im.size
        aspect = board.settings.aspect_ratio()
        pads = masking.pads_for_aspect(width, height, aspect)
        if not pads:
            raise ValueError(f"shot {shot.shot}: candidate #{k} ({width}x{height}) already has the board's aspect "
                             f"({board.settings.aspect or f'{board.settings.width}:{board.settings.height}'}); set "
                             "the board's aspect (e.g. 16:9) under the generation settings")
        job = self._frame_job(board, board.prompt(shot), frame, path, seed, (width, height))
        job.outpaint, job.denoising_strength, job.mask_blur = pads, strength, mask_blur
        result = self._derive(board, shot, k, frame, job, "outpaint", False, on_progress, cancel)
        if shot.reference:
            result.notes.append(f"shot {shot.shot}: outpainting runs without the ControlNet (its reference is fitted "
                                "to the frame, not to the wider canvas)")
        return result

    def _frame_job(self, board: Storyboard, prompt: str, frame: Frame, path: Path, seed: int | None,
                   size: tuple[int, int] | None = None) -> GenerateJob:
        """Generate's image-to-image job on a candidate's file at its own size (no hires fix)."""
        if size is None:
            with Image.open(path) as im:
                size = im.size
        seed = frame.seed if seed is None else resolve_seed(whole_number("seed", seed, -1, MAX_SEED))
        job = board.settings.job(prompt, seed, hires_fix=False)
        job.width, job.height = size
        job.init_image = path
        return job

    def _derive(self, board: Storyboard, shot: Shot, k: int, source: Frame, job: GenerateJob, action: str,
                use_control: bool, on_progress: ProgressFn | None,
                cancel: threading.Event | None) -> RefineResult:
        limits = self.manager.cfg.limits
        board.validate(limits)
        notes: list[str] = []
        plan = self.cast_plan(board, shot, notes=notes)  # the shot's characters, as its generated frames have them
        job.ip_adapters = list(plan.units)
        job.validate(limits)
        n = len(shot.frames) + 1
        limits.check("max_storyboard_candidates", n, f"shot {shot.shot} would have {n:,} candidates")
        if self.manager.current is None:
            raise RuntimeError("no model is loaded; load one first")
        if use_control and shot.reference:
            self.store.reference_path(board, shot)
        # the init, mask and the picture the sampler sees, read before any model work (as Generate does)
        inpaint_plan = job.inpaint_plan()
        init = inpaint_plan.picture if inpaint_plan is not None else job.init_picture()
        mask = masking.binary_mask(load_mask(job.mask)) if job.mask is not None else None
        width, height = job.frame_size()
        result = run_with_advice(
            lambda: self._derive_locked(board, shot, k, source, job, action, use_control, inpaint_plan, init, mask,
                                        on_progress, cancel, plan),
            f"shot {shot.shot}", lambda: generation_advice(1, width, height, self.manager.memory))
        result.notes = notes + [note for note in result.notes if note not in notes]
        return result

    def _derive_locked(self, board, shot, k, source, job, action, use_control, plan, init, mask, on_progress,
                       cancel, cast: CastPlan) -> RefineResult:
        result = RefineResult(board, shot.shot, None, None)
        width, height = job.frame_size()
        with self.manager.lock, ExitStack() as adapters:  # `adapters`: the cast's IP-Adapters, off at the end
            model = self.manager.current
            if model is None:
                raise RuntimeError("no model is loaded; load one first")
            pipe = model.pipe
            try:
                self.generator.check_chunks(job, model)
            except LimitExceeded as e:
                raise LimitExceeded(e.name, e.limit, f"shot {shot.shot}: {e.what}") from None
            controlnet = None
            if use_control and shot.reference:
                controlnet = self.controlnets.load(board.settings.controlnet, pipe._execution_device, pipe.unet.dtype,
                                                   pipe.unet.config.cross_attention_dim, self.allow_paths,
                                                   compile_as=speed.compiled_as(pipe.unet), xl=model.is_xl)
            self.check_adapters([cast], pipe.unet)
            model_hash = self.manager.model_hash(model)
            # the shot's prompt encoded as Generate encodes it (this applies its LoRAs)
            cond, uncond, nets = self.generator.encode(job, model)
            result.notes += [note for note in nets.notes if note not in result.notes]
            control, extra = None, {}
            if controlnet is not None:
                # the ControlNet steers the image-to-image steps too (denoise takes both): the reference's canny
                # map fitted to this frame's size
                from diffusers.image_processor import VaeImageProcessor

                _, canny = self.control_image(board, shot, (width, height))
                processor = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor, do_convert_rgb=True,
                                              do_normalize=False)
                c = shot.control()
                control = Control(controlnet.model, processor.preprocess(canny, height=height, width=width), c.scale,
                                  c.start, c.end)
                extra = controlnet_fields(controlnet.name, controlnet.hash, shot, width, height)
            # the shot's characters: their pictures encoded once, their adapters on the UNet for this frame only
            image_prompts = None
            if cast.units:
                ip_loaded, image_prompts = self.generator.ip_adapters.prompts(cast.units, pipe, cast.pictures)
                adapters.enter_context(ip_adapter.adapters_on(pipe, ip_loaded))
                extra = {**extra, **ip_adapter.infotext_fields(cast.units, ip_loaded)}
            init_latents = encode_init(pipe, init)
            inpaint = self.generator.inpaint_for(job, pipe, plan, width, height)
            steps = job.denoise_steps()
            what = f"shot {shot.shot}: {action} of candidate #{k}"

            def on_step(i, count):
                if on_progress:
                    step = -(-i * steps // count)
                    on_progress(step, steps, f"{what}, step {step}/{steps}")

            note = speed.compile_note(pipe.unet, (1, width, height, control is not None))
            if note and on_progress:
                on_progress(0, steps, f"{what}: {note}")
            out = denoise(pipe, [nets.item(cond, uncond, job.cfg_scale, job.seed)], job.sampler, job.schedule,
                          job.steps, width, height, on_step=on_step, cancel=cancel, control=control,
                          init_latents=init_latents, strength=job.denoising_strength, inpaint=inpaint,
                          image_prompts=image_prompts)
            if out.interrupted:
                result.interrupted = True
                result.message = f"stopped: shot {shot.shot} keeps its candidates as they were"
                return result
            image = out.images[0]
            if plan is not None:  # the original's pixels back outside the mask (A1111's overlay)
                image = plan.finish(image)
            info = build_infotext(job, job.seed, model, model_hash, nets)
            if extra:
                info = add_fields(info, extra)
            # 6. the new candidate beside the others (the shot's folder is not replaced), then the project
            project = self.store.path(board.name)
            rel = self._free_name(project, shot, f"{len(shot.frames):02d}-{job.seed}-{action}")
            with atomic_path(project / rel) as tmp:
                image.save(tmp, format="PNG", pnginfo=png_info(info))
            mask_rel = ""
            if mask is not None:
                mask_rel = rel[: -len(".png")] + "-mask.png"
                with atomic_path(project / mask_rel) as tmp:
                    mask.save(tmp, format="PNG")
            frame = Frame(job.seed, rel, control is not None, action, source.file)
            shot.frames.append(frame)
            shot.history.append(Refinement(action, source.file, rel, job.seed, info, mask_rel))
            board.model = model.name
            self.store.save(board)
        result.frame, result.index = frame, len(shot.frames) - 1
        result.message = (f"shot {shot.shot}: candidate #{result.index} ({image.width}x{image.height}) made by "
                          f"{action} from #{k}")
        return result

    @staticmethod
    def _free_name(project: Path, shot: Shot, stem: str) -> str:
        """shots/<shot>/<stem>.png, or with -2, -3 ... when a file or a frame already has that name."""
        taken = {f.file for f in shot.frames}
        for n in range(1, 1000):
            rel = f"shots/{shot.shot}/{stem}{'' if n == 1 else f'-{n}'}.png"
            if rel not in taken and not (project / rel).exists():
                return rel
        raise ValueError(f"shot {shot.shot}: no free file name for {stem}")

    def board_steps(self, board: Storyboard, shot: Shot) -> int:
        n = board.candidates_of(shot)
        per_pass = 1 if pass_noise_is_shared(board.settings.sampler) else self.per_pass
        return (board.settings.steps + hires_steps(board)) * -(-n // per_pass)

    def _run_shot(self, board, shot, model, model_hash, controlnet, label, done, total, on_progress, cancel, rng,
                  notes, cast: CastPlan | None = None) -> tuple[ShotResult | None, int]:
        cast = cast or CastPlan()
        with ExitStack() as adapters:  # the shot's IP-Adapters, on the UNet for this shot only
            return self._run_shot_with(board, shot, model, model_hash, controlnet, label, done, total, on_progress,
                                       cancel, rng, notes, cast, adapters)

    def _run_shot_with(self, board, shot, model, model_hash, controlnet, label, done, total, on_progress, cancel,
                       rng, notes, cast: CastPlan, adapters: ExitStack) -> tuple[ShotResult | None, int]:
        s = board.settings
        n = board.candidates_of(shot)
        seeds = shot_seeds(shot, n, rng)
        # 3. the shot's prompt, encoded as Generate encodes it (this applies its LoRAs)
        job = s.job(board.prompt(shot, cast.characters), seeds[0])
        job.ip_adapters = list(cast.units)
        cond, uncond, nets = self.generator.encode(job, model)
        for note in nets.notes:
            if note not in notes:
                notes.append(note)
        # 4. the reference's canny map as the ControlNet's conditioning image
        control, canny, extra = None, None, {}
        if shot.reference:
            from diffusers.image_processor import VaeImageProcessor

            _, canny = self.control_image(board, shot)
            processor = VaeImageProcessor(vae_scale_factor=model.pipe.vae_scale_factor, do_convert_rgb=True,
                                          do_normalize=False)
            tensor = processor.preprocess(canny, height=s.height, width=s.width)
            c = shot.control()
            control = Control(controlnet.model, tensor, c.scale, c.start, c.end)
            extra = controlnet_fields(controlnet.name, controlnet.hash, shot, s.width, s.height)
        # the shot's characters: their pictures encoded once, their IP-Adapters on the UNet (Generate's fields)
        image_prompts = None
        if cast.units:
            ip_loaded, image_prompts = self.generator.ip_adapters.prompts(cast.units, model.pipe, cast.pictures)
            adapters.enter_context(ip_adapter.adapters_on(model.pipe, ip_loaded))
            extra.update(ip_adapter.infotext_fields(cast.units, ip_loaded))
        # 5. denoise the candidates in passes and write them into a fresh shot folder, swapped in at the end
        folder = self.store.path(board.name) / "shots" / shot.shot
        per_pass = 1 if pass_noise_is_shared(s.sampler) else self.per_pass
        frames = []
        with atomic_dir(folder) as tmp:
            for start in range(0, n, per_pass):
                pass_seeds = seeds[start : start + per_pass]
                items = [nets.item(cond, uncond, s.cfg_scale, seed) for seed in pass_seeds]

                what = f"{label}, candidates {start + 1}-{start + len(items)} of {n}"

                def on_step(i, count, done=done, what=what):
                    if on_progress:
                        step = -(-i * s.steps // count)
                        on_progress(done + step, total, f"{what}, step {step}/{s.steps}")

                note = speed.compile_note(model.pipe.unet, (len(items), s.width, s.height, control is not None))
                if note and on_progress:
                    on_progress(done, total, f"{what}: {note}")
                second = job.hires_pass()
                out = denoise(model.pipe, items, s.sampler, s.schedule, s.steps, s.width, s.height, on_step=on_step,
                              cancel=cancel, control=control,
                              inpaint=self.generator.inpaint_for(job, model.pipe, None, s.width, s.height),
                              decode=second is None or not second.in_latent_space, image_prompts=image_prompts)
                if out.interrupted:
                    raise _Stopped()  # leaves the old folder in place (atomic_dir drops tmp)
                done += s.steps
                if second is not None:
                    # the board's hires fix: Generate's second pass (image to image at the larger size, without
                    # the ControlNet: Generator.run_hires_pass takes none), on the same prompts
                    extra_steps = hires_steps(board)

                    def on_hires(i, count, done=done, what=what, extra_steps=extra_steps):
                        if on_progress:
                            step = -(-i * extra_steps // count)
                            on_progress(done + step, total, f"{what}, hires fix step {step}/{extra_steps}")

                    hnets = self.generator.hires_prompts(job, model, nets, cond, uncond)
                    hitems = [hnets.item(hnets.cond, hnets.uncond, s.cfg_scale, seed) for seed in pass_seeds]
                    out = self.generator.run_hires_pass(job, model.pipe, second, out, hitems, on_hires, cancel,
                                                        image_prompts=image_prompts)
                    if out.interrupted:
                        raise _Stopped()
                    done += extra_steps
                for k, (image, seed) in enumerate(zip(out.images, pass_seeds, strict=True), start=start):
                    info = build_infotext(s.job(job.prompt, seed), seed, model, model_hash, nets)
                    if extra:
                        info = add_fields(info, extra)
                    name = f"{k:02d}-{seed}.png"
                    image.save(tmp / name, format="PNG", pnginfo=png_info(info))
                    frames.append(Frame(seed, f"shots/{shot.shot}/{name}", control is not None))
            if canny is not None:
                canny.save(tmp / "canny.png", format="PNG")
        if control is not None and job.hires_pass() is not None:
            note = ("the hires fix's second pass runs without the ControlNet (the first pass follows the reference; "
                    "Generate's hires pass takes no ControlNet)")
            if note not in notes:
                notes.append(note)
        shot.frames = frames
        shot.picked = 0
        return ShotResult(shot.shot, frames, control is not None,
                          folder / "canny.png" if canny is not None else None, list(cast.names)), done


def cast_adapter(character: Character, folder: Path) -> str:
    """The character's IP-Adapter file name: their own, or (when they name none) the only one in `folder`
    (ipadapter/). The file and its image encoder must be there: else IPAdapterError naming the character and the
    folder (the command line checks this before it loads a model)."""
    folder = Path(folder)
    name = character.ip_adapter.strip()
    where = f"cast: character {character.name!r}"
    if not name:
        found = ip_adapter.list_ip_adapters(folder)
        if len(found) != 1:
            raise ip_adapter.IPAdapterError(
                f"{where} has reference pictures but no IP-Adapter, and {folder} has "
                + (f"several ({', '.join(found)}): pick one for them under Cast" if found else
                   "none: put an IP-Adapter file there (e.g. ip-adapter_sd15.safetensors from h94/IP-Adapter's "
                   f"models/) with its image encoder folder in {folder / ip_adapter.ENCODER_FOLDER}"))
        name = found[0]
    try:
        path = ip_adapter.resolve_ip_adapter(name, folder)
    except (ip_adapter.IPAdapterError, ValueError) as e:
        raise ip_adapter.IPAdapterError(f"{where}: {e}") from None
    if ip_adapter.find_image_encoder(path, folder) is None:
        raise ip_adapter.IPAdapterError(
            f"{where}: IP-Adapter {name} needs its CLIP image encoder, which is not in {folder} (it is never "
            f"downloaded): put a transformers CLIPVisionModelWithProjection folder (config.json and weights) at "
            f"{folder / ip_adapter.ENCODER_FOLDER}")
    return name


def hires_steps(board: Storyboard) -> int:
    """The steps the board's hires pass runs (its steps x its denoising strength, as Generate counts them)."""
    second = board.settings.job("", 0).hires_pass()
    if second is None:
        return 0
    steps = second.steps or board.settings.steps
    return min(int(steps * second.denoising_strength), steps)


class _Stopped(Exception):
    """Stop during a shot: its unfinished candidates are dropped."""
