"""ControlNet canny generation on the GPU, the studio's storyboard path vs plain StableDiffusionControlNetPipeline in
the same run: 512², 25 steps, DPM++ 2M Karras, CFG 7, batch 1, fp16, conditioning scale 1 (issue #10 item 4).
Usage: python bench/bench_controlnet.py [--repeats 5] [--work DIR] [--compile MODE] [--tiny]

Model: SD 1.5 architecture with random weights (bench.common.build_sd15_folder) and a ControlNet made from its UNet
with ControlNetModel.from_unet, its zero convolutions given PyTorch's default init (a fresh one adds exactly zero),
saved in fp16 as the diffusers folder controlnet/bench-canny in the studio home. The reference is a picture of
shapes drawn in code; its canny map (cv2.Canny 100/200, as diffusers' ControlNet docs make it) is plain's `image=`.
Contenders, all resident, timed round-robin after a warm-up call each (bench.common.round_robin):
- plain: the pipeline with DPMSolverMultistepScheduler(use_karras_sigmas=True), the canny map computed once, and
  the studio's starting noise passed as `latents` (so both start from the same noise; the pixel differences between
  their images are recorded).
- studio: StoryboardRunner.run(board, ["1"]), the storyboard tab's "regenerate this shot", for a one-shot board
  whose shot has the reference, a locked seed and 1 candidate. Each call validates the board, computes the canny
  map from the reference PNG, encodes the prompt, denoises through studio.generation.denoise with a Control, and writes the
  frame PNG (with infotext), canny.png and project.json: what a user pays.
- studio_denoise: only the studio.generation.denoise(..., control=Control(...)) call the runner makes per frame (prompt and
  canny map prepared once), to split the runner's own cost from the loop's.
- studio_compiled: `studio` on a ModelManager with compile=MODE (first call timed apart as compile time; its frame
  compared with the eager studio frame). The runner compiles the ControlNet as the UNet is compiled.
`--tiny` runs the same logic on the CPU with the tiny random model at 64 px, without compile or memory stats: a
check of the script, not a measurement."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_train_ti import build_tiny_folder  # noqa: E402
from bench.common import (  # noqa: E402
    build_sd15_folder,
    cfg_step_flops,
    environment,
    median,
    round_robin,
    sync,
    write_report,
)

PROMPT = "a lighthouse on a cliff at dusk, oil painting, highly detailed"
NEGATIVE = "blurry, lowres"
STEPS, CFG, SEED, SCALE, CANNY = 25, 7.0, 1234, 1.0, (100, 200)
CONTROLNET = "bench-canny"  # its folder name in the studio home's controlnet/


def draw_reference(path: Path, size: int) -> Path:
    """Shapes with clear edges: a house, a sun, a hill line and a tree."""
    s = size / 512
    im = Image.new("RGB", (size, size), (235, 230, 215))
    d = ImageDraw.Draw(im)
    d.rectangle([120 * s, 260 * s, 300 * s, 420 * s], fill=(170, 60, 50), outline="black", width=max(1, int(4 * s)))
    d.polygon([(100 * s, 260 * s), (210 * s, 160 * s), (320 * s, 260 * s)], fill=(90, 50, 40))
    d.ellipse([380 * s, 50 * s, 470 * s, 140 * s], fill=(240, 190, 40))
    d.line([(0, 440 * s), (200 * s, 400 * s), (512 * s, 460 * s)], fill=(30, 90, 40), width=max(1, int(6 * s)))
    d.rectangle([400 * s, 300 * s, 420 * s, 430 * s], fill=(80, 50, 30))
    d.ellipse([360 * s, 220 * s, 460 * s, 320 * s], fill=(40, 120, 50))
    im.save(path)
    return path


def plain_canny(reference: Path) -> Image.Image:
    import cv2

    edges = cv2.Canny(np.asarray(Image.open(reference).convert("RGB")), *CANNY)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def build_controlnet(model_folder: Path, out: Path, seed: int = 0) -> Path:
    from diffusers import ControlNetModel, UNet2DConditionModel

    if not (out / "config.json").is_file():
        unet = UNet2DConditionModel.from_pretrained(model_folder / "unet", dtype=torch.float32)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            cn = ControlNetModel.from_unet(unet)
            for block in [*cn.controlnet_down_blocks, cn.controlnet_mid_block]:
                block.reset_parameters()
        cn.to(torch.float16).save_pretrained(out)
    return out


def make_board(store, name: str, reference: Path, size: int):
    """A one-shot board: the shot's prompt is PROMPT itself (template "[description]"), with the reference."""
    from studio.storyboard.board import BoardSettings, Shot, ShotType, new_board

    board = new_board(name, BoardSettings(negative_prompt=NEGATIVE, sampler="DPM++ 2M", schedule="Karras",
                                          steps=STEPS, cfg_scale=CFG, width=size, height=size, candidates=1,
                                          controlnet=CONTROLNET))
    board.shot_types = [ShotType("bench", template="[description]")]
    board.shots = [Shot("1", "bench", PROMPT, seed=SEED, candidates=1, canny_low=CANNY[0], canny_high=CANNY[1],
                        control_scale=SCALE)]
    store.add_reference(board, board.shots[0], reference)
    store.save(board)
    return board


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", default=None, help="folder for the random models and the studio home (default: temp)")
    parser.add_argument("--compile", default="reduce-overhead", help="compile mode of studio_compiled "
                        "(studio.models.speed.COMPILE_MODES; 'off' leaves it out)")
    parser.add_argument("--tiny", action="store_true", help="tiny random model at 64 px on the CPU: checks the script")
    args = parser.parse_args()
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    work = Path(args.work or tempfile.mkdtemp(prefix="studio-bench-controlnet-"))
    os.environ["STUDIO_HOME"] = str(work / "home")

    from diffusers import ControlNetModel, DPMSolverMultistepScheduler, StableDiffusionControlNetPipeline
    from diffusers.image_processor import VaeImageProcessor

    from studio.config import StudioConfig
    from studio.generation.denoise import Control, DenoiseItem, denoise, initial_latents
    from studio.models import speed
    from studio.models.manager import ModelManager
    from studio.storyboard.board import StoryboardStore
    from studio.storyboard.runner import StoryboardRunner

    cuda = not args.tiny
    device, dtype, precision = ("cuda", torch.float16, "fp16") if cuda else ("cpu", torch.float32, "fp32")
    size = 512 if cuda else 64
    folder = build_sd15_folder(work / "sd15-random") if cuda else build_tiny_folder(work / "tiny")
    cfg = StudioConfig.from_env(device=device, precision=precision)
    cfg.ensure_dirs()
    cn_folder = build_controlnet(folder, cfg.controlnet_dir / CONTROLNET)
    reference = draw_reference(work / f"reference{size}.png", size)
    studio_call = ('StoryboardRunner.run(board, ["1"]): one shot, 1 candidate, with a reference; writes the frame '
                   "PNG, canny.png and project.json each call")
    results = {"env": {**environment(), **({} if cuda else {"device": "cpu (--tiny)"})},
               "settings": {"steps": STEPS, "cfg": CFG, "size": size, "sampler": "DPM++ 2M Karras", "batch": 1,
                            "dtype": precision, "controlnet_conditioning_scale": SCALE, "canny": CANNY,
                            "tiny": args.tiny, "studio_times": studio_call,
                            "studio_denoise_times": "studio.generation.denoise(..., control=Control(...)) alone, the runner's "
                                                    "per-frame call (prompt encoded and canny map made once)"}}

    # plain diffusers
    plain = StableDiffusionControlNetPipeline.from_pretrained(
        folder, controlnet=ControlNetModel.from_pretrained(cn_folder, dtype=dtype), dtype=dtype,
        safety_checker=None, requires_safety_checker=False).to(device)
    plain.set_progress_bar_config(disable=True)
    plain.scheduler = DPMSolverMultistepScheduler.from_config(plain.scheduler.config, use_karras_sigmas=True)
    canny = plain_canny(reference)
    flops_step = cfg_step_flops(plain.unet, plain.controlnet, latent=size // 8)

    # the studio's starting noise (fp32 draws on a CPU generator, then cast), given to plain as `latents`: diffusers
    # draws a CPU generator's noise in the pipeline's dtype, and torch's CPU normal sampler gives other numbers for
    # fp16 than for fp32 (torch 2.11: fp16 takes the scalar path, fp32 the vectorized one), so the same seed alone
    # would start them from different noise on the GPU
    noise = initial_latents(plain, [SEED], size, size)

    def plain_call():
        return plain(PROMPT, image=canny, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
                     width=size, height=size, controlnet_conditioning_scale=SCALE, latents=noise).images[0]

    # the studio: its own manager, runner (own ControlNet loader) and board per contender
    store = StoryboardStore(cfg.storyboards_dir)

    def studio(compile_mode: str, name: str):
        manager = ModelManager(StudioConfig.from_env(device=device, precision=precision, compile=compile_mode))
        manager.load(str(folder))
        runner = StoryboardRunner(manager, store, cfg.controlnet_dir)
        board = make_board(store, name, reference, size)
        return runner, board, lambda: runner.run(board, ["1"])

    def frame(board, result) -> np.ndarray:
        return np.asarray(Image.open(store.path(board.name) / result.shots[0].frames[0].file), dtype=np.int16)

    runner, board, studio_run = studio("off", "bench eager")
    eager = frame(board, studio_run())
    results["studio_image_std"] = float(eager.std())  # ~0 would mean a blank (e.g. NaN) image: diffs then say nothing
    # studio_denoise: the runner's per-frame denoise call, inputs prepared as StoryboardRunner._run_shot does
    model, shot = runner.manager.current, board.shots[0]
    with runner.manager.lock:
        cond, uncond, _ = runner.generator.encode(board.settings.job(board.prompt(shot), SEED), model)
    _, studio_canny = runner.control_image(board, shot)
    results["canny_studio_equals_plain"] = bool(np.array_equal(np.asarray(studio_canny), np.asarray(canny)))
    image = VaeImageProcessor(vae_scale_factor=model.pipe.vae_scale_factor, do_convert_rgb=True,
                              do_normalize=False).preprocess(studio_canny, height=size, width=size)
    loaded = runner.controlnets.load(CONTROLNET, model.pipe._execution_device, model.pipe.unet.dtype,
                                     model.pipe.unet.config.cross_attention_dim)
    control = Control(loaded.model, image, SCALE, 0.0, 1.0)

    def denoise_call():
        return denoise(model.pipe, [DenoiseItem(cond, uncond, CFG, SEED)], "DPM++ 2M", "Karras", STEPS, size, size,
                       control=control).images[0]

    results["studio_denoise_max_pixel_diff_vs_studio"] = int(np.abs(
        np.asarray(denoise_call(), dtype=np.int16) - eager).max())
    plain_image = np.asarray(plain_call(), dtype=np.int16)
    results["studio_max_pixel_diff_vs_plain"] = int(np.abs(plain_image - eager).max())
    # fp16 with random weights amplifies last-bit differences over 25 steps: the mean says how far apart they are,
    # and plain against itself says whether the GPU is deterministic at all
    results["studio_mean_pixel_diff_vs_plain"] = float(np.abs(plain_image - eager).mean())
    results["plain_max_pixel_diff_vs_plain"] = int(np.abs(np.asarray(plain_call(), dtype=np.int16) - plain_image).max())

    runs = {"plain": plain_call, "studio": studio_run, "studio_denoise": denoise_call}
    if cuda and args.compile != "off":
        compiled_runner, compiled_board, compiled_run = studio(args.compile, "bench compiled")
        t0 = time.perf_counter()
        compiled_run()  # the first call at a shape compiles: timed on its own
        sync()
        results["studio_compiled_first_call_s"] = time.perf_counter() - t0
        compiled_frame = frame(compiled_board, compiled_run())
        results["studio_compiled_max_pixel_diff_vs_eager"] = int(np.abs(compiled_frame - eager).max())
        results["studio_compiled_mean_pixel_diff_vs_eager"] = float(np.abs(compiled_frame - eager).mean())
        results["studio_compiled_controlnet_compiled"] = speed.compiled_as(
            compiled_runner.controlnets._last[1].model) is not None
        runs["studio_compiled"] = compiled_run

    times, activation_peak = round_robin(runs, args.repeats, cuda=cuda)
    weights_gib = sum(p.numel() * p.element_size() for m in (plain.unet, plain.controlnet, plain.vae,
                                                              plain.text_encoder) for p in m.parameters()) / 2**30
    results["weights_gib"] = weights_gib
    results["unet_controlnet_tflop_per_cfg_step"] = flops_step / 1e12
    for key in runs:
        s = median(times[key])
        # UNet + ControlNet work only (the 25 CFG passes; VAE decode and text encoder not counted)
        results[key] = {"s_per_image": s, "times": times[key], "steps_per_s": STEPS / s,
                        "peak_gib": weights_gib + activation_peak[key] if cuda else None,
                        "unet_controlnet_tflops_per_s": flops_step * STEPS / s / 1e12}
    for key in ("studio", "studio_denoise"):
        results[f"ratio_{key}_over_plain"] = results[key]["s_per_image"] / results["plain"]["s_per_image"]
    path = write_report("controlnet" + ("" if cuda else "_tiny"), results)

    print(f"{'run':<17}{'s/image':>9}{'steps/s':>9}{'peak GiB':>10}{'UNet+CN TFLOP/s':>17}")
    for key in runs:
        r = results[key]
        peak = f"{r['peak_gib']:>10.2f}" if cuda else f"{'-':>10}"
        print(f"{key:<17}{r['s_per_image']:>9.3f}{r['steps_per_s']:>9.1f}{peak}"
              f"{r['unet_controlnet_tflops_per_s']:>17.2f}")
    print(f"studio = {studio_call}")
    print(f"studio/plain {results['ratio_studio_over_plain']:.3f}; studio_denoise/plain "
          f"{results['ratio_studio_denoise_over_plain']:.3f}; UNet+ControlNet {flops_step / 1e12:.3f} TFLOP per CFG "
          f"step\nstudio image std {results['studio_image_std']:.1f}; max pixel diff: studio vs plain "
          f"{results['studio_max_pixel_diff_vs_plain']} (mean {results['studio_mean_pixel_diff_vs_plain']:.2f}), plain "
          f"vs plain {results['plain_max_pixel_diff_vs_plain']}, studio_denoise vs studio "
          f"{results['studio_denoise_max_pixel_diff_vs_studio']}; studio canny map == plain's cv2.Canny: "
          f"{results['canny_studio_equals_plain']}  -> {path}")
    if "studio_compiled" in runs:
        print(f"studio_compiled: {results['plain']['s_per_image'] / results['studio_compiled']['s_per_image']:.2f}x "
              f"plain; first call (compiling) {results['studio_compiled_first_call_s']:.1f} s; max pixel diff vs "
              f"eager studio {results['studio_compiled_max_pixel_diff_vs_eager']} (mean "
              f"{results['studio_compiled_mean_pixel_diff_vs_eager']:.2f}); ControlNet compiled too: "
              f"{results['studio_compiled_controlnet_compiled']}")


if __name__ == "__main__":
    main()
