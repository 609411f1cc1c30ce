"""The one training loop for every method (TI, TI-Att, TI-MoE, LoRA, fine-tune) and model family (SD 1.x, 2.x,
SDXL), on accelerate for device, mixed precision and several GPUs: cached VAE latents, deterministic batches
(optionally from aspect-ratio buckets), SDXL's size conditioning per image, DreamBooth class images, Min-SNR and
noise offset, checkpoints and previews in the run folder, resume, Stop, and a NaN/inf guard."""

from __future__ import annotations

import dataclasses
import os
import random
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from studio.config import StudioConfig
from studio.files.networks import save_preview
from studio.generation import samplers
from studio.generation.infotext import format_infotext
from studio.generation.oom import free_memory
from studio.models import speed
from studio.models.manager import ModelManager
from studio.train.data import (
    STREAM_CLASS,
    STREAM_DROPOUT,
    STREAM_VALIDATION,
    TrainData,
    batch_generator,
    batch_indices,
    image_tensor,
    load_train_data,
    resolve_data_dir,
    rng_seed,
    split_validation,
)
from studio.train.job import METHOD_LABELS, TrainJob, check_train_settings
from studio.train.masks import latent_mask, loss_weights, weighted_losses
from studio.train.method import TrainContext, TrainMethod, base_prompt_encoder, text_encoders
from studio.train.run_folder import RunFolder
from studio.train.samples import SamplePrompt

ProgressFn = Callable[[int, int, str], None]
VALIDATION_DRAWS = 4  # noises and timesteps per held-out image at each validation
EventFn = Callable[[str, dict], None]  # ("loss" | "preview" | "checkpoint" | "log" | "run" | "done", details)


@dataclass
class LatentBatch:
    """Latents of one UNet pass with their prompts and SDXL size conditioning (one [6] row per item)."""

    x0: torch.Tensor
    prompts: list[str]
    time_ids: list[list[int]]
    weights: torch.Tensor | None = None  # masked training: per-pixel loss weights [B, 1, h, w] (None: all 1)


def merge_same_shape(parts: list[LatentBatch]) -> list[LatentBatch]:
    """One UNet pass for instance and class examples when their latents have one shape (always without buckets);
    a bucket of another shape than the class images gets a pass of its own."""
    if len(parts) < 2 or any(p.x0.shape[1:] != parts[0].x0.shape[1:] for p in parts):
        return parts
    weights = None
    if any(p.weights is not None for p in parts):
        weights = torch.cat([p.weights if p.weights is not None else p.x0.new_ones((len(p.x0), 1, *p.x0.shape[2:]))
                             for p in parts])
    return [LatentBatch(torch.cat([p.x0 for p in parts]), [q for p in parts for q in p.prompts],
                        [t for p in parts for t in p.time_ids], weights)]


@dataclass
class TrainResult:
    run_dir: Path
    state: str  # "finished", "stopped" or "failed"
    step: int
    message: str
    output: Path | None = None  # the embedding, LoRA or checkpoint written
    losses: list[float] = field(default_factory=list)  # this session's per-step losses

    @property
    def embedding(self) -> Path | None:
        return self.output


class TrainingFailed(RuntimeError):
    """Training had to stop (NaN loss, out of memory); the message says why and what to do."""


def method_class(job: TrainJob) -> type[TrainMethod]:
    if job.is_ti:
        from studio.train.textual_inversion import InversionMethod

        return InversionMethod
    if job.method == "lora":
        from studio.train.lora import LoraMethod

        return LoraMethod
    from studio.train.finetune import FinetuneMethod

    return FinetuneMethod


def make_accelerator(mixed_precision: str, device: str):
    """An Accelerator for this run. In a single process the global accelerate state is reset first, so runs
    with different precision can follow each other in one studio session (under `accelerate launch` it is not)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if mixed_precision == "fp16" and cpu:
        raise ValueError("fp16 mixed precision needs a CUDA GPU; use bf16 or no on the CPU")
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


def check_compile_device(mode: str, device_type: str, backend: str = "inductor") -> None:
    """Compiling the training UNet is CUDA only, as in generation; refused before any model loads. Another
    `backend` than inductor (tests: aot_eager) runs anywhere."""
    if mode != "off" and device_type != "cuda" and backend == "inductor":
        raise ValueError(f"compile {mode!r} (torch.compile of the UNet) needs a CUDA GPU, and this run would be on "
                         f"{device_type}: set compile to off")


def make_optimizer(job: TrainJob, groups, device: torch.device):
    param_groups = [{"params": g.params, "lr": g.rate(1), "name": g.name} for g in groups]
    if job.optimizer == "adamw8bit":
        if device.type != "cuda":
            raise ValueError("8-bit AdamW needs a CUDA GPU (bitsandbytes); use adamw on this device")
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ValueError("8-bit AdamW needs the bitsandbytes package: pip install bitsandbytes") from e
        return bnb.optim.AdamW8bit(param_groups, weight_decay=job.weight_decay)
    if job.optimizer == "prodigy":
        # Prodigy estimates the step size itself; the group's learning rate multiplies it (1 as kohya users set it)
        from prodigyopt import Prodigy

        return Prodigy(param_groups, weight_decay=job.weight_decay, d_coef=job.prodigy_d_coef,
                       safeguard_warmup=job.prodigy_safeguard_warmup,
                       use_bias_correction=job.prodigy_bias_correction)
    if job.optimizer == "adafactor":
        # a fixed learning rate and no parameter scaling: kohya's settings for LoRA and fine-tunes
        from transformers.optimization import Adafactor

        return Adafactor(param_groups, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=job.weight_decay)
    return torch.optim.AdamW(param_groups, weight_decay=job.weight_decay)


def snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon prediction,
    min(SNR, gamma) / (SNR + 1) for v-prediction."""
    alphas = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1 - alphas)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


class Trainer:
    """Runs one TrainJob (new, or resumed from its run folder) to the end, a Stop, or a failure."""

    def __init__(self, cfg: StudioConfig, on_progress: ProgressFn | None = None, on_event: EventFn | None = None,
                 cancel: threading.Event | None = None, compile_backend: str = "inductor"):
        """`compile_backend`: torch.compile's backend for a job with compile on; inductor (CUDA only) unless a
        test runs the compiled path on the CPU with "aot_eager"."""
        self.cfg = cfg
        self.compile_backend = compile_backend
        self.run_folder: RunFolder | None = None
        self.on_progress = on_progress
        self.on_event = on_event or (lambda kind, info: None)
        self.cancel = cancel or threading.Event()
        self.latent_masks: list | None = None  # masked training: per image, [unflipped, flipped] latent masks
        self.validation: list | None = None  # held-out images: (latents [1, C, h, w], TrainImage)

    # --- entry points ---------------------------------------------------------------------------

    def start(self, job: TrainJob) -> TrainResult:
        job.validate(self.cfg.limits)
        method_class(job).check_output(self.cfg, job)
        return self._run(job, None)

    def resume(self, run_dir: Path, max_steps: int | None = None, compile: str | None = None) -> TrainResult:
        """Continue a run from its last checkpoint; `max_steps` trains further, `compile` switches compiling (the
        result does not depend on it)."""
        run = RunFolder.open(run_dir)
        job = run.job()
        check_train_settings(job.to_dict(), str(run.path / "config.yaml"))  # a hand-edited file names the bad key
        job = job.replace(max_steps=max_steps, compile=compile)
        job.validate(self.cfg.limits)
        return self._run(job, run)

    # --- the recipe -----------------------------------------------------------------------------

    def _run(self, job: TrainJob, run: RunFolder | None) -> TrainResult:
        # 1. data (before any model loads: bad input fails fast)
        self._log(f"reading dataset {job.data}")
        data_dir = resolve_data_dir(job.data, self.cfg.datasets_dir)
        data = load_train_data(data_dir, job.resolution, job.repeats, job.flip_p, buckets=bool(job.buckets),
                               rule=job.bucket_rule())
        for name, reason in data.skipped.items():
            self._log(f"skipped {name}: {reason}")
        if job.masked_loss:
            masked = sum(item.mask is not None for item in data.images)
            if not masked:
                raise ValueError("masked training is on, but no image has a mask: put NAME.mask.png beside NAME.png "
                                 "(white where the loss counts) or give the images an alpha channel")
            self._log(f"masked training: {masked} of {len(data.images)} images have a mask (the others count "
                      f"everywhere); outside the masks the loss weighs {job.unmasked_weight:g}")

        # 2. model, device, precision; everything frozen until the method says what trains
        accelerator = make_accelerator(job.mixed_precision, self.cfg.device)
        check_compile_device(job.compile, accelerator.device.type, self.compile_backend)
        self.accelerator = accelerator
        self._log(f"loading {job.model}")
        manager = ModelManager(dataclasses.replace(self.cfg, device="cpu", precision="fp32"))
        model = manager.open(job.model)
        pipe = model.pipe
        self._scheduler_config = dict(pipe.scheduler.config)  # previews swap pipe.scheduler; keep the original
        method_class(job).check_model(pipe, job)
        if job.uses_buckets(model.family, data.dataset_buckets) and not data.bucketed:  # SDXL's, a bucket dataset's
            data = load_train_data(data_dir, job.resolution, job.repeats, job.flip_p, buckets=True,
                                   rule=job.bucket_rule())
        data, held_out = split_validation(data, job.validation_split, job.seed)
        if held_out:
            self._log(f"validation: {len(held_out)} images held out of training ("
                      + ", ".join(item.name for item in held_out[:5]) + (", ..." if len(held_out) > 5 else "")
                      + f"), their loss every {job.validate_every} steps")
        if data.bucketed:
            self._log("aspect-ratio buckets: " + ", ".join(f"{w}x{h}: {len(members)}"
                                                           for (w, h), members in data.buckets().items()))
        device = accelerator.device
        if job.optimizer == "adamw8bit" and device.type != "cuda":
            raise ValueError("8-bit AdamW needs a CUDA GPU (bitsandbytes); use adamw on this device")
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision,
                                                                          torch.float32)
        encoders = text_encoders(pipe)
        for part in (pipe.unet, pipe.vae, *encoders):
            part.requires_grad_(False).eval()
        # TI trains through the text encoder into its input: fp32 there; the other methods run it in weight_dtype.
        # A VAE that overflows in fp16 (SDXL's: force_upcast) encodes the cached latents in fp32
        upcast_vae = (model.is_xl and weight_dtype == torch.float16
                      and getattr(pipe.vae.config, "force_upcast", False))
        parts = (pipe.unet,) if upcast_vae else (pipe.unet, pipe.vae)
        parts = parts if job.is_ti else (*parts, *encoders)
        for part in parts:
            part.to(device) if weight_dtype == torch.float32 else part.to(device, weight_dtype)
        for part in (pipe.vae, *encoders):
            part.to(device)
        self.model, self.pipe, self.device, self.weight_dtype = model, pipe, device, weight_dtype
        model_hash = self.model_hash = manager.model_hash(model)

        # 3. run folder (new, or the one being resumed)
        is_main = accelerator.is_main_process
        if run is None:
            run = RunFolder.create(self.cfg.runs_dir, job) if is_main else None
        elif is_main:
            run.save_job(job)  # a longer max_steps given at resume is part of the run now
        self.run_folder = run
        if run is not None:
            self.on_event("run", {"path": str(run.path)})
            self._log(f"run folder {run.path}")

        # 4. cached inputs: VAE latents of every image (and its mirror), class images, CLIP image embeddings
        self._progress(0, job.max_steps, "encoding training images")
        latents = self._encode_latents([item.image for item in data.images], data.flip_p > 0)
        self.latent_masks = self._latent_masks(data, latents) if job.masked_loss else None
        self.validation = None
        if held_out:  # their latents' means (no sampling: the same inputs at every validation)
            means, _ = self._encode_latents([item.image for item in held_out], False)
            self.validation = [(means[i][0][None] * self.pipe.vae.config.scaling_factor, item)
                               for i, item in enumerate(held_out)]
        class_latents = None
        if job.class_images:
            class_images = self._class_images(job, run)
            class_latents = self._encode_latents(class_images, data.flip_p > 0)
        features = None
        if job.trains_module:
            with accelerator.main_process_first():  # the first process writes shared caches, the others read them
                features = self._image_features(job, data, run, device)

        # 5. the method and its optimizer
        ctx = TrainContext(job, self.cfg, model, device, weight_dtype, run.path if run else None, model_hash,
                           self._log, data.bucketed)
        cls = method_class(job)
        if job.is_ti:
            method = cls(ctx, features)
        elif job.method == "lora":
            method = cls(ctx, [item.caption for item in data.images])
        else:
            method = cls(ctx)
        groups = method.param_groups()
        self._log(f"{method.label}: {sum(p.numel() for g in groups for p in g.params):,} trainable parameters")
        optimizer = make_optimizer(job, groups, device)
        start_step = 0
        checkpoint = run.load_checkpoint() if run is not None and run.checkpoints() else None
        if checkpoint is not None:
            method.load_state_dict(checkpoint.trainable)
            if checkpoint.optimizer is not None:
                optimizer.load_state_dict(checkpoint.optimizer)
            if checkpoint.extra is not None:
                method.load_extra_state(checkpoint.extra)
            start_step = checkpoint.step
            run.truncate_losses(start_step)
            self._log(f"resumed from {checkpoint.path.name}")
        method.prepare(accelerator)
        optimizer = accelerator.prepare(optimizer)
        # after peft has injected its layers and accelerate has wrapped the module: compiled in place, so state
        # dicts, peft's adapter state and the saved files see the real module (no `_orig_mod.` keys)
        if speed.compile_unet(pipe.unet, job.compile, self.compile_backend, training=True):
            self._log(f"compiling the UNet (torch.compile, mode {job.compile}, {self.compile_backend}): the first "
                      "step waits for the compiler")
        noise_scheduler = _training_scheduler(pipe, model.prediction_type)
        self.method = method
        self._first_prompt = method.first_prompt(data.images[0].caption)

        # 6. train
        return self._loop(job, run, method, groups, optimizer, noise_scheduler, data, latents, class_latents,
                          start_step)

    def _loop(self, job, run, method, groups, optimizer, noise_scheduler, data, latents, class_latents,
              start_step) -> TrainResult:
        accelerator = self.accelerator
        world, rank = accelerator.num_processes, accelerator.process_index
        is_main = accelerator.is_main_process
        run_path = run.path if run is not None else Path(".")
        if is_main:
            run.write_status(state="running", step=start_step, max_steps=job.max_steps, method=job.method,
                             name=job.name, message="")
        if is_main and start_step == 0 and job.preview_every:
            self._preview(job, run, method, 0)
        losses: list[float] = []
        pending_rows: list[dict] = []
        compiled = speed.is_compiled(self.pipe.unet)
        if compiled:
            self._progress(start_step, job.max_steps, "compiling the UNet: the first step waits for torch.compile")
        t0 = time.monotonic()
        rate_from = (start_step, t0)  # speed and ETA count from here (after the first step when that compiled)
        last_saved = start_step
        step = start_step
        state, message = "finished", ""
        sync_modules = list(getattr(method, "prepared", {}).values())
        try:
            while step < job.max_steps:
                if self.cancel.is_set():
                    state, message = "stopped", f"stopped at step {step}"
                    break
                step += 1
                rates = [g.rate(step) for g in groups]
                for group, rate in zip(optimizer.param_groups, rates, strict=True):
                    group["lr"] = rate
                step_loss = torch.zeros((), device=self.device)
                step_aux = torch.zeros((), device=self.device)
                for micro in range(job.grad_accum):
                    index = ((step - 1) * job.grad_accum + micro) * world + rank
                    if job.overfit_batches:
                        index %= job.overfit_batches  # the same few batches again and again (a learning check)
                    loss, aux = self._micro_step(job, method, noise_scheduler, data, latents, class_latents, index)
                    total = loss + aux if aux is not None else loss
                    last = micro == job.grad_accum - 1
                    with _no_sync(accelerator, sync_modules, skip=last):
                        accelerator.backward(total / job.grad_accum)
                    # checked after queueing the backward pass (no stall between the two), before any update
                    if not torch.isfinite(total.detach()):
                        raise TrainingFailed(self._nan_message(float(total.detach()), step, rates[0], run))
                    step_loss += loss.detach() / job.grad_accum
                    if aux is not None:
                        step_aux += aux.detach() / job.grad_accum
                if job.max_grad_norm:
                    accelerator.clip_grad_norm_(method.trainable_parameters(), job.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                method.after_step()
                mean_loss = float(accelerator.reduce(step_loss, reduction="mean"))
                losses.append(mean_loss)
                val_loss = None
                if self.validation and (step % job.validate_every == 0 or step == job.max_steps):
                    val_loss = self._validation_loss(job, method, noise_scheduler, self.validation)
                pending_rows.append({"step": step, "loss": f"{mean_loss:.6g}", "lr": f"{rates[0]:.6g}",
                                     "aux_loss": f"{float(step_aux):.6g}" if job.method == "ti-moe" else "",
                                     "seconds": f"{time.monotonic() - t0:.2f}",
                                     "val_loss": "" if val_loss is None else f"{val_loss:.6g}"})
                self.on_event("loss", {"step": step, "loss": mean_loss, "lr": rates[0], "val_loss": val_loss})
                self._progress(step, job.max_steps, self._progress_text(step, *rate_from, job.max_steps,
                                                                        mean_loss))
                if compiled and step == start_step + 1:
                    rate_from = (step, time.monotonic())
                if is_main and (len(pending_rows) >= 10 or step % job.save_every == 0):
                    run.append_losses(pending_rows)
                    pending_rows = []
                if is_main and step % job.save_every == 0 and step < job.max_steps:
                    self._checkpoint(job, run, method, optimizer, step, mean_loss)
                    last_saved = step
                if is_main and job.preview_every and step % job.preview_every == 0:
                    self._preview(job, run, method, step)
        except TrainingFailed as e:
            state, message = "failed", str(e)
        except torch.cuda.OutOfMemoryError:
            state, message = "failed", (
                f"out of GPU memory at step {step} (batch size {job.batch_size}, {job.resolution} px). Lower the "
                "batch size (raise gradient accumulation to keep the effective batch), lower the resolution, turn "
                "on gradient checkpointing, or use mixed precision fp16/bf16. The last checkpoint is kept; resume "
                "from it.")
        except Exception as e:  # anything else mid-run: reported with the step, the run folder stays usable
            self._log(traceback.format_exc())
            state, message = "failed", (f"training failed at step {step}: {type(e).__name__}: {e}. The last "
                                        "checkpoint is kept; see train.log in the run folder")
        if state == "failed":
            free_memory()  # after the except block: the exception's frames (and their tensors) are gone by now
        output = None
        if is_main:
            run.append_losses(pending_rows)
            if state == "stopped" and step == 0:
                message = "stopped before the first step; nothing was saved"
            elif state != "failed":
                if step > last_saved:
                    self._checkpoint(job, run, method, optimizer, step, losses[-1] if losses else None)
                if job.preview_every and step % job.preview_every:
                    self._preview(job, run, method, step)  # the final state, also of a stopped run
                output = method.save(step, final=True, run_path=run.path)
                self._card_picture(run, step, output)
                if state == "finished":
                    message = f"finished {step} steps; saved {output.name}"
                    moved = preview_change(run.preview_path(0), run.preview_path(step))
                    if moved is not None:
                        message += "; " + moved_note(moved)
                else:
                    message += f"; the result of step {step} is saved as {output.name} (resume to continue)"
            run.write_status(state=state, step=step, max_steps=job.max_steps, method=job.method, name=job.name,
                             message=message, output=str(output) if output else None)
        self._log(message)
        self.on_event("done", {"state": state, "message": message, "step": step})
        return TrainResult(run_path, state, step, message, output, losses)

    # --- one micro-batch --------------------------------------------------------------------------

    def _micro_step(self, job, method, noise_scheduler, data: TrainData, latents, class_latents, index):
        """Loss of micro-batch `index`: every random draw comes from its own generator (and LoRA dropout from a
        seed of its own), so a resumed run sees exactly the batches, flips, prompts, noise and timesteps an
        uninterrupted one would."""
        g = batch_generator(job.seed, index)
        if job.dropout:
            torch.manual_seed(rng_seed(job.seed, STREAM_DROPOUT, index))  # LoRA dropout draws from the global RNG
        idx = data.batch(job.seed, index, job.batch_size)
        rng = random.Random(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        prompts = method.batch_prompts([data.images[i].caption for i in idx], rng, index, idx)
        x0, flips = self._sample_latents(latents, idx, data.flip_p, g)
        weights = None
        if self.latent_masks is not None:
            masks = torch.stack([self.latent_masks[i][f] for i, f in zip(idx, flips, strict=True)])
            weights = loss_weights(masks, job.unmasked_weight).to(self.device)
        parts = [LatentBatch(x0, prompts, [data.images[i].time_ids(bool(f)) for i, f in zip(idx, flips,
                                                                                            strict=True)], weights)]
        if class_latents is not None:  # DreamBooth: as many class examples as instance examples
            class_idx = batch_indices(rng_seed(job.seed, STREAM_CLASS), index, job.batch_size,
                                      len(class_latents[0]), 1)[:len(idx)]
            class_x0, _ = self._sample_latents(class_latents, class_idx, data.flip_p, g)
            size = job.resolution  # class images are rendered square, uncropped
            parts.append(LatentBatch(class_x0, [job.class_prompt] * len(class_idx),
                                     [[size, size, 0, 0, size, size]] * len(class_idx)))
        per_item, timesteps, time_ids = zip(*(self._pass_losses(job, method, noise_scheduler, part, g)
                                              for part in merge_same_shape(parts)), strict=True)
        per_item, timesteps = torch.cat(per_item), torch.cat(timesteps)
        if job.min_snr_gamma:
            per_item = per_item * snr_weights(noise_scheduler, timesteps, job.min_snr_gamma)
        n = len(idx)
        loss = per_item[:n].mean()
        if class_latents is not None:
            loss = loss + job.prior_loss_weight * per_item[n:].mean()
        self.last_batch = {"prompts": [p for part in parts for p in part.prompts], "instances": n,
                           "class": len(per_item) - n, "indices": idx,
                           # what the UNet was given (SDXL), per item
                           "time_ids": [row for rows in time_ids if rows is not None for row in rows.tolist()]}
        return loss, method.aux_loss()

    def _pass_losses(self, job, method, noise_scheduler, part: LatentBatch, g: torch.Generator):
        """Per-item losses, timesteps and SDXL size conditioning (None for other models) of one UNet pass over
        `part`: noise, timesteps, conditioning (SDXL: with the pooled text embedding and the items' sizes)."""
        x0 = part.x0
        noise = torch.randn(x0.shape, generator=g)
        if job.noise_offset:
            noise = noise + job.noise_offset * torch.randn((*x0.shape[:2], 1, 1), generator=g)
        noise = noise.to(self.device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x0),), generator=g)
        timesteps = timesteps.to(self.device)
        noisy = noise_scheduler.add_noise(x0, noise, timesteps)
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(x0, noise, timesteps)
        else:
            target = noise
        time_ids = None
        with self.accelerator.autocast():
            cond = method.encode(part.prompts, g)
            extra = {}
            if isinstance(cond, tuple):  # SDXL: (embeds, pooled)
                cond, pooled = cond
                # float32, not bf16: bf16 rounds sizes above 256 (1195 becomes 1192); the UNet embeds them in fp32
                time_ids = torch.tensor(part.time_ids, dtype=torch.float32, device=self.device)
                extra["added_cond_kwargs"] = {"text_embeds": pooled.to(self.weight_dtype), "time_ids": time_ids}
            pred = method.denoiser()(noisy.to(self.weight_dtype), timesteps,
                                     encoder_hidden_states=cond.to(self.weight_dtype), **extra).sample
        per_item = weighted_losses(pred, target, part.weights)
        return per_item, timesteps, time_ids

    @torch.no_grad()
    def _validation_loss(self, job, method, noise_scheduler, validation) -> float:
        """The held-out images' mean loss, each at VALIDATION_DRAWS noises and timesteps from its own fixed
        generator, so two validations differ only by what the model learned; modules in eval mode (no dropout)."""
        modules = [m for m in (self.pipe.unet, *text_encoders(self.pipe)) if m.training]
        for m in modules:
            m.eval()
        try:
            losses = []
            for i, (x0, item) in enumerate(validation):
                g = torch.Generator().manual_seed(rng_seed(job.seed, STREAM_VALIDATION, i))
                part = LatentBatch(x0.repeat(VALIDATION_DRAWS, 1, 1, 1).to(self.device),
                                   [method.first_prompt(item.caption)] * VALIDATION_DRAWS,
                                   [item.time_ids()] * VALIDATION_DRAWS)
                per_item, _, _ = self._pass_losses(job, method, noise_scheduler, part, g)
                losses.append(per_item.mean())
            return float(torch.stack(losses).mean())
        finally:
            for m in modules:
                m.train()

    def _sample_latents(self, cache, idx: list[int], flip_p: float, g: torch.Generator
                        ) -> tuple[torch.Tensor, list[int]]:
        """A draw from the cached latent distributions of images `idx`, each mirrored with probability `flip_p`;
        and which were mirrored."""
        means, stds = cache
        flips = (torch.rand(len(idx), generator=g) < flip_p).long().tolist()
        mean = torch.stack([means[i][f] for i, f in zip(idx, flips, strict=True)])
        std = torch.stack([stds[i][f] for i, f in zip(idx, flips, strict=True)])
        sample = torch.randn(mean.shape, generator=g).to(self.device)
        return (mean + std * sample) * self.pipe.vae.config.scaling_factor, flips

    # --- cached inputs ----------------------------------------------------------------------------

    @torch.no_grad()
    def _encode_latents(self, images, with_flips: bool):
        """Per image: [unflipped, flipped] latent means and stds (the VAE's distribution, sampled per step)."""
        vae = self.pipe.vae
        means, stds = [], []
        for image in images:
            pixels = image_tensor(image)
            both = torch.stack([pixels, pixels.flip(-1)]) if with_flips else pixels[None]
            dist = vae.encode(both.to(self.device, vae.dtype)).latent_dist
            m, s = dist.mean.float(), dist.std.float()
            means.append([m[0], m[-1]])
            stds.append([s[0], s[-1]])
        return means, stds

    @staticmethod
    def _latent_masks(data: TrainData, latents) -> list[list[torch.Tensor]]:
        """Per image: [unflipped, flipped] masks at its latents' size (all ones without a mask)."""
        means = latents[0]
        return [[latent_mask(item.mask, tuple(means[i][0].shape[-2:]), flipped) for flipped in (False, True)]
                for i, item in enumerate(data.images)]

    @torch.no_grad()
    def _class_images(self, job: TrainJob, run: RunFolder | None) -> list:
        """DreamBooth class images: generated once with the base model into the run folder, reused after that
        (also on resume). Made before the method changes the model."""
        from PIL import Image

        folder = run.path / "class_images" if run is not None else None
        images = []
        encoder = base_prompt_encoder(self.pipe)
        for i in range(job.class_images):
            path = folder / f"{i:05d}.png" if folder is not None else None
            if path is not None and path.is_file():
                images.append(Image.open(path).convert("RGB"))
                continue
            self._progress(i, job.class_images, f"class image {i + 1}/{job.class_images}: {job.class_prompt}")
            seed = rng_seed(job.seed, STREAM_CLASS, i) % 2**32
            image = self._render(encoder, SamplePrompt(job.class_prompt, "", job.resolution, job.resolution, seed,
                                                       7.0, job.preview_steps))
            if path is not None:
                from studio.generation.generate import save_png

                save_png(image, format_infotext(job.class_prompt, "", {"Steps": job.preview_steps, "Seed": seed,
                                                                       "Sampler": "DPM++ 2M", "Model":
                                                                       self.model.name}), path)
            images.append(image)
        self._log(f"{job.class_images} class images for {job.class_prompt!r} "
                  f"({'in ' + str(folder) if folder else 'in memory'})")
        return images

    def _image_features(self, job: TrainJob, data: TrainData, run: RunFolder | None, device) -> torch.Tensor:
        """CLIP image embeddings of the first `max_images` training images, computed once and kept in the run
        folder (a resumed or continued run reads the very same inputs)."""
        from safetensors.torch import load_file, save_file

        from studio.files.atomic import atomic_path
        from studio.train.image_encoder import load_image_encoder

        path = run.path / "image_features.safetensors" if run is not None else None
        if path is not None and path.is_file():
            return load_file(str(path))["features"]
        self._log(f"computing CLIP image embeddings with {job.image_encoder}")
        encoder = load_image_encoder(job.image_encoder, self.cfg.cache_dir)
        images = [item.image for item in data.images[: job.max_images]]
        features = encoder.embed(images, device)
        del encoder
        if path is not None:
            with atomic_path(path) as tmp:
                save_file({"features": features.contiguous()}, str(tmp),
                          metadata={"encoder": job.image_encoder,
                                    "images": ",".join(item.name for item in data.images[: job.max_images])})
        return features

    # --- outputs ----------------------------------------------------------------------------------

    def _checkpoint(self, job, run, method, optimizer, step, loss) -> None:
        path = run.save_checkpoint(step, method.state_dict(), optimizer.state_dict(),
                                   {"loss": loss, "method": job.method, "model_hash": self.model_hash[:10]},
                                   job.keep_checkpoints, extra=method.extra_state())
        method.save(step, final=False, run_path=run.path)
        self._log(f"checkpoint at step {step}")
        self.on_event("checkpoint", {"step": step, "path": str(path)})

    @torch.no_grad()
    def _render(self, encoder, sample: SamplePrompt):
        """One image of `sample` (prompt, negative prompt, size, seed, CFG, steps) with DPM++ 2M Karras, drawn like
        Generate draws it (CPU noise from the seed)."""
        from studio.generation.conditioning import encode_pair
        from studio.generation.denoise import initial_latents

        pipe = self.pipe
        prompt, seed, width, height = sample.prompt, sample.seed, sample.width, sample.height
        if self.model.is_xl:  # and the pooled embeddings; the pipeline adds the size conditioning
            cond, uncond, _ = encode_pair(encoder, prompt, sample.negative)
            embeds = {"prompt_embeds": cond.embeds, "negative_prompt_embeds": uncond.embeds,
                      "pooled_prompt_embeds": cond.pooled, "negative_pooled_prompt_embeds": uncond.pooled}
        else:
            cond, uncond, _ = encoder.encode_pair(prompt, sample.negative)
            embeds = {"prompt_embeds": cond, "negative_prompt_embeds": uncond}
        pipe.scheduler = samplers.make_scheduler("DPM++ 2M", "Karras", dict(self._scheduler_config), seed=seed)
        latents = initial_latents(pipe, [seed], width, height)
        with self.accelerator.autocast():
            return pipe(**embeds, num_inference_steps=sample.steps, guidance_scale=sample.cfg, width=width,
                        height=height, latents=latents).images[0]

    @staticmethod
    def _card_picture(run: RunFolder, step: int, output: Path) -> None:
        """The last preview becomes the output's card picture (`NAME.preview.png`, as A1111 shows it)."""
        last = run.preview_path(step)
        if last.is_file():
            with Image.open(last) as im:
                save_preview(output, im)

    def _preview(self, job: TrainJob, run: RunFolder, method: TrainMethod, step: int) -> Path:
        """The preview images of `step`: each sample prompt (or the fixed preview prompt) with its seed, drawn with
        what the method has learned so far. Returns the first one's path (the output's card picture)."""
        from studio.generation.generate import save_png

        modules = [m for m in (self.pipe.unet, *text_encoders(self.pipe)) if m.training]
        for m in modules:
            m.eval()  # no dropout in previews
        paths = []
        try:
            for k, sample in enumerate(job.samples(), 1):
                sample = dataclasses.replace(sample, prompt=sample.prompt or self._first_prompt)
                with speed.uncompiled(self.pipe.unet):  # previews run eagerly: no inference graph to compile
                    image = self._render(method.preview_encoder(), sample)
                info = format_infotext(sample.prompt, sample.negative, {
                    "Steps": sample.steps, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": sample.cfg,
                    "Seed": sample.seed, "Size": f"{sample.width}x{sample.height}", "Model": self.model.name,
                    "Training step": step})
                paths.append(save_png(image, info, run.preview_path(step, k)))
                self.on_event("preview", {"step": step, "path": str(paths[-1]), "sample": k})
        finally:
            for m in modules:
                m.train()
        return paths[0]

    # --- reporting --------------------------------------------------------------------------------

    def _nan_message(self, value: float, step: int, lr: float, run: RunFolder | None) -> str:
        last = run.checkpoints()[-1][1].name if run is not None and run.checkpoints() else "none yet"
        return (f"the loss became {value} at step {step}: training stopped before the bad update. The last good "
                f"checkpoint ({last}) is kept. Resume with a lower learning rate (it was {lr:g}) or without "
                "fp16 mixed precision.")

    def _progress_text(self, step, from_step, from_time, max_steps, loss) -> str:
        done = step - from_step
        rate = done / max(time.monotonic() - from_time, 1e-9)
        eta = (max_steps - step) / rate if rate > 0 else 0
        return f"step {step}/{max_steps} · loss {loss:.4f} · {rate:.2f} steps/s · ETA {_clock(eta)}"

    def _progress(self, done: int, total: int, info: str) -> None:
        if self.on_progress:
            self.on_progress(done, total, info)

    def _log(self, text: str) -> None:
        if not text:
            return
        self.on_event("log", {"text": text})
        run = self.run_folder
        if run is not None:
            with open(run.path / "train.log", "a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")


class _no_sync:
    """accelerate's no_sync for every prepared module (skips the gradient all-reduce of non-final micro-batches)."""

    def __init__(self, accelerator, modules, skip: bool):
        self.contexts = [] if skip else [accelerator.no_sync(m) for m in modules]

    def __enter__(self):
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.contexts):
            c.__exit__(*exc)


def _training_scheduler(pipe, prediction_type: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)


BARELY_MOVED = 3.0  # mean levels of 255: below this the result hardly changed the preview


def preview_change(first: Path, last: Path) -> float | None:
    """How far training moved the preview: the mean absolute pixel difference (0..255) between the step-0
    preview (the untrained model) and the last one; None without both."""
    if first == last or not first.is_file() or not last.is_file():
        return None
    with Image.open(first) as a, Image.open(last) as b:
        if a.size != b.size:
            return None
        return float(np.abs(np.asarray(a.convert("RGB"), dtype=np.float32)
                            - np.asarray(b.convert("RGB"), dtype=np.float32)).mean())


def moved_note(change: float) -> str:
    """What the preview's change says: how far the result moved the model, and what to try when it barely did."""
    note = f"it changed the preview by {change:.1f}/255 on average from the untrained model's"
    if change < BARELY_MOVED:
        note += (" - barely: the result is close to the base model; train more steps or raise the learning "
                 "rate")
    return note


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def describe(job: TrainJob) -> str:
    return f"{METHOD_LABELS[job.method]} '{job.name}' on {job.data}, {job.max_steps} steps"
