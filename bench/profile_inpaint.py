"""Where studio inpainting spends its time against StableDiffusionInpaintPipeline (SD 1.5 architecture, random
weights, 512², 25 steps, the right half masked): torch.profiler's top CPU-side ops, and the syncs and copies of each.
Usage: python bench/profile_inpaint.py"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import build_sd15_folder, sync  # noqa: E402


def main() -> None:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionInpaintPipeline
    from torch.profiler import ProfilerActivity, profile

    from studio.config import StudioConfig
    from studio.generation.generate import Generator
    from studio.generation.job import GenerateJob
    from studio.models.manager import ModelManager

    work = Path(tempfile.mkdtemp(prefix="studio-prof-"))
    os.environ["STUDIO_HOME"] = str(work / "home")
    folder = build_sd15_folder(work / "sd15")
    size = 512
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).resize((size, size))
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 2, 0, size, size))
    plain = StableDiffusionInpaintPipeline.from_pretrained(folder, dtype=torch.float16, safety_checker=None,
                                                           requires_safety_checker=False).to("cuda")
    plain.set_progress_bar_config(disable=True)
    plain.scheduler = DPMSolverMultistepScheduler.from_config(plain.scheduler.config, use_karras_sigmas=True)
    manager = ModelManager(StudioConfig.from_env(device="cuda", precision="fp16"))
    manager.load(str(folder))
    gen = Generator(manager)
    job = GenerateJob(prompt="a lighthouse", negative_prompt="blurry", sampler="DPM++ 2M", schedule="Karras",
                      steps=25, cfg_scale=7.0, seed=1, width=size, height=size, init_image=init, mask=mask,
                      mask_blur=4, denoising_strength=1.0)
    runs = {"plain": lambda: plain("a lighthouse", negative_prompt="blurry", image=init, mask_image=mask,
                                   strength=1.0, num_inference_steps=25, guidance_scale=7.0, width=size,
                                   height=size, generator=torch.Generator("cuda").manual_seed(1)),
            "studio": lambda: gen.run(job)}
    for name, fn in runs.items():
        for _ in range(2):
            fn()
        sync()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            sync()
        print(f"=== {name}: {sorted(times)} s")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22))
        events = {e.key: e.count for e in prof.key_averages()}
        print({k: v for k, v in events.items() if "Synchronize" in k or "Memcpy" in k or "item" in k
               or "nonzero" in k})


if __name__ == "__main__":
    main()
