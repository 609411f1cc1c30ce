"""Two ControlNets at once on the GPU, studio Generate vs plain StableDiffusionControlNetPipeline with a list of two
ControlNets (MultiControlNetModel) in the same run: SD 1.5 architecture with random weights, 512², 25 steps,
DPM++ 2M Karras, CFG 7, batch 1, fp16 (issue 23, "Speed").

Both ControlNets are made from the random UNet with ControlNetModel.from_unet (zero convolutions given PyTorch's
default init), saved as folders in the studio home's controlnet/. The control maps are two drawn pictures used as
finished maps (preprocessor "none"), so the contenders differ only in how they run the ControlNets.
Contenders, resident at once and timed round-robin (bench.common.round_robin): plain; studio (Generator.run with two
ControlUnits: the maps read, fitted and checked each call, the PNG's infotext built); studio compiled (Compile UNet
reduce-overhead: the ControlNets compiled as the UNet is). Usage: python bench/bench_multi_control.py [--repeats 3]"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import build_sd15_folder, environment, median, round_robin, sync, write_report  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, oil painting, highly detailed"
NEGATIVE = "blurry, lowres"
STEPS, CFG, SEED, SIZE = 25, 7.0, 1234, 512


def maps(folder: Path) -> list[Path]:
    a = Image.new("RGB", (SIZE, SIZE), "black")
    ImageDraw.Draw(a).rectangle((100, 120, 400, 460), outline="white", width=6)
    b = Image.new("RGB", (SIZE, SIZE), "black")
    ImageDraw.Draw(b).ellipse((200, 40, 480, 320), fill=(170, 170, 170))
    paths = [folder / "edges.png", folder / "depth.png"]
    for image, path in zip((a, b), paths, strict=True):
        image.save(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", default="reduce-overhead")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="studio-bench-"))
    os.environ["STUDIO_HOME"] = str(work / "home")

    from diffusers import ControlNetModel, DPMSolverMultistepScheduler, StableDiffusionControlNetPipeline

    from studio.config import StudioConfig
    from studio.generation.controls import ControlUnit
    from studio.generation.generate import Generator
    from studio.generation.job import GenerateJob
    from studio.models.manager import ModelManager

    folder = build_sd15_folder(work / "sd15")
    cfg = StudioConfig.from_env(device="cuda", precision="fp16")
    cfg.ensure_dirs()
    nets = []
    for seed, name in ((1, "edges"), (2, "depth")):
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(folder / "unet")
        torch.manual_seed(seed)
        net = ControlNetModel.from_unet(unet)
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d) and module.weight.abs().sum() == 0:
                module.reset_parameters()
        net.to(torch.float16).save_pretrained(cfg.controlnet_dir / name)
        nets.append(ControlNetModel.from_pretrained(cfg.controlnet_dir / name, dtype=torch.float16).to("cuda"))
    pictures = maps(work)
    plain = StableDiffusionControlNetPipeline.from_pretrained(folder, controlnet=nets, dtype=torch.float16,
                                                              safety_checker=None,
                                                              requires_safety_checker=False).to("cuda")
    plain.set_progress_bar_config(disable=True)
    plain.scheduler = DPMSolverMultistepScheduler.from_config(plain.scheduler.config, use_karras_sigmas=True)
    images = [Image.open(p).convert("RGB") for p in pictures]

    def generator(compile_mode: str | None) -> Generator:
        extra = {"compile": compile_mode} if compile_mode else {}
        manager = ModelManager(StudioConfig.from_env(device="cuda", precision="fp16", **extra))
        manager.load(str(folder))
        return Generator(manager)

    units = [ControlUnit("edges", pictures[0], "none", 1.0), ControlUnit("depth", pictures[1], "none", 0.8)]
    job = GenerateJob(prompt=PROMPT, negative_prompt=NEGATIVE, sampler="DPM++ 2M", schedule="Karras", steps=STEPS,
                      cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE, controls=units)
    gen = generator(None)
    runs = {"plain": lambda: plain(PROMPT, negative_prompt=NEGATIVE, image=images, num_inference_steps=STEPS,
                                   guidance_scale=CFG, controlnet_conditioning_scale=[1.0, 0.8],
                                   generator=torch.Generator("cuda").manual_seed(SEED)),
            "studio": lambda: gen.run(job)}
    results = {"env": environment(), "settings": {"steps": STEPS, "cfg": CFG, "size": SIZE, "controlnets": 2}}
    if args.compile != "off":
        compiled = generator(args.compile)
        t0 = time.perf_counter()
        compiled.run(job)
        sync()
        results["studio_compiled_first_call_s"] = time.perf_counter() - t0
        eager_px = np.asarray(gen.run(job).images[0].image, dtype=np.int16)
        compiled_px = np.asarray(compiled.run(job).images[0].image, dtype=np.int16)
        results["studio_compiled_max_pixel_diff_vs_eager"] = int(np.abs(eager_px - compiled_px).max())
        runs["studio_compiled"] = lambda: compiled.run(job)
    times, peaks = round_robin(runs, args.repeats)
    for key in runs:
        results[key] = {"s_per_image": median(times[key]), "times": times[key], "activation_peak_gib": peaks[key]}
    for key in runs:
        if key != "plain":
            results[f"speedup_{key}_vs_plain"] = results["plain"]["s_per_image"] / results[key]["s_per_image"]
    path = write_report("multi_control", results)
    for key in runs:
        print(f"{key:<18}{results[key]['s_per_image']:>8.3f} s  {[round(t, 3) for t in times[key]]}")
    for key, value in results.items():
        if key.startswith(("speedup", "studio_compiled_")):
            print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
