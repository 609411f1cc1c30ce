"""Generating storyboard shots: each candidate a Generate image of the shot's prompt, following the shot's
reference through the ControlNet when it has one; frames and the project are saved as they finish."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from pathlib import Path

from studio.config import LimitExceeded
from studio.control.controlnet import ControlNetLoader
from studio.control.preprocess import canny_map, fit_to_frame, read_reference
from studio.files.atomic import atomic_dir
from studio.generation.denoise import Control, denoise, pass_noise_is_shared
from studio.generation.generate import Generator, build_infotext
from studio.generation.infotext import format_infotext, parse_infotext, png_info
from studio.generation.job import MAX_SEED, describe_work, work
from studio.generation.oom import generation_advice, run_with_advice
from studio.models import speed
from studio.models.manager import ModelManager
from studio.storyboard.board import PER_PASS, Frame, ProgressFn, Shot, Storyboard, StoryboardStore


@dataclass
class ShotResult:
    shot: str
    frames: list[Frame]
    controlnet: bool
    canny: Path | None = None


@dataclass
class StoryboardResult:
    board: Storyboard
    shots: list[ShotResult] = field(default_factory=list)
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

    def control_image(self, board: Storyboard, shot: Shot) -> tuple:
        """(reference fitted to the frame, its canny map) for a shot with a reference."""
        s = board.settings
        ref = read_reference(self.store.reference_path(board, shot))
        fitted = fit_to_frame(ref.image, s.width, s.height)
        return fitted, canny_map(fitted, shot.canny_low, shot.canny_high)

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
        limits.check("max_work", work(images, st.steps, st.width, st.height),
                     f"{len(chosen):,} shots: {describe_work(images, st.steps, st.width, st.height)}")
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
            # 2. the ControlNet for this model, before any denoising: a missing one fails now, not after half the board
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
                            result.notes),
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

    def board_steps(self, board: Storyboard, shot: Shot) -> int:
        n = board.candidates_of(shot)
        per_pass = 1 if pass_noise_is_shared(board.settings.sampler) else self.per_pass
        return board.settings.steps * -(-n // per_pass)

    def _run_shot(self, board, shot, model, model_hash, controlnet, label, done, total, on_progress, cancel, rng,
                  notes) -> tuple[ShotResult | None, int]:
        s = board.settings
        n = board.candidates_of(shot)
        seeds = shot_seeds(shot, n, rng)
        # 3. the shot's prompt, encoded as Generate encodes it (this applies its LoRAs)
        job = s.job(board.prompt(shot), seeds[0])
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
                out = denoise(model.pipe, items, s.sampler, s.schedule, s.steps, s.width, s.height, on_step=on_step,
                              cancel=cancel, control=control)
                if out.interrupted:
                    raise _Stopped()  # leaves the old folder in place (atomic_dir drops tmp)
                done += s.steps
                for k, (image, seed) in enumerate(zip(out.images, pass_seeds, strict=True), start=start):
                    info = build_infotext(s.job(job.prompt, seed), seed, model, model_hash, nets)
                    if extra:
                        info = add_fields(info, extra)
                    name = f"{k:02d}-{seed}.png"
                    image.save(tmp / name, format="PNG", pnginfo=png_info(info))
                    frames.append(Frame(seed, f"shots/{shot.shot}/{name}", control is not None))
            if canny is not None:
                canny.save(tmp / "canny.png", format="PNG")
        shot.frames = frames
        shot.picked = 0
        return ShotResult(shot.shot, frames, control is not None,
                          folder / "canny.png" if canny is not None else None), done


class _Stopped(Exception):
    """Stop during a shot: its unfinished candidates are dropped."""
