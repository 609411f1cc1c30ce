"""LoRA training on the GPU, studio vs a plain peft loop shaped like diffusers' examples/dreambooth/
train_dreambooth_lora.py, in the same run: 512², fp16 mixed precision, rank 4 and 64, batch 4 and 1 (issue #10
item 6).
Usage: python bench/bench_train_lora.py [--steps 40] [--rounds 3] [--ranks 4,64] [--batches 4,1] [--work DIR]
       [--tiny] [--no-profile] [--compile MODE]

The method is bench/bench_train_ti.py's, and its helpers are reused from there. For each (rank, batch) the blocks
alternate: plain, studio, plain, studio, and so on. Step times are the gaps between consecutive steps' ends (the plain
loop's `loss.item()`, the studio's "loss" event; both wait for the GPU), the first few of each block skipped as
warm-up; we quote medians over every block of a contender. After the timed blocks of a configuration, each
contender runs once more under torch.profiler (GPU kernel time, kernels and syncs per step); those runs are not
timed. `--tiny` runs the same logic with the tiny random model at 64 px (on the CPU when there is no GPU): a check
of the script at no device cost, not a measurement. `--compile MODE` (CUDA only, skipped on the CPU) adds the
*studio_compiled* contender as in bench_train_ti.py: the Trainer with TrainJob(compile=MODE), which compiles the
peft-wrapped UNet; its first block per (rank, batch) pays the compile, reported apart as `compile_s`."""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_train_ti import (  # noqa: E402
    COMPILED,
    N_IMAGES,
    PEAK_TFLOPS,
    PROFILE_ACTIVE,
    PROFILE_WAIT,
    PROFILE_WARMUP,
    SEED,
    WARMUP,
    block_line,
    build_tiny_folder,
    cleanup,
    compile_mode,
    compile_time,
    gaps,
    load_images,
    make_dataset,
    matmul_tflops,
    peak_gib,
    profile_summary,
    profiler,
    reset_peak,
    studio_train_digest,
)
from bench.common import build_sd15_folder, environment, median, write_report  # noqa: E402
from studio.models.speed import TRAIN_COMPILE_MODES  # noqa: E402

LR = 1e-4
NAME = "bench-lora"
# diffusers' example wraps these four projections of every attention block (plus add_k_proj / add_v_proj, which an
# SD 1.5 UNet does not have); the studio's lora_targets="attention" is the same list
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def read_captions(folder: Path) -> list[str]:
    return [p.with_suffix(".txt").read_text().strip() for p in sorted(folder.glob("*.png"))]


# --- contender A: a plain peft loop shaped like diffusers' examples/dreambooth/train_dreambooth_lora.py -------------


class PlainLoRA:
    """UNet, VAE and text encoder frozen in fp16; `unet.add_adapter(LoraConfig(...))` with gaussian init on the
    attention projections, the LoRA weights cast to fp32 (the example's `cast_training_params` under fp16); every
    step VAE-encodes its batch (`latent_dist.sample()`) and runs the text encoder on the tokenized captions; DDPM
    noise and timesteps; UNet under autocast; MSE in fp32; AdamW on the LoRA weights through a GradScaler (what
    accelerate does under fp16); `loss.item()` each step, as the example logs it."""

    def __init__(self, folder: Path, images: torch.Tensor, captions: list[str], batch: int, rank: int, device,
                 amp: bool):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from peft import LoraConfig
        from transformers import CLIPTextModel, CLIPTokenizer

        self.device, self.amp, self.batch, self.images, self.captions = device, amp, batch, images, captions
        self.dtype = torch.float16 if amp else torch.float32
        self.tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=self.dtype)
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", dtype=self.dtype)
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", dtype=self.dtype)
        self.noise_scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(folder, subfolder="scheduler"))
        for part in (self.text_encoder, self.vae, self.unet):
            part.requires_grad_(False).to(device)
        torch.manual_seed(SEED)
        self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                         target_modules=TARGETS))
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        for p in self.params:
            p.data = p.data.float()
        self.unet.train()
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp)
        self.rng = random.Random(SEED)

    def _batch(self):
        idx = [self.rng.randrange(len(self.images)) for _ in range(self.batch)]
        ids = self.tokenizer([self.captions[i] for i in idx], padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
        return self.images[idx], ids.to(self.device)

    def _loss(self, latents, ids):
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                          device=self.device).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        with torch.no_grad():
            hidden = self.text_encoder(ids)[0]
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            pred = self.unet(noisy, t, hidden).sample
        return F.mse_loss(pred.float(), noise.float(), reduction="mean")

    @torch.no_grad()
    def _encode(self, pixels):
        return self.vae.encode(pixels.to(self.dtype)).latent_dist.sample() * self.vae.config.scaling_factor

    def step(self) -> float:
        pixels, ids = self._batch()
        loss = self._loss(self._encode(pixels), ids)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def model_flops(self) -> tuple[float, float, float]:
        """(FLOPs of one step's text encoder forward + UNet forward and backward at this batch, of which the
        text encoder's, FLOPs of one image's VAE encode), from torch's flop counter; the optimizer not counted."""
        from torch.utils.flop_counter import FlopCounterMode

        pixels, ids = self._batch()
        latents = self._encode(pixels)
        with FlopCounterMode(display=False) as counter:
            self._loss(latents, ids).backward()
        step = counter.get_total_flops()
        self.optimizer.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            self.text_encoder(ids)
        text = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            self._encode(pixels[:1])
        return step, text, counter.get_total_flops()

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.params)


# --- blocks ------------------------------------------------------------------------------------------------


def studio_job(folder, data_dir, batch, rank, steps, res, precision, compile="off"):
    from studio.train.job import TrainJob

    return TrainJob.for_method("lora", model=str(folder), data=str(data_dir), name=NAME, resolution=res,
                               batch_size=batch, max_steps=steps, mixed_precision=precision, rank=rank, alpha=rank,
                               save_every=steps, preview_every=0, learning_rate=str(LR), seed=SEED, overwrite=True,
                               compile=compile)


def plain_block(folder, data_dir, captions, batch, rank, steps, device, amp, cuda, want_flops):
    cleanup(cuda)
    reset_peak(cuda)
    t0 = time.perf_counter()
    images = load_images(data_dir, device, torch.float16 if amp else torch.float32)
    trainer = PlainLoRA(folder, images, captions, batch, rank, device, amp)
    load_s = time.perf_counter() - t0
    stamps, losses = [], []
    for _ in range(steps):
        losses.append(trainer.step())
        stamps.append(time.perf_counter())
    out = {"load_s": load_s, "times": gaps(stamps), "peak_gib": peak_gib(cuda), "losses": losses,
           "wall_s": time.perf_counter() - t0, "trainable": trainer.trainable_count()}
    if want_flops:
        out["flops"] = trainer.model_flops()
    del trainer, images
    out["resident_after_gib"] = cleanup(cuda)
    return out


def studio_block(cfg, folder, data_dir, batch, rank, steps, res, precision, cuda, compile="off"):
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

    job = studio_job(folder, data_dir, batch, rank, steps, res, precision, compile)
    trainer = Trainer(cfg, on_progress=on_progress, on_event=on_event)
    t0 = time.perf_counter()
    result = trainer.start(job)
    wall = time.perf_counter() - t0
    if result.state != "finished":
        raise RuntimeError(f"studio training {result.state}: {result.message}")
    out = {"times": gaps(stamps), "peak_gib": peak_gib(cuda), "losses": result.losses, "wall_s": wall,
           # start() -> "encoding training images": data read, model load and cast, run folder, model hash
           "load_s": marks.get("encoding", t0) - t0,
           # latent caching, adapter, optimizer and accelerate set-up and the first step
           "cache_and_first_step_s": stamps[0] - marks.get("encoding", t0),
           # after the last step: final checkpoint, the LoRA file, status
           "finish_s": t0 + wall - stamps[-1], "run_dir": str(result.run_dir),
           "trainable_log": next((t for t in logs if "trainable parameters" in t), "")}
    del trainer, result
    out["resident_after_gib"] = cleanup(cuda)
    return out


def profile_plain(folder, data_dir, captions, batch, rank, device, amp, cuda) -> dict:
    cleanup(cuda)
    images = load_images(data_dir, device, torch.float16 if amp else torch.float32)
    trainer = PlainLoRA(folder, images, captions, batch, rank, device, amp)
    with profiler(cuda) as prof:
        for _ in range(PROFILE_WAIT + PROFILE_WARMUP + PROFILE_ACTIVE + 1):
            trainer.step()
            prof.step()
    del trainer, images
    cleanup(cuda)
    return profile_summary(prof)


def profile_studio(cfg, folder, data_dir, batch, rank, res, precision, cuda, compile="off") -> dict:
    from studio.train.loop import Trainer

    cleanup(cuda)
    steps = PROFILE_WAIT + PROFILE_WARMUP + PROFILE_ACTIVE + 1
    job = studio_job(folder, data_dir, batch, rank, steps, res, precision, compile)
    with profiler(cuda) as prof:
        result = Trainer(cfg, on_event=lambda kind, info: prof.step() if kind == "loss" else None).start(job)
    if result.state != "finished":
        raise RuntimeError(f"studio training {result.state}: {result.message}")
    del result
    cleanup(cuda)
    return profile_summary(prof)


# --- main --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per block")
    parser.add_argument("--rounds", type=int, default=3, help="blocks per contender and configuration")
    parser.add_argument("--ranks", default="4,64")
    parser.add_argument("--batches", default="4,1")
    parser.add_argument("--work", default=None, help="folder for the random model, dataset and studio home")
    parser.add_argument("--tiny", action="store_true", help="tiny random model at 64 px: checks the script")
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler pass after timing")
    parser.add_argument("--compile", default="off", choices=TRAIN_COMPILE_MODES, metavar="MODE",
                        help=f"also time the studio with TrainJob(compile=MODE) as '{COMPILED}' (CUDA only): "
                             f"{', '.join(TRAIN_COMPILE_MODES)}")
    args = parser.parse_args()
    import diffusers
    import peft
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    if args.steps <= WARMUP + 1:
        parser.error(f"--steps must be more than {WARMUP + 1} (the first {WARMUP} gaps are warm-up)")
    work = Path(args.work or tempfile.mkdtemp(prefix="studio-bench-lora-"))
    os.environ["STUDIO_HOME"] = str(work / "home")

    from studio.config import StudioConfig

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    amp = cuda
    precision = "fp16" if amp else "no"
    res = 64 if args.tiny else 512
    folder = build_tiny_folder(work / "tiny") if args.tiny else build_sd15_folder(work / "sd15-random")
    data_dir = make_dataset(work / f"data{res}", res)
    captions = read_captions(data_dir)
    cfg = StudioConfig.from_env(device="cuda" if cuda else "cpu")
    ranks = [int(r) for r in args.ranks.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    configs = [(r, b) for r in ranks for b in batches]
    compile = compile_mode(args.compile, cuda)

    env = environment()
    env["peft"] = peft.__version__
    card = env["device"]
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in card), None)
    matmul = matmul_tflops(cuda)
    digest = studio_train_digest()
    print(f"studio/train sources sha256 {digest}")
    print(f"device: {card}; peft {peft.__version__}; peak used for MFU: {peak} TFLOP/s; fp16 8192³ matmul "
          f"measured: {matmul and round(matmul, 1)} TFLOP/s", flush=True)
    results = {"env": env, "settings": {"resolution": res, "steps_per_block": args.steps, "rounds": args.rounds,
                                        "warmup_steps_skipped": WARMUP, "images": N_IMAGES, "tiny": args.tiny,
                                        "mixed_precision": precision, "learning_rate": LR, "targets": TARGETS,
                                        "compile": compile},
               "peak_tflops_used": peak, "matmul_fp16_tflops_measured": matmul, "studio_train_sha256": digest}
    t_start = time.perf_counter()
    for rank, batch in configs:
        key = f"r{rank}_bs{batch}"
        blocks = {"plain": [], "studio": [], **({COMPILED: []} if compile != "off" else {})}
        flops = None
        for r in range(args.rounds):
            p = plain_block(folder, data_dir, captions, batch, rank, args.steps, device, amp, cuda,
                            want_flops=(r == 0))
            flops = p.pop("flops", flops)
            blocks["plain"].append(p)
            print(f"{key} round {r + 1} plain : {batch / median(p['times']):6.2f} img/s "
                  f"{1 / median(p['times']):6.2f} steps/s, peak {p['peak_gib']:.2f} GiB, load {p['load_s']:.1f}s, "
                  f"{p['trainable']:,} trainable", flush=True)
            s = studio_block(cfg, folder, data_dir, batch, rank, args.steps, res, precision, cuda)
            blocks["studio"].append(s)
            print(f"{key} round {r + 1} studio: {batch / median(s['times']):6.2f} img/s "
                  f"{1 / median(s['times']):6.2f} steps/s, peak {s['peak_gib']:.2f} GiB, start() {s['wall_s']:.1f}s "
                  f"(load {s['load_s']:.1f}s, cache+first step {s['cache_and_first_step_s']:.1f}s, finish "
                  f"{s['finish_s']:.2f}s) [{s['trainable_log']}]", flush=True)
            if compile != "off":
                c = studio_block(cfg, folder, data_dir, batch, rank, args.steps, res, precision, cuda, compile)
                blocks[COMPILED].append(c)
                print(block_line(f"{key} round {r + 1}", COMPILED, batch, c), flush=True)
        step_flops, text_flops, vae_flops = flops
        entry = {"rank": rank, "batch": batch, "model_tflop_per_step": step_flops / 1e12,
                 "text_encoder_tflop_per_step": text_flops / 1e12, "vae_encode_tflop_per_image": vae_flops / 1e12}
        for name, runs in blocks.items():
            times = [t for b in runs for t in b["times"]]
            s_per_step = median(times)
            r = {"s_per_step": s_per_step, "steps_per_s": 1 / s_per_step, "images_per_s": batch / s_per_step,
                 "block_steps_per_s": [1 / median(b["times"]) for b in runs],
                 "peak_gib": max(b["peak_gib"] for b in runs), "tflops_per_s": step_flops / s_per_step / 1e12,
                 "final_loss": runs[-1]["losses"][-1], "blocks": runs}
            r["mfu_pct"] = 100 * r["tflops_per_s"] / peak if peak else None
            r["mfu_vs_matmul_pct"] = 100 * r["tflops_per_s"] / matmul if matmul else None
            entry[name] = r
        entry["ratio_studio_over_plain_steps_per_s"] = entry["studio"]["steps_per_s"] / entry["plain"]["steps_per_s"]
        if compile != "off":
            entry[COMPILED].update(compile_time(blocks), mode=compile)
            entry["ratio_compiled_over_plain_steps_per_s"] = (entry[COMPILED]["steps_per_s"]
                                                              / entry["plain"]["steps_per_s"])
            entry["ratio_compiled_over_studio_steps_per_s"] = (entry[COMPILED]["steps_per_s"]
                                                               / entry["studio"]["steps_per_s"])
            firsts = [round(x, 1) for x in entry[COMPILED]["cache_and_first_step_s_per_block"]]
            print(f"{key} {COMPILED}: compile {entry[COMPILED]['compile_s']:.1f}s extra in its first block "
                  f"(cache+first step per block {firsts})", flush=True)
        if not args.no_profile:  # after the timed blocks, so the profiler cannot disturb them
            entry["profile"] = {"plain": profile_plain(folder, data_dir, captions, batch, rank, device, amp, cuda),
                                "studio": profile_studio(cfg, folder, data_dir, batch, rank, res, precision, cuda)}
            if compile != "off":
                entry["profile"][COMPILED] = profile_studio(cfg, folder, data_dir, batch, rank, res, precision,
                                                            cuda, compile)
            for name, prof in entry["profile"].items():
                print(f"{key} profile {name:<6}: GPU {prof['gpu_ms_per_step']:.2f} ms/step, "
                      f"{prof['kernels_per_step']:.0f} kernels, {prof['syncs_per_step']:.1f} syncs, "
                      f"{prof['h2d_copies_per_step']:.1f} H2D copies per step; top: "
                      + ", ".join(f"{k[:40]} {v:.2f}" for k, v in list(prof["top_kernels_ms_per_step"].items())[:4]),
                      flush=True)
        results[key] = entry
        write_report("train_lora" + ("_tiny" if args.tiny else ""), results)  # kept if a later block is cut off
        print(f"[{time.perf_counter() - t_start:.0f}s since the first block]", flush=True)

    path = write_report("train_lora" + ("_tiny" if args.tiny else ""), results)
    width = 16 if compile == "off" else 28
    print(f"\n{'run':<{width}}{'steps/s':>9}{'img/s':>8}{'peak GiB':>10}{'TFLOP/s':>9}{'MFU %':>7}{'MFU/mm %':>9}"
          f"{'ratio':>7}")
    for rank, batch in configs:
        key = f"r{rank}_bs{batch}"
        entry = results[key]
        for name in ("plain", "studio", COMPILED):
            if name not in entry:
                continue
            r = entry[name]
            ratio = {"studio": entry["ratio_studio_over_plain_steps_per_s"],
                     COMPILED: entry.get("ratio_compiled_over_plain_steps_per_s")}.get(name, 1.0)
            mfu = f"{r['mfu_pct']:7.1f}" if r["mfu_pct"] is not None else f"{'-':>7}"
            mfu_mm = f"{r['mfu_vs_matmul_pct']:9.1f}" if r["mfu_vs_matmul_pct"] is not None else f"{'-':>9}"
            print(f"{name + ' ' + key:<{width}}{r['steps_per_s']:>9.2f}{r['images_per_s']:>8.1f}"
                  f"{r['peak_gib']:>10.2f}{r['tflops_per_s']:>9.1f}{mfu}{mfu_mm}{ratio:>7.3f}")
        if COMPILED in entry:
            c = entry[COMPILED]
            print(f"  {key} {COMPILED} ({c['mode']}): {entry['ratio_compiled_over_studio_steps_per_s']:.3f}x the "
                  f"eager studio's steps/s; compile {c['compile_s']:.1f}s in its first block; per-block steps/s "
                  f"{[round(x, 2) for x in c['block_steps_per_s']]}")
        print(f"  {key}: model (text encoder fwd + UNet fwd+bwd) {entry['model_tflop_per_step']:.3f} TFLOP/step "
              f"(text encoder {entry['text_encoder_tflop_per_step']:.4f}); VAE encode "
              f"{entry['vae_encode_tflop_per_image']:.3f} TFLOP/image (plain loop only); per-block steps/s plain "
              f"{[round(x, 2) for x in entry['plain']['block_steps_per_s']]}, studio "
              f"{[round(x, 2) for x in entry['studio']['block_steps_per_s']]}")
        for name, prof in entry.get("profile", {}).items():
            print(f"  {key} {name}: GPU busy {prof['gpu_ms_per_step']:.1f} ms of a "
                  f"{1e3 * entry[name]['s_per_step']:.1f} ms step; {prof['kernels_per_step']:.0f} kernels, "
                  f"{prof['syncs_per_step']:.1f} syncs per step")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
