"""SDXL LoRA training on the GPU, studio vs a loop shaped like diffusers' examples/dreambooth/
train_dreambooth_lora_sdxl.py, in the same run: 1024², batch 1, rank 16, UNet-only LoRA on the attention projections,
gradient checkpointing, bf16 mixed precision (fp16 where the card has no bf16), on a random-weight SDXL 1.0
base-architecture model built from assets/configs/sdxl (bench/common.py build_sdxl_folder).

Targets (issue text): peak <= 10 GiB for the studio, images/s >= 1.5x the plain loop, and what the 12 GB preset
(presets/training/sdxl-lora-12gb.yaml) costs in speed.

Contenders, blocks alternating (plain, studio, studio_12gb, plain, studio, studio_12gb, ...):
  plain        the example's loop: peft LoraConfig via `unet.add_adapter`, the fp32 VAE encoding every step, both
               text encoders every step (its encode_prompt: penultimate hidden states concatenated, pooled from
               the second), add_time_ids from (1024, 1024, 0, 0, 1024, 1024), DDPM noise and timesteps, MSE on
               epsilon, `unet.enable_gradient_checkpointing()`, torch.optim.AdamW (the example's betas, weight
               decay 1e-4, eps 1e-8), autocast on the UNet forward (what accelerate's prepare does), clip_grad_norm
               1.0 (the example's default), `loss.item()` each step (it logs it). As the example does, the LoRA
               weights stay in bf16 under bf16 and are upcast to fp32 (with a GradScaler) only under fp16.
  studio       the studio's Trainer: TrainJob method lora, rank 16, gradient checkpointing, text encoders frozen
               (their embeddings cached per caption), latents cached, buckets on (square images: one 1024² bucket)
  studio_12gb  the studio with the sdxl-lora-12gb preset's settings (alpha 8, grad_accum 4, AdamW 8-bit, cosine);
               one of its optimizer steps is 4 images, so its images/s is 4x its steps/s. Left out (and said so)
               where `import bitsandbytes` fails

Step times are the gaps between consecutive steps' ends (the plain loop's `loss.item()`, the studio's "loss" event;
both wait for the GPU), the first WARMUP of each block skipped (the preset's: PRESET_WARMUP optimizer steps); medians
over every block of a contender. Peak memory: torch.cuda.max_memory_allocated, reset before each block (so it
includes the model load). Ratios are of images/s against plain.

Usage: python bench/bench_train_sdxl_lora.py [--steps 15] [--preset-steps 8] [--rounds 2] [--work DIR] [--tiny]
--tiny: the same logic on demo-tiny-xl (saved as a folder) at 64 px, a few steps, on the CPU where there is no GPU
(fp32, and the preset with adamw in place of the CUDA-only 8-bit AdamW): a check of the script, not a measurement."""

from __future__ import annotations

import argparse
import gc
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine has no network: never wait on the hub

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_sdxl_generate import build_tiny_xl_folder  # noqa: E402
from bench.common import build_sdxl_folder, environment, median, sync, write_report  # noqa: E402

RES, RANK, LR, SEED = 1024, 16, 1e-4, 0
TINY_RES = 64
N_IMAGES = 4
WARMUP = 3  # gaps skipped per block (plain, studio)
PRESET_WARMUP = 2  # optimizer steps skipped per studio_12gb block (each is grad_accum images)
PRESET = "sdxl-lora-12gb"
NAME = "bench-xl-lora"
# the example's default --lora target modules; the studio's lora_targets="attention" is the same list
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
MAX_GRAD_NORM = 1.0  # the example's default --max_grad_norm
CAPTIONS = ["a red square", "a photo of a blue wall", "a green field, flat colour", "a yellow painting of light"]


# --- inputs ------------------------------------------------------------------------------------------------


def make_dataset(folder: Path, size: int) -> Path:
    """N_IMAGES random-colour size² PNGs (a soft gradient over the colour, so they are not all one value) with a
    caption each."""
    from PIL import Image

    if len(list(folder.glob("*.png"))) == N_IMAGES:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    ramp = np.linspace(-30, 30, size, dtype=np.float32)
    for i in range(N_IMAGES):
        colour = rng.integers(30, 226, 3).astype(np.float32)
        a = colour[None, None, :] + ramp[None, :, None] + ramp[:, None, None] * 0.5
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(CAPTIONS[i % len(CAPTIONS)] + "\n")
    return folder


def load_images(folder: Path, device) -> torch.Tensor:
    """[N, 3, H, W] in [-1, 1], fp32 on the device: the plain loop's data, loaded once (the example preprocesses
    its instance images once too)."""
    from PIL import Image

    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1.0
              for p in sorted(folder.glob("*.png"))]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous().to(device)


def read_captions(folder: Path) -> list[str]:
    return [p.with_suffix(".txt").read_text().strip() for p in sorted(folder.glob("*.png"))]


# --- contender A: a loop shaped like diffusers' examples/dreambooth/train_dreambooth_lora_sdxl.py ----------------


class PlainSDXLLoRA:
    """See the module docstring (plain)."""

    def __init__(self, folder: Path, images: torch.Tensor, captions: list[str], rank: int, device,
                 precision: str, res: int):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from diffusers.optimization import get_scheduler
        from peft import LoraConfig
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        self.device, self.images, self.captions, self.res = device, images, captions, res
        self.amp = precision in ("fp16", "bf16")
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        self.fp16 = precision == "fp16"
        self.tokenizers = [AutoTokenizer.from_pretrained(folder, subfolder="tokenizer", use_fast=False,
                                                         trust_remote_code=False),
                           AutoTokenizer.from_pretrained(folder, subfolder="tokenizer_2", use_fast=False,
                                                         trust_remote_code=False)]
        self.noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        te1 = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=self.weight_dtype)
        te2 = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2",
                                                          dtype=self.weight_dtype)
        # "The VAE is always in float32 to avoid NaN losses."
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", dtype=torch.float32)
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", dtype=self.weight_dtype)
        self.text_encoders = [te1, te2]
        for part in (self.vae, te1, te2, self.unet):
            part.requires_grad_(False).to(device)
        self.unet.enable_gradient_checkpointing()
        torch.manual_seed(SEED)
        self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, init_lora_weights="gaussian",
                                         target_modules=TARGETS))
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        if self.fp16:  # the example upcasts the LoRA weights under fp16 only
            for p in self.params:
                p.data = p.data.float()
        self.unet.train()
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
        self.lr_scheduler = get_scheduler("constant", optimizer=self.optimizer, num_warmup_steps=0,
                                          num_training_steps=10_000)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.fp16)
        self.rng = random.Random(SEED)

    def _tokenize(self, tokenizer, prompt):
        return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids

    @torch.no_grad()
    def _encode_prompt(self, prompt: list[str]):
        """The example's encode_prompt (through compute_text_embeddings, under no_grad)."""
        embeds_list = []
        for tokenizer, text_encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = self._tokenize(tokenizer, prompt)
            out = text_encoder(ids.to(text_encoder.device), output_hidden_states=True, return_dict=False)
            pooled = out[0]  # only the last encoder's counts: CLIPTextModelWithProjection's text_embeds
            embeds = out[-1][-2]
            bs, seq, _ = embeds.shape
            embeds_list.append(embeds.view(bs, seq, -1))
        return torch.concat(embeds_list, dim=-1).to(self.device), pooled.view(bs, -1).to(self.device)

    def _time_ids(self):
        size = (self.res, self.res)
        return torch.tensor([list(size + (0, 0) + size)]).to(self.device, dtype=self.weight_dtype)

    def step(self) -> float:
        i = self.rng.randrange(len(self.images))
        pixel_values = self.images[i:i + 1].to(dtype=self.vae.dtype)
        model_input = self.vae.encode(pixel_values).latent_dist.sample() * self.vae.config.scaling_factor
        model_input = model_input.to(self.weight_dtype)
        noise = torch.randn_like(model_input)
        bsz = model_input.shape[0]
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (bsz,),
                                  device=model_input.device).long()
        noisy = self.noise_scheduler.add_noise(model_input, noise, timesteps)
        add_time_ids = torch.cat([self._time_ids() for _ in range(bsz)])
        prompt_embeds, pooled = self._encode_prompt([self.captions[i]])
        added = {"time_ids": add_time_ids, "text_embeds": pooled}
        with torch.autocast(self.device.type, dtype=self.weight_dtype, enabled=self.amp):
            pred = self.unet(noisy, timesteps, prompt_embeds, added_cond_kwargs=added, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        return loss.detach().item()

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.params)


# --- blocks ------------------------------------------------------------------------------------------------


def cleanup(cuda: bool) -> float:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated() / 2**30
    return 0.0


def reset_peak(cuda: bool) -> None:
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(cuda: bool) -> float:
    if not cuda:
        return 0.0
    sync()
    return torch.cuda.max_memory_allocated() / 2**30


def gaps(stamps: list[float], skip: int) -> list[float]:
    """Seconds between consecutive step ends, the first `skip` left out."""
    return [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)][skip:]


def plain_block(folder, data_dir, captions, steps, device, precision, res, cuda) -> dict:
    cleanup(cuda)
    reset_peak(cuda)
    t0 = time.perf_counter()
    images = load_images(data_dir, device)
    trainer = PlainSDXLLoRA(folder, images, captions, RANK, device, precision, res)
    load_s = time.perf_counter() - t0
    stamps, losses = [], []
    for _ in range(steps):
        losses.append(trainer.step())
        stamps.append(time.perf_counter())
    out = {"load_s": load_s, "times": gaps(stamps, WARMUP), "images_per_step": 1, "peak_gib": peak_gib(cuda),
           "losses": losses, "wall_s": time.perf_counter() - t0, "trainable": trainer.trainable_count(),
           "first_step_s": stamps[0] - t0 - load_s}
    del trainer, images
    out["resident_after_gib"] = cleanup(cuda)
    return out


def studio_settings(folder, data_dir, steps, res, precision) -> dict:
    return dict(model=str(folder), data=str(data_dir), name=NAME, resolution=res, batch_size=1, max_steps=steps,
                mixed_precision=precision, rank=RANK, alpha=RANK, lora_targets="attention",
                train_text_encoder=False, gradient_checkpointing=True, optimizer="adamw", learning_rate=str(LR),
                save_every=steps, preview_every=0, seed=SEED, overwrite=True)


def preset_settings(folder, data_dir, steps, res, precision, cuda) -> tuple[dict, dict]:
    """The sdxl-lora-12gb preset's settings with this run's model, data, length and no previews; and what was
    changed beyond that (on the CPU: the 8-bit AdamW and bf16, for adamw and this run's precision)."""
    from studio.train.job import find_train_preset

    values = dict(find_train_preset(PRESET).settings)
    values.pop("method", None)
    values.update(model=str(folder), data=str(data_dir), name=NAME, resolution=res, max_steps=steps,
                  save_every=steps, preview_every=0, seed=SEED, overwrite=True)
    overrides = {}
    if not cuda:
        for key, value in (("optimizer", "adamw"), ("mixed_precision", precision)):
            if values.get(key) != value:
                overrides[key] = f"{values.get(key)} -> {value}"
                values[key] = value
    elif values.get("mixed_precision") == "bf16" and precision != "bf16":  # a card without bf16
        overrides["mixed_precision"] = f"bf16 -> {precision}"
        values["mixed_precision"] = precision
    return values, overrides


def studio_block(cfg, values: dict, cuda: bool, skip: int) -> dict:
    from studio.train.job import TrainJob
    from studio.train.loop import Trainer

    cleanup(cuda)
    reset_peak(cuda)
    marks: dict[str, float] = {}
    stamps: list[float] = []
    logs: list[str] = []

    def on_event(kind, info):
        if kind == "loss":
            stamps.append(time.perf_counter())
        elif kind == "log":
            logs.append(info["text"])

    def on_progress(done, total, text):
        if text.startswith("encoding") and "encoding" not in marks:
            marks["encoding"] = time.perf_counter()

    job = TrainJob.for_method("lora", **values)
    trainer = Trainer(cfg, on_progress=on_progress, on_event=on_event)
    t0 = time.perf_counter()
    result = trainer.start(job)
    wall = time.perf_counter() - t0
    if result.state != "finished":
        raise RuntimeError(f"studio training {result.state}: {result.message}")
    out = {"times": gaps(stamps, skip), "images_per_step": job.batch_size * job.grad_accum,
           "peak_gib": peak_gib(cuda), "losses": result.losses, "wall_s": wall,
           # start() -> "encoding training images": data read, model load and cast, run folder, model hash
           "load_s": marks.get("encoding", t0) - t0,
           # latent caching, adapter, optimizer and accelerate set-up, text caching and the first step
           "cache_and_first_step_s": stamps[0] - marks.get("encoding", t0),
           "finish_s": t0 + wall - stamps[-1],
           "trainable_log": next((t for t in logs if "trainable parameters" in t), ""),
           "bucket_log": next((t for t in logs if "buckets" in t), "")}
    del trainer, result
    out["resident_after_gib"] = cleanup(cuda)
    return out


def bitsandbytes_status(cuda: bool) -> str | None:
    """None where the 8-bit AdamW can run, else why not."""
    if not cuda:
        return None  # the CPU smoke test swaps in adamw
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a broken native library
        return f"import bitsandbytes failed: {type(e).__name__}: {e}"
    return None


def block_line(key: str, name: str, b: dict) -> str:
    s = median(b["times"])
    extra = (f"load {b['load_s']:.1f}s, first step {b['first_step_s']:.1f}s, {b['trainable']:,} trainable"
             if name == "plain" else
             f"start() {b['wall_s']:.1f}s (load {b['load_s']:.1f}s, cache+first step "
             f"{b['cache_and_first_step_s']:.1f}s, finish {b['finish_s']:.2f}s) [{b['trainable_log']}]")
    return (f"{key} {name:<11}: {b['images_per_step'] / s:6.2f} img/s {1 / s:6.2f} steps/s, peak "
            f"{b['peak_gib']:.2f} GiB, resident after {b['resident_after_gib']:.2f} GiB, {extra}")


# --- main --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=None, help="steps per plain / studio block (default 15; "
                        "--tiny 6)")
    parser.add_argument("--preset-steps", type=int, default=None, help="optimizer steps per studio_12gb block "
                        "(each is grad_accum images; default 8; --tiny 4)")
    parser.add_argument("--rounds", type=int, default=2, help="blocks per contender")
    parser.add_argument("--work", default=None, help="folder for the random model, dataset and studio home "
                        "(default: a temp folder, removed at the end)")
    parser.add_argument("--no-preset", action="store_true", help="leave out the studio_12gb contender")
    parser.add_argument("--tiny", action="store_true", help=f"smoke test: demo-tiny-xl at {TINY_RES} px (on the "
                        "CPU where there is no GPU)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        parser.error("the SDXL training benchmark needs a CUDA GPU; --tiny runs the same logic on the CPU")
    steps = args.steps or (6 if args.tiny else 15)
    preset_steps = args.preset_steps or (4 if args.tiny else 8)
    if steps <= WARMUP + 1:
        parser.error(f"--steps must be more than {WARMUP + 1} (the first {WARMUP} gaps are warm-up)")
    if preset_steps <= PRESET_WARMUP + 1:
        parser.error(f"--preset-steps must be more than {PRESET_WARMUP + 1}")
    temp_work = args.work is None
    work = Path(args.work or tempfile.mkdtemp(prefix="studio-bench-sdxl-lora-"))
    os.environ["STUDIO_HOME"] = str(work / "home")
    try:
        run(args, work, cuda, steps, preset_steps)
    finally:
        if temp_work:
            shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path, cuda: bool, steps: int, preset_steps: int) -> None:
    import diffusers
    import peft
    import transformers

    from studio.config import StudioConfig

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    else:
        precision = "no"  # the CPU smoke test runs fp32
    res = TINY_RES if args.tiny else RES

    t0 = time.perf_counter()
    if args.tiny:
        folder = build_tiny_xl_folder(work / "demo-tiny-xl")
    else:
        try:  # weights drawn on the GPU: seconds, where the CPU takes minutes
            folder = build_sdxl_folder(work / "sdxl-random", device=device.type)
        except Exception as e:
            print(f"building on {device} failed ({type(e).__name__}: {e}); building on the CPU", flush=True)
            folder = build_sdxl_folder(work / "sdxl-random", device="cpu")
        cleanup(cuda)
    build_s = time.perf_counter() - t0
    data_dir = make_dataset(work / f"data{res}", res)
    captions = read_captions(data_dir)
    cfg = StudioConfig.from_env(device="cuda" if cuda else "cpu")
    print(f"model folder ready in {build_s:.1f} s: {folder}; {precision}, {res} px", flush=True)

    preset_values, overrides = preset_settings(folder, data_dir, preset_steps, res, precision, cuda)
    skip_reason = "--no-preset" if args.no_preset else bitsandbytes_status(cuda)
    if skip_reason:
        print(f"studio_12gb left out: {skip_reason}", flush=True)
    if overrides:
        print(f"studio_12gb: preset settings changed for this device: {overrides}", flush=True)
    runs = {"plain": lambda: plain_block(folder, data_dir, captions, steps, device, precision, res, cuda),
            "studio": lambda: studio_block(cfg, studio_settings(folder, data_dir, steps, res, precision), cuda,
                                           WARMUP)}
    if not skip_reason:
        runs["studio_12gb"] = lambda: studio_block(cfg, preset_values, cuda, PRESET_WARMUP)

    env = environment()
    env["peft"] = peft.__version__
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    except Exception:
        env["bitsandbytes"] = None
    results = {"env": env,
               "settings": {"model": "demo-tiny-xl" if args.tiny else "SDXL 1.0 base architecture, random weights",
                            "resolution": res, "batch": 1, "rank": RANK, "learning_rate": LR, "targets": TARGETS,
                            "mixed_precision": precision, "steps_per_block": steps,
                            "preset_steps_per_block": preset_steps, "rounds": args.rounds,
                            "warmup_steps_skipped": WARMUP, "preset_warmup_steps_skipped": PRESET_WARMUP,
                            "images": N_IMAGES, "tiny": args.tiny, "preset": PRESET,
                            "preset_settings": {k: v for k, v in preset_values.items()
                                                if k not in ("model", "data")},
                            "preset_overrides": overrides, "preset_left_out": skip_reason},
               "build_s": build_s}
    name = "train_sdxl_lora" + ("_tiny" if args.tiny else "")
    blocks: dict[str, list[dict]] = {k: [] for k in runs}
    t_start = time.perf_counter()
    for r in range(args.rounds):
        for key, fn in list(runs.items()):
            try:
                b = fn()
            except Exception as e:  # the 8-bit AdamW can import and still fail on its first step
                if key != "studio_12gb":
                    raise
                skip_reason = f"its block failed: {type(e).__name__}: {e}"
                print(f"studio_12gb left out: {skip_reason}", flush=True)
                results["settings"]["preset_left_out"] = skip_reason
                del runs[key], blocks[key]
                cleanup(cuda)
                continue
            blocks[key].append(b)
            print(block_line(f"round {r + 1}", key, b), flush=True)
            results["blocks"] = blocks
            write_report(name, results)  # kept if a later block is cut off
        print(f"[{time.perf_counter() - t_start:.0f}s since the first block]", flush=True)

    summary = {}
    for key, bs in blocks.items():
        per_step = median([t for b in bs for t in b["times"]])
        images = bs[0]["images_per_step"]
        summary[key] = {"s_per_step": per_step, "steps_per_s": 1 / per_step, "images_per_s": images / per_step,
                        "images_per_step": images, "peak_gib": max(b["peak_gib"] for b in bs),
                        "block_images_per_s": [images / median(b["times"]) for b in bs],
                        "final_loss": bs[-1]["losses"][-1]}
    base = summary["plain"]["images_per_s"]
    for s in summary.values():
        s["ratio_images_per_s_vs_plain"] = s["images_per_s"] / base
    if "studio_12gb" in summary:
        summary["studio_12gb"]["ratio_images_per_s_vs_studio"] = (summary["studio_12gb"]["images_per_s"]
                                                                 / summary["studio"]["images_per_s"])
    studio = summary["studio"]
    results["summary"] = summary
    results["targets"] = {"studio_peak_gib": studio["peak_gib"], "peak_le_10gib": studio["peak_gib"] <= 10.0,
                          "studio_ratio_vs_plain": studio["ratio_images_per_s_vs_plain"],
                          "ratio_ge_1_5": studio["ratio_images_per_s_vs_plain"] >= 1.5}
    path = write_report(name, results)

    print("\n| contender | steps/s | images/s | peak GiB | images/s vs plain | per-block images/s |")
    print("|---|---:|---:|---:|---:|---|")
    for key, s in summary.items():
        print(f"| {key} | {s['steps_per_s']:.2f} | {s['images_per_s']:.2f} | {s['peak_gib']:.2f} | "
              f"{s['ratio_images_per_s_vs_plain']:.3f} | {[round(x, 2) for x in s['block_images_per_s']]} |")
    print(f"\ntargets: studio peak {studio['peak_gib']:.2f} GiB (<= 10: "
          f"{'yes' if results['targets']['peak_le_10gib'] else 'NO'}); studio {studio['ratio_images_per_s_vs_plain']:.2f}x "
          f"plain's images/s (>= 1.5: {'yes' if results['targets']['ratio_ge_1_5'] else 'NO'})")
    if "studio_12gb" in summary:
        p = summary["studio_12gb"]
        print(f"12 GB preset: {p['images_per_s']:.2f} images/s, {p['ratio_images_per_s_vs_studio']:.2f}x the studio "
              f"at its defaults ({100 * (p['ratio_images_per_s_vs_studio'] - 1):+.0f} % images/s), peak "
              f"{p['peak_gib']:.2f} GiB" + (f"; changed here: {overrides}" if overrides else ""))
    else:
        print(f"12 GB preset: left out ({skip_reason})")
    if args.tiny:
        print("(--tiny: a check of the script, not a measurement)")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
