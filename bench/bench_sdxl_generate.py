"""SDXL generation on the GPU, studio vs plain diffusers in the same run: 1024², 25 steps, DPM++ 2M Karras, CFG 7,
batch 1, fp16, on a random-weight SDXL 1.0 base-architecture model built from assets/configs/sdxl.

Contenders, all resident at once and timed round-robin (bench/common.py round_robin):
  plain            StableDiffusionXLPipeline.from_pretrained(folder, fp16) with DPMSolverMultistepScheduler(Karras);
                   its VAE decodes as diffusers does (upcast to fp32: `force_upcast` in the bundled VAE config)
  studio           the same folder through ModelManager.load and Generator.run (DPM++ 2M, Karras)
  studio_compiled  the same with Compile UNet (StudioConfig compile=MODE); its first call, which compiles, is
                   timed apart and its image compared with the eager studio's

Usage: python bench/bench_sdxl_generate.py [--repeats 3] [--work DIR] [--compile MODE] [--tiny]
--tiny: the same code path on the built-in demo-tiny-xl model (saved as a folder) at 64², 3 steps, on the CPU
where there is no GPU: a smoke test, not a benchmark."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine has no network: never wait on the hub

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    build_sdxl_folder,
    environment,
    median,
    round_robin,
    sync,
    write_report,
)

PROMPT = "a lighthouse on a cliff at dusk, oil painting, highly detailed"
NEGATIVE = "blurry, lowres"
STEPS, CFG, SIZE, SEED = 25, 7.0, 1024, 1234
TINY_STEPS, TINY_SIZE = 3, 64


def build_tiny_xl_folder(folder: Path) -> Path:
    """demo-tiny-xl (studio.models.tiny) saved as a diffusers folder, so plain and studio load the same weights the
    way they load the real-size model."""
    from studio.models.tiny import build_tiny_xl_pipeline

    if not (folder / "model_index.json").is_file():
        build_tiny_xl_pipeline().save_pretrained(folder)
    return folder


def xl_cfg_step_flops(unet, latent: int) -> float:
    """FLOPs of one SDXL CFG step (UNet forward, batch 2, latent² of 4 channels, 77 tokens, pooled text and the six
    size numbers) from torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    like = {"device": unet.device, "dtype": unet.dtype}
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    x = torch.randn(2, unet.config.in_channels, latent, latent, **like)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, **like)
    added = {"text_embeds": torch.randn(2, pooled, **like),
             "time_ids": torch.tensor([[8 * latent, 8 * latent, 0, 0, 8 * latent, 8 * latent]] * 2, **like)}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, 999, encoder_hidden_states=text, added_cond_kwargs=added)
    return counter.get_total_flops()


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        return out[0]
    return getattr(out, "sample", out)


@contextmanager
def nonfinite_watch(modules: dict):
    """Yields a dict that holds, afterwards, {"calls": n, "nonfinite": k} for each of `modules` (name -> module):
    k of its n forward calls returned a NaN or inf. The flags stay on the device until the block ends (no sync per
    call); for untimed calls only."""
    flags = {name: [] for name in modules}
    handles = [module.register_forward_hook(
        lambda _m, _args, out, name=name: flags[name].append((~torch.isfinite(_first_tensor(out))).any()))
        for name, module in modules.items()]
    counts = {}
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()
        for name, fl in flags.items():
            counts[name] = {"calls": len(fl), "nonfinite": int(torch.stack(fl).sum()) if fl else 0}


def _bad(counts: dict) -> str:
    return ", ".join(f"{name} {c['nonfinite']}/{c['calls']}" for name, c in counts.items())


def _baseline(key: str) -> str:
    """The plain contender a run is compared with: plain with the same LoRAs."""
    return "plain_two_loras" if key.endswith("two_loras") else "plain"


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def make_sdxl_lora(pipe, path: Path, rank: int, seed: int) -> Path:
    """A kohya SDXL LoRA (original UNet names, lora_te1_/lora_te2_) on every UNet attention projection and the text
    encoders' q/k/v/out, small random weights: what an SDXL style LoRA from kohya_ss touches."""
    from studio.files.convert import original_unet_module_names
    from studio.files.networks import LoraLayer, save_kohya_lora

    g = torch.Generator().manual_seed(seed)

    def layers(model, ends):
        return {name: LoraLayer(torch.randn(rank, m.in_features, generator=g) * 0.01,
                                torch.randn(m.out_features, rank, generator=g) * 0.01, float(rank))
                for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name.endswith(ends)}

    te = ("q_proj", "k_proj", "v_proj", "out_proj")
    return save_kohya_lora(path, layers(pipe.unet, ("to_q", "to_k", "to_v", "to_out.0")), layers(pipe.text_encoder, te),
                           text_encoder_2=layers(pipe.text_encoder_2, te),
                           unet_names=original_unet_module_names(pipe.unet))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=None, help="folder for the random model (default: a temp folder, removed "
                        "at the end); a folder given here keeps the model for the next run")
    parser.add_argument("--compile", default="reduce-overhead", help="compile mode of the studio_compiled contender "
                        "(studio.models.speed.COMPILE_MODES; 'off' leaves it out)")
    parser.add_argument("--no-loras", action="store_true", help="leave out the two-LoRA contenders")
    parser.add_argument("--tiny", action="store_true", help=f"smoke test: demo-tiny-xl at {TINY_SIZE}², "
                        f"{TINY_STEPS} steps (on the CPU where there is no GPU)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        parser.error("the SDXL benchmark needs a CUDA GPU; --tiny runs the same code path on the CPU")
    device = "cuda" if cuda else "cpu"
    dtype, precision = (torch.float16, "fp16") if cuda else (torch.float32, "fp32")  # no fp16 on the CPU
    steps, size = (TINY_STEPS, TINY_SIZE) if args.tiny else (STEPS, SIZE)
    temp_work = args.work is None
    work = Path(args.work or tempfile.mkdtemp(prefix="studio-bench-sdxl-"))
    os.environ["STUDIO_HOME"] = str(work / "home")
    try:
        run(args, work, device, cuda, dtype, precision, steps, size)
    finally:
        if temp_work:
            shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path, device: str, cuda: bool, dtype: torch.dtype, precision: str, steps: int,
        size: int) -> None:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline

    from studio.config import StudioConfig
    from studio.generation.denoise import initial_latents
    from studio.generation.generate import Generator
    from studio.generation.job import GenerateJob
    from studio.models.manager import ModelManager
    from studio.models.speed import check_compile_mode

    compile_mode = check_compile_mode(args.compile)
    if compile_mode != "off" and not cuda:
        print(f"--compile {compile_mode}: the studio compiles the UNet on CUDA only; studio_compiled left out")
        compile_mode = "off"
    t0 = time.perf_counter()
    if args.tiny:
        folder = build_tiny_xl_folder(work / "demo-tiny-xl")
    else:
        try:  # weights drawn on the GPU: seconds, where 16 CPU cores take a minute or two
            folder = build_sdxl_folder(work / "sdxl-random", device=device)
        except Exception as e:  # a one-shot GPU run should not end here: the CPU builds the same architecture
            print(f"building on {device} failed ({type(e).__name__}: {e}); building on the CPU", flush=True)
            folder = build_sdxl_folder(work / "sdxl-random", device="cpu")
        if cuda:
            torch.cuda.empty_cache()
    build_s = time.perf_counter() - t0
    results = {"env": environment(),
               "settings": {"model": "demo-tiny-xl" if args.tiny else "SDXL 1.0 base architecture, random weights",
                            "steps": steps, "cfg": CFG, "size": size, "sampler": "DPM++ 2M Karras", "batch": 1,
                            "dtype": precision, "device": device, "repeats": args.repeats,
                            "compile": compile_mode, "tiny": args.tiny},
               "build_s": build_s}
    name = "sdxl_generate_tiny" if args.tiny else "sdxl_generate"
    print(f"model folder ready in {build_s:.1f} s: {folder}", flush=True)

    # every contender resident at once, timed round-robin (these runs drift with the machine; interleaving is
    # what makes the ratios fair)
    t0 = time.perf_counter()
    plain = StableDiffusionXLPipeline.from_pretrained(folder, dtype=dtype, add_watermarker=False,
                                                      local_files_only=True).to(device)
    plain.set_progress_bar_config(disable=True)
    plain.scheduler = DPMSolverMultistepScheduler.from_config(plain.scheduler.config, use_karras_sigmas=True)
    manager = ModelManager(StudioConfig.from_env(device=device, precision=precision))
    manager.load(str(folder))
    gen = Generator(manager)
    compiled_gen = None
    if compile_mode != "off":
        compiled_manager = ModelManager(StudioConfig.from_env(device=device, precision=precision,
                                                              compile=compile_mode))
        compiled_manager.load(str(folder))
        compiled_gen = Generator(compiled_manager)
    lora_runs = {}
    if not args.no_loras:
        # two rank-16 kohya SDXL LoRAs: plain diffusers loads them with load_lora_weights and weights them with
        # set_adapters (per-layer low-rank matmuls every step); the studio merges their deltas into the weights
        loras_cfg = StudioConfig.from_env(device=device, precision=precision).with_home(work / "home")
        loras_cfg.ensure_dirs()
        for i, lora in enumerate(("style_a", "style_b")):
            make_sdxl_lora(plain, loras_cfg.loras_dir / f"{lora}.safetensors", 16, i)
        plain_loras = StableDiffusionXLPipeline.from_pretrained(folder, dtype=dtype, add_watermarker=False,
                                                                local_files_only=True).to(device)
        plain_loras.set_progress_bar_config(disable=True)
        plain_loras.scheduler = DPMSolverMultistepScheduler.from_config(plain_loras.scheduler.config,
                                                                        use_karras_sigmas=True)
        for lora in ("style_a", "style_b"):
            plain_loras.load_lora_weights(str(loras_cfg.loras_dir / f"{lora}.safetensors"), adapter_name=lora)
        plain_loras.set_adapters(["style_a", "style_b"], [0.7, 0.4])
        lora_manager = ModelManager(loras_cfg)
        lora_manager.load(str(folder))
        lora_gen = Generator(lora_manager)
        lora_job = GenerateJob(prompt=PROMPT + " <lora:style_a:0.7> <lora:style_b:0.4>", negative_prompt=NEGATIVE,
                               sampler="DPM++ 2M", schedule="Karras", steps=steps, cfg_scale=CFG, seed=SEED,
                               width=size, height=size)
        lora_runs = {
            "plain_two_loras": lambda: plain_loras(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps,
                                                   guidance_scale=CFG, width=size, height=size,
                                                   generator=torch.Generator(device).manual_seed(SEED)),
            "studio_two_loras": lambda: lora_gen.run(lora_job),
        }
    results["load_s"] = time.perf_counter() - t0
    print(f"contenders loaded in {results['load_s']:.1f} s", flush=True)
    flops_step = xl_cfg_step_flops(plain.unet, size // plain.vae_scale_factor)
    job = GenerateJob(prompt=PROMPT, negative_prompt=NEGATIVE, sampler="DPM++ 2M", schedule="Karras", steps=steps,
                      cfg_scale=CFG, seed=SEED, width=size, height=size)

    def plain_call(latents=None):
        return plain(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=CFG, width=size,
                     height=size, generator=torch.Generator(device).manual_seed(SEED), latents=latents)

    # same seed, same image: plain gets the studio's initial noise (drawn on the CPU generator; plain diffusers
    # draws it on the device's when timed). Untimed; NaN/inf in the UNet's or the VAE decoder's outputs counted
    t0 = time.perf_counter()
    with nonfinite_watch({"unet": plain.unet, "vae_decoder": plain.vae.decoder}) as plain_bad:
        plain_img = plain_call(initial_latents(plain, [SEED], size, size)).images[0]
    studio_pipe = manager.current.pipe
    with nonfinite_watch({"unet": studio_pipe.unet, "vae_decoder": studio_pipe.vae.decoder}) as studio_bad:
        studio_img = gen.run(job).images[0].image  # its first call also hashes the folder (model_hash)
    results["max_pixel_diff_studio_vs_plain"] = int(np.abs(pixels(plain_img) - pixels(studio_img)).max())
    results["nonfinite_calls"] = {"plain": plain_bad, "studio": studio_bad}
    results["first_calls_s"] = time.perf_counter() - t0
    write_report(name, results)  # what is known so far, should a later stage run out of time
    print(f"plain vs studio, same seed: max pixel diff {results['max_pixel_diff_studio_vs_plain']} (pixel std "
          f"{pixels(plain_img).std():.1f}); calls with NaN/inf outputs: plain {_bad(plain_bad)}, studio "
          f"{_bad(studio_bad)}", flush=True)

    runs = {"plain": lambda: plain_call(), "studio": lambda: gen.run(job)}
    if compiled_gen is not None:
        # the first call at a shape compiles: timed on its own, then its image is checked against eager's
        t0 = time.perf_counter()
        compiled_gen.run(job)
        sync()
        results["studio_compiled_first_call_s"] = time.perf_counter() - t0
        compiled_img = compiled_gen.run(job).images[0].image
        results["studio_compiled_max_pixel_diff_vs_eager"] = int(np.abs(pixels(studio_img)
                                                                         - pixels(compiled_img)).max())
        write_report(name, results)
        print(f"studio_compiled first call (compiling) {results['studio_compiled_first_call_s']:.1f} s; max pixel "
              f"diff vs eager studio {results['studio_compiled_max_pixel_diff_vs_eager']}", flush=True)
        runs["studio_compiled"] = lambda: compiled_gen.run(job)
    runs.update(lora_runs)
    t0 = time.perf_counter()
    times, activation_peak = round_robin(runs, args.repeats, cuda=cuda)
    results["round_robin_s"] = time.perf_counter() - t0
    weights_gib = sum(p.numel() * p.element_size() for m in (plain.unet, plain.vae, plain.text_encoder,
                                                             plain.text_encoder_2) for p in m.parameters()) / 2**30
    results["weights_gib"] = weights_gib
    results["unet_tflop_per_cfg_step"] = flops_step / 1e12
    for key in runs:
        s = median(times[key])
        results[key] = {"s_per_image": s, "times": times[key], "steps_per_s": steps / s,
                        # weights of one model + the most its call held above what was resident before it
                        "peak_gib": weights_gib + activation_peak[key] if cuda else None,
                        # UNet work only (the CFG passes dominate; text encoders and VAE decode not counted)
                        "unet_tflops_per_s": flops_step * steps / s / 1e12,
                        "ratio_s_over_plain": s / median(times[_baseline(key)]),
                        "speedup_vs_plain": median(times[_baseline(key)]) / s}
    results["ratio_studio_over_plain"] = results["studio"]["ratio_s_over_plain"]
    path = write_report(name, results)

    labels = {"plain": "plain diffusers", "studio": "studio (eager)", "studio_compiled": "studio compiled",
              "plain_two_loras": "plain diffusers, two LoRAs (`set_adapters`)",
              "studio_two_loras": "studio (eager), two LoRAs"}
    print()
    print(f"{'tiny smoke test: ' if args.tiny else ''}{size}², {steps} steps, DPM++ 2M Karras, CFG {CFG:g}, batch 1, "
          f"{precision}, {results['env']['device'] or device}, {args.repeats} round-robin rounds, medians")
    print()
    print("| run | median s / image | steps/s | peak GiB | UNet TFLOP/s | vs plain |")
    print("|---|---|---|---|---|---|")
    for key in runs:
        r = results[key]
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
        print(f"| {labels[key]} | {r['s_per_image']:.3f} | {r['steps_per_s']:.1f} | {peak} | "
              f"{r['unet_tflops_per_s']:.3g} | {r['speedup_vs_plain']:.2f}× |")
    print()
    print(f"weights {weights_gib:.2f} GiB; one CFG step {results['unet_tflop_per_cfg_step']:.3g} TFLOP; studio/plain "
          f"s per image {results['ratio_studio_over_plain']:.3f}; max pixel diff studio vs plain "
          f"{results['max_pixel_diff_studio_vs_plain']}" + (
              f"; compiled vs eager {results['studio_compiled_max_pixel_diff_vs_eager']}, first call "
              f"{results['studio_compiled_first_call_s']:.1f} s" if "studio_compiled" in runs else ""))
    if any(c["nonfinite"] for v in results["nonfinite_calls"].values() for c in v.values()):
        print("note: NaN/inf outputs with these random weights (counts above); the timings stand, the images and "
              "their pixel differences do not mean anything")
    print(f"build {build_s:.1f} s, load {results['load_s']:.1f} s, round robin {results['round_robin_s']:.1f} s "
          f"-> {path}")


if __name__ == "__main__":
    main()
