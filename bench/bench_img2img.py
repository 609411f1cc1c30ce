"""Image to image, inpainting and hires fix on the GPU, studio vs plain diffusers in the same run, on random-weight
models of the released architectures (SD 1.5 at 512², or SDXL base at 1024² with --xl): 25 steps, DPM++ 2M Karras,
CFG 7, batch 1, fp16.

Contenders, all resident at once and timed round-robin (bench/common.py round_robin):
  plain_img2img     StableDiffusionImg2ImgPipeline (XL: StableDiffusionXLImg2ImgPipeline), strength 0.75
  studio_img2img    Generator.run with init_image and denoising_strength 0.75
  plain_inpaint     StableDiffusionInpaintPipeline (XL: StableDiffusionXLInpaintPipeline) on the same 4-channel UNet,
                    strength 1, the right half masked (latents blended each step)
  studio_inpaint    Generator.run with the same mask, mask blur 4, strength 1 (A1111's overlay included)
  studio_hires      (SD 1.5 only) text to image 512² then hires fix 2x (Latent, hires steps 0 = 25, denoising 0.5,
                    so 12 steps at 1024²): A1111's usual setting
  *_compiled        the studio with Compile UNet (StudioConfig compile=MODE), first calls timed apart, images checked
                    against eager

Usage: python bench/bench_img2img.py [--xl] [--repeats 3] [--work DIR] [--compile MODE]"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine has no network: never wait on the hub

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    build_sd15_folder,
    build_sdxl_folder,
    environment,
    median,
    round_robin,
    sync,
    write_report,
)

PROMPT = "a lighthouse on a cliff at dusk, oil painting, highly detailed"
NEGATIVE = "blurry, lowres"
STEPS, CFG, SEED, STRENGTH = 25, 7.0, 1234, 0.75


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--xl", action="store_true", help="SDXL base architecture at 1024² (default SD 1.5 at 512²)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=None)
    parser.add_argument("--compile", default="reduce-overhead", help="'off' leaves the compiled contenders out")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="studio-bench-"))
    os.environ["STUDIO_HOME"] = str(work / "home")

    from diffusers import (
        DPMSolverMultistepScheduler,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
    )

    from studio.config import StudioConfig
    from studio.generation.generate import Generator
    from studio.generation.job import GenerateJob
    from studio.models.manager import ModelManager

    size = 1024 if args.xl else 512
    folder = build_sdxl_folder(work / "sdxl-random", device="cuda") if args.xl else build_sd15_folder(work / "sd15")
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)).resize((size, size))
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 2, 0, size, size))
    results = {"env": environment(), "settings": {"steps": STEPS, "cfg": CFG, "size": size, "strength": STRENGTH,
                                                  "sampler": "DPM++ 2M Karras", "batch": 1, "dtype": "fp16",
                                                  "family": "sdxl" if args.xl else "sd1"}}

    def plain(cls):
        kwargs = {} if args.xl else {"safety_checker": None, "requires_safety_checker": False}
        p = cls.from_pretrained(folder, dtype=torch.float16, **kwargs).to("cuda")
        p.set_progress_bar_config(disable=True)
        p.scheduler = DPMSolverMultistepScheduler.from_config(p.scheduler.config, use_karras_sigmas=True)
        return p

    plain_i2i = plain(StableDiffusionXLImg2ImgPipeline if args.xl else StableDiffusionImg2ImgPipeline)
    plain_inp = plain(StableDiffusionXLInpaintPipeline if args.xl else StableDiffusionInpaintPipeline)

    def generator(compile_mode: str | None) -> Generator:
        extra = {"compile": compile_mode} if compile_mode else {}
        manager = ModelManager(StudioConfig.from_env(device="cuda", precision="fp16", **extra))
        manager.load(str(folder))
        manager.current.pipe.set_progress_bar_config(disable=True)
        return Generator(manager)

    gen = generator(None)
    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, sampler="DPM++ 2M", schedule="Karras", steps=STEPS,
                cfg_scale=CFG, seed=SEED, width=size, height=size)
    jobs = {"img2img": GenerateJob(**base, init_image=init, denoising_strength=STRENGTH),
            "inpaint": GenerateJob(**base, init_image=init, mask=mask, mask_blur=4, denoising_strength=1.0)}
    if not args.xl:
        jobs["hires"] = GenerateJob(**base, hires_fix=True, hires_scale=2.0, hires_upscaler="Latent",
                                    hires_denoising=0.5)

    def call(p, **kw):
        return lambda: p(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
                         image=init, generator=torch.Generator("cuda").manual_seed(SEED), **kw)

    runs = {"plain_img2img": call(plain_i2i, strength=STRENGTH),
            "studio_img2img": lambda: gen.run(jobs["img2img"]),
            "plain_inpaint": call(plain_inp, mask_image=mask, strength=1.0, width=size, height=size),
            "studio_inpaint": lambda: gen.run(jobs["inpaint"])}
    if "hires" in jobs:
        runs["studio_hires"] = lambda: gen.run(jobs["hires"])
    if args.compile != "off":
        compiled = generator(args.compile)
        for key, j in jobs.items():
            t0 = time.perf_counter()
            compiled.run(j)
            sync()
            results[f"studio_{key}_compiled_first_call_s"] = time.perf_counter() - t0
            eager_px = np.asarray(gen.run(j).images[0].image, dtype=np.int16)
            compiled_px = np.asarray(compiled.run(j).images[0].image, dtype=np.int16)
            results[f"studio_{key}_compiled_max_pixel_diff_vs_eager"] = int(np.abs(eager_px - compiled_px).max())
            runs[f"studio_{key}_compiled"] = (lambda j=j: compiled.run(j))
    times, activation_peak = round_robin(runs, args.repeats)
    for key in runs:
        results[key] = {"s_per_image": median(times[key]), "times": times[key], "activation_peak_gib":
                        activation_peak[key]}
    for kind in ("img2img", "inpaint"):
        for variant in ("", "_compiled"):
            key = f"studio_{kind}{variant}"
            if key in results:
                results[f"speedup_{kind}{variant}_vs_plain"] = (results[f"plain_{kind}"]["s_per_image"]
                                                                / results[key]["s_per_image"])
    path = write_report("img2img_xl" if args.xl else "img2img", results)
    print(f"{'run':<28}{'s/image':>9}")
    for key in runs:
        print(f"{key:<28}{results[key]['s_per_image']:>9.3f}")
    for key, value in results.items():
        if key.startswith(("speedup", "studio_")) and not isinstance(value, dict):
            print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
