"""Textual Inversion training on the GPU, studio vs a plain loop shaped like diffusers'
examples/textual_inversion, in the same run: 512², fp16 mixed precision, batch 4 and batch 1 (issue #10 item 5).
Usage: python bench/bench_train_ti.py [--steps 60] [--rounds 3] [--work DIR] [--tiny] [--no-profile]
       [--compile MODE]

Blocks alternate (plain bs4, studio bs4, plain bs4, studio bs4, ..., then the same at bs1): a Trainer run cannot
be interleaved step by step with another loop, so alternating blocks is the fairest order we have. Step times are
the gaps between consecutive steps' ends (the plain loop's `loss.item()`, the studio's "loss" event; both wait for
the GPU), the first few of each block skipped as warm-up; we quote medians over every block of a contender.
After the timed blocks, each contender runs once more under torch.profiler (GPU kernel time, kernels and syncs per
step) and once under cProfile (where the host's time goes); those runs are not timed.
`--tiny` runs the same logic with the tiny random model at 64 px (on the CPU when there is no GPU): a check of
the script at no device cost, not a measurement.
`--compile MODE` (default, max-autotune; CUDA only, skipped on the CPU) adds a third contender, *studio_compiled*:
the studio's Trainer with TrainJob(compile=MODE), in the same alternation (plain, studio, studio_compiled, ...).
Its first block pays the compile (dynamo keeps the graphs for the rest of the process, so later blocks reuse them):
that extra time is reported apart (`compile_s`), and its steps/s, like everyone's, skip each block's warm-up gaps."""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import build_sd15_folder, environment, median, sync, write_report  # noqa: E402
from studio.models.speed import TRAIN_COMPILE_MODES  # noqa: E402

N_IMAGES, WARMUP, SEED, LR, INIT_WORD = 8, 5, 0, 0.005, "*"
NAME = "bench-style"  # the studio's embedding name; the plain loop adds the token <bench-style>
# dense fp16 tensor rate per card for MFU: anchors.md's measured ~790 for the H200, the H100 SXM datasheet's
# 989. The same run also measures a large fp16 matmul, and MFU is given against both.
PEAK_TFLOPS = {"H200": 790.0, "H100": 989.0}
# style prompts in the spirit of the diffusers example's small style list (written here, not copied)
STYLE_TEMPLATES = [
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}", "a good painting in the style of {}",
    "a rendition in the style of {}", "a nice painting in the style of {}", "a small painting in the style of {}",
    "a weird painting in the style of {}", "a large painting in the style of {}",
]
CAPTION_WORDS = ["red", "blue", "green", "house", "tree", "river", "portrait", "mountain", "city", "night", "cat",
                 "boat", "field", "sky", "flowers", "street"]


# --- inputs ------------------------------------------------------------------------------------------------


def make_dataset(folder: Path, size: int, seed: int = SEED) -> Path:
    """N_IMAGES random RGB PNGs of size² with a .txt caption each."""
    from PIL import Image

    if len(list(folder.glob("*.png"))) == N_IMAGES:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(N_IMAGES):
        # smooth-ish noise (an upscaled random grid) so the PNGs are not all incompressible static
        small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(folder / f"img{i:02d}.png")
        words = rng.choice(CAPTION_WORDS, 3, replace=False)
        (folder / f"img{i:02d}.txt").write_text(f"a {words[0]} {words[1]} with a {words[2]}\n")
    return folder


def build_tiny_folder(folder: Path) -> Path:
    from studio.models.tiny import build_tiny_pipeline

    if not (folder / "model_index.json").is_file():
        build_tiny_pipeline("sd1").save_pretrained(folder)
    return folder


def load_images(folder: Path, device, dtype) -> torch.Tensor:
    """[N, 3, H, W] in [-1, 1] on the device: the plain loop's data, loaded once (no dataloader)."""
    from PIL import Image

    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1.0
              for p in sorted(folder.glob("*.png"))]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous().to(device, dtype)


# --- contender A: a plain loop shaped like diffusers' examples/textual_inversion -----------------------------


class PlainTI:
    """Placeholder token added to the tokenizer and the embedding matrix resized; the fp32 text encoder's input
    embedding weight is the only trainable tensor (AdamW on the whole matrix, every other row copied back after
    each step); UNet and VAE frozen in fp16; the batch VAE-encoded every step; DDPM noise; autocast; MSE loss."""

    def __init__(self, folder: Path, images: torch.Tensor, batch: int, device, amp: bool):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.device, self.amp, self.batch, self.images = device, amp, batch, images
        self.dtype = torch.float16 if amp else torch.float32
        self.tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=torch.float32)
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", dtype=self.dtype)
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", dtype=self.dtype)
        self.noise_scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(folder, subfolder="scheduler"))

        self.placeholder = f"<{NAME}>"
        if self.tokenizer.add_tokens(self.placeholder) != 1:
            raise RuntimeError(f"the tokenizer already knows {self.placeholder}")
        init_ids = self.tokenizer.encode(INIT_WORD, add_special_tokens=False)
        self.token_id = self.tokenizer.convert_tokens_to_ids(self.placeholder)
        self.text_encoder.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        embedding = self.text_encoder.get_input_embeddings()
        with torch.no_grad():
            embedding.weight[self.token_id] = embedding.weight[init_ids[0]].clone()

        self.vae.requires_grad_(False).to(device)
        self.unet.requires_grad_(False).to(device)
        self.text_encoder.requires_grad_(False)
        embedding.weight.requires_grad_(True)
        self.text_encoder.to(device).train()
        self.embedding = embedding
        self.optimizer = torch.optim.AdamW([embedding.weight], lr=LR, betas=(0.9, 0.999), weight_decay=1e-2,
                                           eps=1e-8)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp)
        self.original = embedding.weight.detach().clone()
        self.frozen_rows = torch.ones(len(self.tokenizer), dtype=torch.bool, device=device)
        self.frozen_rows[self.token_id] = False
        self.rng = random.Random(SEED)

    def _batch(self):
        idx = [self.rng.randrange(len(self.images)) for _ in range(self.batch)]
        texts = [self.rng.choice(STYLE_TEMPLATES).format(self.placeholder) for _ in idx]
        ids = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        return self.images[idx], ids.to(self.device)

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.amp)

    def _loss(self, latents, ids):
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                          device=self.device).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        with self._autocast():
            hidden = self.text_encoder(ids)[0].to(self.dtype)
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
        with torch.no_grad():  # only the placeholder's row may change
            self.embedding.weight[self.frozen_rows] = self.original[self.frozen_rows]
        return loss.item()  # the example logs it every step: one sync per step, as the studio's loss event

    def model_flops(self) -> tuple[float, float]:
        """(FLOPs of one step's text encoder + UNet forward and backward at this batch, FLOPs of one image's VAE
        encode), from torch's flop counter. The optimizer and the row restore are not counted."""
        from torch.utils.flop_counter import FlopCounterMode

        pixels, ids = self._batch()
        latents = self._encode(pixels)
        with FlopCounterMode(display=False) as counter:
            self._loss(latents, ids).backward()
        step = counter.get_total_flops()
        self.optimizer.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False) as counter:
            self._encode(pixels[:1])
        return step, counter.get_total_flops()


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


def gaps(stamps: list[float]) -> list[float]:
    """Seconds between consecutive step ends, the first WARMUP skipped."""
    return [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)][WARMUP:]


def plain_block(folder, data_dir, batch, steps, device, amp, cuda, res, want_flops):
    cleanup(cuda)
    reset_peak(cuda)
    t0 = time.perf_counter()
    images = load_images(data_dir, device, torch.float16 if amp else torch.float32)
    trainer = PlainTI(folder, images, batch, device, amp)
    load_s = time.perf_counter() - t0
    stamps, losses = [], []
    for _ in range(steps):
        losses.append(trainer.step())
        stamps.append(time.perf_counter())
    out = {"load_s": load_s, "times": gaps(stamps), "peak_gib": peak_gib(cuda), "losses": losses,
           "wall_s": time.perf_counter() - t0}
    if want_flops:
        out["flops"] = trainer.model_flops()
    del trainer, images
    out["resident_after_gib"] = cleanup(cuda)
    return out


def studio_block(cfg, folder, data_dir, batch, steps, res, precision, cuda, compile="off", extra=None):
    """One studio training run timed step by step; `extra` overrides TrainJob fields (method, memory settings)."""
    from studio.train.job import TrainJob
    from studio.train.loop import Trainer

    cleanup(cuda)
    reset_peak(cuda)
    marks: dict[str, float] = {}
    stamps: list[float] = []

    def on_event(kind, info):
        if kind == "loss":
            stamps.append(time.perf_counter())

    def on_progress(done, total, text):
        if text.startswith("encoding") and "encoding" not in marks:
            marks["encoding"] = time.perf_counter()

    fields = dict(model=str(folder), data=str(data_dir), name=NAME, resolution=res, batch_size=batch,
                  max_steps=steps, mixed_precision=precision, save_every=steps, preview_every=0,
                  learning_rate=str(LR), seed=SEED, overwrite=True, compile=compile)
    job = TrainJob(**{**fields, **(extra or {})})
    trainer = Trainer(cfg, on_progress=on_progress, on_event=on_event)
    t0 = time.perf_counter()
    result = trainer.start(job)
    wall = time.perf_counter() - t0
    if result.state != "finished":
        raise RuntimeError(f"studio training {result.state}: {result.message}")
    out = {"times": gaps(stamps), "peak_gib": peak_gib(cuda), "losses": result.losses, "wall_s": wall,
           # start() -> "encoding training images": data read, model load and cast, run folder, model hash
           "load_s": marks.get("encoding", t0) - t0,
           # latent caching, method and optimizer set-up and the first step
           "cache_and_first_step_s": stamps[0] - marks.get("encoding", t0),
           # after the last step: final checkpoint, embedding export, status
           "finish_s": t0 + wall - stamps[-1], "run_dir": str(result.run_dir)}
    del trainer, result
    out["resident_after_gib"] = cleanup(cuda)
    return out


PROFILE_WAIT, PROFILE_WARMUP, PROFILE_ACTIVE = 2, 3, 5


def profiler(cuda: bool):
    """torch.profiler over PROFILE_ACTIVE steps after PROFILE_WAIT + PROFILE_WARMUP (advanced by prof.step()
    at each step's end). Its overhead makes its wall times meaningless; we read only GPU time and counts."""
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    return profile(activities=activities, schedule=schedule(wait=PROFILE_WAIT, warmup=PROFILE_WARMUP,
                                                            active=PROFILE_ACTIVE, repeat=1))


def profile_summary(prof) -> dict:
    """Per step: GPU time (sum of kernel and copy durations), kernels launched, host-device syncs, copies
    host->device."""
    from torch.autograd import DeviceType

    events = prof.events()
    # GPU-side spans of user annotations (ProfilerStep#n) are not work: leave them out
    device = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
              and not e.name.startswith("ProfilerStep")]
    kernels = [e for e in device if "Memcpy" not in e.name and "Memset" not in e.name]
    n = PROFILE_ACTIVE
    return {"gpu_ms_per_step": sum(e.time_range.elapsed_us() for e in device) / 1e3 / n,
            "kernels_per_step": len(kernels) / n,
            "syncs_per_step": sum("Synchronize" in e.name for e in events) / n,
            "h2d_copies_per_step": sum("HtoD" in e.name for e in device) / n,
            "top_kernels_ms_per_step": top_kernels(kernels, n)}


def top_kernels(kernels, n: int, k: int = 8) -> dict[str, float]:
    total: dict[str, float] = {}
    for e in kernels:
        total[e.name[:90]] = total.get(e.name[:90], 0.0) + e.time_range.elapsed_us() / 1e3 / n
    return dict(sorted(total.items(), key=lambda kv: -kv[1])[:k])


def profile_plain(folder, data_dir, batch, device, amp, cuda) -> dict:
    cleanup(cuda)
    images = load_images(data_dir, device, torch.float16 if amp else torch.float32)
    trainer = PlainTI(folder, images, batch, device, amp)
    with profiler(cuda) as prof:
        for _ in range(PROFILE_WAIT + PROFILE_WARMUP + PROFILE_ACTIVE + 1):
            trainer.step()
            prof.step()
    del trainer, images
    cleanup(cuda)
    return profile_summary(prof)


def profile_studio(cfg, folder, data_dir, batch, res, precision, cuda, compile="off") -> dict:
    from studio.train.job import TrainJob
    from studio.train.loop import Trainer

    cleanup(cuda)
    steps = PROFILE_WAIT + PROFILE_WARMUP + PROFILE_ACTIVE + 1
    job = TrainJob(model=str(folder), data=str(data_dir), name=NAME, resolution=res, batch_size=batch,
                   max_steps=steps, mixed_precision=precision, save_every=steps, preview_every=0,
                   learning_rate=str(LR), seed=SEED, overwrite=True, compile=compile)
    with profiler(cuda) as prof:
        result = Trainer(cfg, on_event=lambda kind, info: prof.step() if kind == "loss" else None).start(job)
    if result.state != "finished":
        raise RuntimeError(f"studio training {result.state}: {result.message}")
    del result
    cleanup(cuda)
    return profile_summary(prof)


HOST_SKIP, HOST_STEPS = 10, 10  # host-side profile: cProfile over HOST_STEPS steps after HOST_SKIP


def host_summary(prof, steps: int) -> dict:
    """Host (Python) time per step from cProfile: the functions with most own time, and the cumulative time of
    the step's parts. cProfile slows Python-heavy code, so read the split, not the totals."""
    import pstats

    stats = pstats.Stats(prof).stats

    def label(key):
        filename, line, func = key
        return func if filename == "~" else f"{Path(filename).parent.name}/{Path(filename).name}:{func}"

    own = sorted(((label(k), v[2]) for k, v in stats.items()), key=lambda kv: -kv[1])[:15]
    cumulative: dict[str, float] = {}
    for k, v in stats.items():
        name = label(k)
        if any(part in name for part in HOST_PARTS):
            cumulative[name] = max(cumulative.get(name, 0.0), v[3])
    total = sum(v[2] for v in stats.values())
    return {"host_ms_per_step": 1e3 * total / steps,
            "own_ms_per_step": {k: 1e3 * v / steps for k, v in own},
            "cumulative_ms_per_step": {k: 1e3 * v / steps for k, v in sorted(cumulative.items(), key=lambda kv: -kv[1])}}


# the parts of a step whose cumulative host time we report (substrings of "folder/file.py:function")
HOST_PARTS = (
    "bench_train_ti.py:step", "bench_train_ti.py:_batch", "bench_train_ti.py:_encode", "bench_train_ti.py:_loss",
    "loop.py:_micro_step", "loop.py:_sample_latents", "loop.py:_progress",
    "run_folder.py:append_losses", "data.py:batch_indices", "data.py:batch_generator",
    "textual_inversion.py:encode", "textual_inversion.py:prompts", "conditioning.py:encode_batch",
    "conditioning.py:_pack", "conditioning.py:_encode_chunks", "conditioning.py:hook", "random.py:manual_seed",
    "unet_2d_condition.py:forward", "modeling_clip.py:forward", "autoencoder_kl.py:encode",
    "torch/_tensor.py:backward", "accelerate/accelerator.py:backward", "accelerate/accelerator.py:reduce",
    "accelerate/optimizer.py:step", "amp/grad_scaler.py:step", "amp/grad_scaler.py:update",
    "optim/optimizer.py:wrapper", "optim/adamw.py:step", "'item'",
)


def host_profile_plain(folder, data_dir, batch, device, amp, cuda) -> dict:
    import cProfile

    cleanup(cuda)
    images = load_images(data_dir, device, torch.float16 if amp else torch.float32)
    trainer = PlainTI(folder, images, batch, device, amp)
    for _ in range(HOST_SKIP):
        trainer.step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(HOST_STEPS):
        trainer.step()
    prof.disable()
    del trainer, images
    cleanup(cuda)
    return host_summary(prof, HOST_STEPS)


def host_profile_studio(cfg, folder, data_dir, batch, res, precision, cuda, compile="off") -> dict:
    import cProfile

    from studio.train.job import TrainJob
    from studio.train.loop import Trainer

    cleanup(cuda)
    steps = HOST_SKIP + HOST_STEPS + 1
    prof = cProfile.Profile()

    def on_event(kind, info):  # steps HOST_SKIP+1 .. HOST_SKIP+HOST_STEPS, loss event to loss event
        if kind == "loss" and info["step"] == HOST_SKIP:
            prof.enable()
        elif kind == "loss" and info["step"] == HOST_SKIP + HOST_STEPS:
            prof.disable()

    job = TrainJob(model=str(folder), data=str(data_dir), name=NAME, resolution=res, batch_size=batch,
                   max_steps=steps, mixed_precision=precision, save_every=steps, preview_every=0,
                   learning_rate=str(LR), seed=SEED, overwrite=True, compile=compile)
    result = Trainer(cfg, on_event=on_event).start(job)
    if result.state != "finished":
        raise RuntimeError(f"studio training {result.state}: {result.message}")
    del result
    cleanup(cuda)
    return host_summary(prof, HOST_STEPS)


COMPILED = "studio_compiled"


def compile_mode(requested: str, cuda: bool) -> str:
    """The --compile mode the run uses: off on the CPU (the studio compiles on CUDA only), said once."""
    if requested != "off" and not cuda:
        print(f"--compile {requested}: the {COMPILED} contender is skipped (compile is CUDA only)", flush=True)
        return "off"
    return requested


def block_line(key: str, name: str, batch: int, b: dict) -> str:
    """One block's console line: speed, peak memory and where start() spent its time."""
    return (f"{key} {name:<15}: {batch / median(b['times']):6.2f} img/s {1 / median(b['times']):6.2f} steps/s, "
            f"peak {b['peak_gib']:.2f} GiB, start() {b['wall_s']:.1f}s (load {b['load_s']:.1f}s, cache+first step "
            f"{b['cache_and_first_step_s']:.1f}s, finish {b['finish_s']:.2f}s)")


def compile_time(blocks: dict) -> dict:
    """What compiling cost, apart from the steps: the first compiled block's latent caching + first step beyond
    the eager studio's median, and its whole start() beyond the later compiled blocks' median (those reuse the
    compiled graphs; None with one round). Every compiled block's first-step time is listed: a later block that
    compiled again would show there."""
    eager = median([b["cache_and_first_step_s"] for b in blocks["studio"]])
    compiled = blocks[COMPILED]
    later = [b["wall_s"] for b in compiled[1:]]
    return {"compile_s": compiled[0]["cache_and_first_step_s"] - eager,
            "first_block_extra_wall_s": compiled[0]["wall_s"] - median(later) if later else None,
            "cache_and_first_step_s_per_block": [b["cache_and_first_step_s"] for b in compiled],
            "studio_cache_and_first_step_s_median": eager}


def studio_train_digest() -> str:
    """SHA-256 (first 12) of studio/train/*.py as measured: the trainer is being worked on, so the numbers
    belong to this exact source."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((Path(__file__).resolve().parent.parent / "studio" / "train").glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def matmul_tflops(cuda: bool) -> float | None:
    """A large fp16 matmul's rate on this card, now (the ceiling real code can reach)."""
    if not cuda:
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    sync()
    rate = 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e12
    del a, b
    cleanup(True)
    return rate


# --- main --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per block")
    parser.add_argument("--rounds", type=int, default=3, help="blocks per contender and batch size")
    parser.add_argument("--batches", default="4,1")
    parser.add_argument("--work", default=None, help="folder for the random model, dataset and studio home")
    parser.add_argument("--tiny", action="store_true", help="tiny random model at 64 px: checks the script")
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler pass after timing")
    parser.add_argument("--compile", default="off", choices=TRAIN_COMPILE_MODES, metavar="MODE",
                        help=f"also time the studio with TrainJob(compile=MODE) as '{COMPILED}' (CUDA only): "
                             f"{', '.join(TRAIN_COMPILE_MODES)}")
    args = parser.parse_args()
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    if args.steps <= WARMUP + 1:
        parser.error(f"--steps must be more than {WARMUP + 1} (the first {WARMUP} gaps are warm-up)")
    work = Path(args.work or tempfile.mkdtemp(prefix="studio-bench-ti-"))
    os.environ["STUDIO_HOME"] = str(work / "home")

    from studio.config import StudioConfig

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    amp = cuda
    precision = "fp16" if amp else "no"
    res = 64 if args.tiny else 512
    folder = build_tiny_folder(work / "tiny") if args.tiny else build_sd15_folder(work / "sd15-random")
    data_dir = make_dataset(work / f"data{res}", res)
    cfg = StudioConfig.from_env(device="cuda" if cuda else "cpu")
    batches = [int(b) for b in args.batches.split(",")]
    compile = compile_mode(args.compile, cuda)

    env = environment()
    card = env["device"]
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in card), None)
    matmul = matmul_tflops(cuda)
    print(f"studio/train sources sha256 {studio_train_digest()}")
    print(f"device: {card}; peak used for MFU: {peak} TFLOP/s; fp16 8192³ matmul measured: "
          f"{matmul and round(matmul, 1)} TFLOP/s", flush=True)
    results = {"env": env, "settings": {"resolution": res, "steps_per_block": args.steps, "rounds": args.rounds,
                                        "warmup_steps_skipped": WARMUP, "images": N_IMAGES, "tiny": args.tiny,
                                        "mixed_precision": precision, "learning_rate": LR, "compile": compile},
               "peak_tflops_used": peak, "matmul_fp16_tflops_measured": matmul,
               "studio_train_sha256": studio_train_digest()}
    for batch in batches:
        blocks = {"plain": [], "studio": [], **({COMPILED: []} if compile != "off" else {})}
        flops = None
        for r in range(args.rounds):
            p = plain_block(folder, data_dir, batch, args.steps, device, amp, cuda, res, want_flops=(r == 0))
            flops = p.pop("flops", flops)
            blocks["plain"].append(p)
            print(f"bs{batch} round {r + 1} plain : {batch / median(p['times']):6.2f} img/s "
                  f"{1 / median(p['times']):6.2f} steps/s, peak {p['peak_gib']:.2f} GiB, load {p['load_s']:.1f}s",
                  flush=True)
            s = studio_block(cfg, folder, data_dir, batch, args.steps, res, precision, cuda)
            blocks["studio"].append(s)
            print(f"bs{batch} round {r + 1} studio: {batch / median(s['times']):6.2f} img/s "
                  f"{1 / median(s['times']):6.2f} steps/s, peak {s['peak_gib']:.2f} GiB, start() {s['wall_s']:.1f}s "
                  f"(load {s['load_s']:.1f}s, cache+first step {s['cache_and_first_step_s']:.1f}s, finish "
                  f"{s['finish_s']:.1f}s)", flush=True)
            if compile != "off":
                c = studio_block(cfg, folder, data_dir, batch, args.steps, res, precision, cuda, compile)
                blocks[COMPILED].append(c)
                print(block_line(f"bs{batch} round {r + 1}", COMPILED, batch, c), flush=True)
        step_flops, vae_flops = flops
        entry = {"model_tflop_per_step": step_flops / 1e12, "vae_encode_tflop_per_image": vae_flops / 1e12}
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
            print(f"bs{batch} {COMPILED}: compile {entry[COMPILED]['compile_s']:.1f}s extra in its first block "
                  f"(cache+first step per block {firsts})", flush=True)
        if not args.no_profile:  # after the timed blocks, so the profiler cannot disturb them
            entry["profile"] = {"plain": profile_plain(folder, data_dir, batch, device, amp, cuda),
                                "studio": profile_studio(cfg, folder, data_dir, batch, res, precision, cuda)}
            if compile != "off":
                entry["profile"][COMPILED] = profile_studio(cfg, folder, data_dir, batch, res, precision, cuda,
                                                            compile)
            for name, prof in entry["profile"].items():
                print(f"bs{batch} profile {name:<6}: GPU {prof['gpu_ms_per_step']:.2f} ms/step, "
                      f"{prof['kernels_per_step']:.0f} kernels, {prof['syncs_per_step']:.1f} syncs, "
                      f"{prof['h2d_copies_per_step']:.1f} H2D copies per step; top: "
                      + ", ".join(f"{k[:40]} {v:.2f}" for k, v in list(prof["top_kernels_ms_per_step"].items())[:4]),
                      flush=True)
            entry["host_profile"] = {"plain": host_profile_plain(folder, data_dir, batch, device, amp, cuda),
                                     "studio": host_profile_studio(cfg, folder, data_dir, batch, res, precision, cuda)}
            if compile != "off":
                entry["host_profile"][COMPILED] = host_profile_studio(cfg, folder, data_dir, batch, res, precision,
                                                                      cuda, compile)
            for name, prof in entry["host_profile"].items():
                print(f"bs{batch} host {name}: {prof['host_ms_per_step']:.1f} ms/step under cProfile; parts: "
                      + ", ".join(f"{k} {v:.1f}" for k, v in prof["cumulative_ms_per_step"].items()), flush=True)
                print("   own time: " + ", ".join(f"{k} {v:.1f}" for k, v in prof["own_ms_per_step"].items()),
                      flush=True)
        results[f"bs{batch}"] = entry

    path = write_report("train_ti" + ("_tiny" if args.tiny else ""), results)
    width = 12 if compile == "off" else 24
    print(f"\n{'run':<{width}}{'steps/s':>9}{'img/s':>8}{'peak GiB':>10}{'TFLOP/s':>9}{'MFU %':>7}{'MFU/mm %':>9}"
          f"{'ratio':>7}")
    for batch in batches:
        entry = results[f"bs{batch}"]
        for name in ("plain", "studio", COMPILED):
            if name not in entry:
                continue
            r = entry[name]
            ratio = {"studio": entry["ratio_studio_over_plain_steps_per_s"],
                     COMPILED: entry.get("ratio_compiled_over_plain_steps_per_s")}.get(name, 1.0)
            mfu = f"{r['mfu_pct']:7.1f}" if r["mfu_pct"] is not None else f"{'-':>7}"
            mfu_mm = f"{r['mfu_vs_matmul_pct']:9.1f}" if r["mfu_vs_matmul_pct"] is not None else f"{'-':>9}"
            print(f"{name + ' bs' + str(batch):<{width}}{r['steps_per_s']:>9.2f}{r['images_per_s']:>8.1f}"
                  f"{r['peak_gib']:>10.2f}{r['tflops_per_s']:>9.1f}{mfu}{mfu_mm}{ratio:>7.3f}")
        if COMPILED in entry:
            c = entry[COMPILED]
            print(f"  bs{batch} {COMPILED} ({c['mode']}): {entry['ratio_compiled_over_studio_steps_per_s']:.3f}x the "
                  f"eager studio's steps/s; compile {c['compile_s']:.1f}s in its first block; per-block steps/s "
                  f"{[round(x, 2) for x in c['block_steps_per_s']]}")
        print(f"  bs{batch}: model (text encoder + UNet, fwd+bwd) {entry['model_tflop_per_step']:.3f} TFLOP/step; "
              f"VAE encode {entry['vae_encode_tflop_per_image']:.3f} TFLOP/image (plain loop only); per-block "
              f"steps/s plain {[round(x, 2) for x in entry['plain']['block_steps_per_s']]}, studio "
              f"{[round(x, 2) for x in entry['studio']['block_steps_per_s']]}")
        for name, prof in entry.get("profile", {}).items():
            print(f"  bs{batch} {name}: GPU busy {prof['gpu_ms_per_step']:.1f} ms of a "
                  f"{1e3 * entry[name]['s_per_step']:.1f} ms step; {prof['kernels_per_step']:.0f} kernels, "
                  f"{prof['syncs_per_step']:.1f} syncs per step")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
