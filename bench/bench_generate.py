"""Generation on the GPU, studio vs plain diffusers in the same run: 512², 25 steps, DPM++ 2M Karras, CFG 7,
batch 1 or more (issue #10 items 1, 3 and 7; issue 25). The studio's default path replays the UNet from CUDA graphs
(studio.models.cuda_graphs); *studio_no_graphs* is its plain eager loop.
Usage: python bench/bench_generate.py [--repeats 5] [--batch 1] [--work DIR] [--compile MODE]"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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
STEPS, CFG, SIZE, SEED = 25, 7.0, 512, 1234


def make_kohya_lora(unet, text_encoder, path: Path, rank: int, seed: int) -> Path:
    """A kohya-format LoRA on every attention projection (UNet) and q/k/v/out (text encoder)."""
    from safetensors.torch import save_file

    from studio.files.networks import kohya_name

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for component, model, ends in (("unet", unet, ("to_q", "to_k", "to_v", "to_out.0")),
                                   ("text_encoder", text_encoder, ("q_proj", "k_proj", "v_proj", "out_proj"))):
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(ends):
                base = kohya_name(component, name)
                tensors[f"{base}.lora_down.weight"] = (torch.randn(rank, module.in_features, generator=g) * 0.01).half()
                tensors[f"{base}.lora_up.weight"] = (torch.randn(module.out_features, rank, generator=g) * 0.01).half()
                tensors[f"{base}.alpha"] = torch.tensor(float(rank)).half()
    save_file(tensors, str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1, help="images per pass (batch size)")
    parser.add_argument("--work", default=None, help="folder for the random model and LoRAs (default: temp)")
    parser.add_argument("--compile", default="reduce-overhead", help="compile mode of the studio_compiled contenders "
                        "(studio.models.speed.COMPILE_MODES; 'off' leaves them out)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="studio-bench-"))
    os.environ["STUDIO_HOME"] = str(work / "home")

    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from studio.config import StudioConfig
    from studio.generation.generate import Generator
    from studio.generation.job import GenerateJob
    from studio.models.manager import ModelManager

    folder = build_sd15_folder(work / "sd15-random")
    batch = args.batch
    results = {"env": environment(), "settings": {"steps": STEPS, "cfg": CFG, "size": SIZE, "sampler":
                                                  "DPM++ 2M Karras", "batch": batch, "dtype": "fp16"}}

    # every contender resident on the GPU at once, timed round-robin: these runs are launch-bound and the
    # machine's speed drifts by tens of percent over a minute, so interleaving is what makes ratios fair
    def plain_pipe():
        p = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float16, safety_checker=None,
                                                    requires_safety_checker=False).to("cuda")
        p.set_progress_bar_config(disable=True)
        p.scheduler = DPMSolverMultistepScheduler.from_config(p.scheduler.config, use_karras_sigmas=True)
        return p

    plain, plain_lora = plain_pipe(), plain_pipe()
    flops_step = cfg_step_flops(plain.unet)
    loras_dir = work / "home" / "loras"
    loras_dir.mkdir(parents=True, exist_ok=True)
    a = make_kohya_lora(plain.unet, plain.text_encoder, loras_dir / "style_a.safetensors", 16, 1)
    b = make_kohya_lora(plain.unet, plain.text_encoder, loras_dir / "style_b.safetensors", 16, 2)
    plain_lora.load_lora_weights(str(a), adapter_name="a")
    plain_lora.load_lora_weights(str(b), adapter_name="b")
    plain_lora.set_adapters(["a", "b"], [0.7, 0.4])

    cfg = StudioConfig.from_env(device="cuda", precision="fp16")
    manager = ModelManager(cfg)
    manager.load(str(folder))
    manager.current.pipe.set_progress_bar_config(disable=True)
    gen = Generator(manager)
    eager_manager = ModelManager(replace(cfg, cuda_graphs=False))
    eager_manager.load(str(folder))
    eager_gen = Generator(eager_manager)
    compiled_gen = None
    if args.compile != "off":
        compiled_manager = ModelManager(StudioConfig.from_env(device="cuda", precision="fp16", compile=args.compile))
        compiled_manager.load(str(folder))
        compiled_manager.current.pipe.set_progress_bar_config(disable=True)
        compiled_gen = Generator(compiled_manager)
    job = GenerateJob(prompt=PROMPT, negative_prompt=NEGATIVE, sampler="DPM++ 2M", schedule="Karras", steps=STEPS,
                      cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE, batch_size=batch)
    lora_job = GenerateJob(**{**job.to_dict(), "prompt": PROMPT + " <lora:style_a:0.7> <lora:style_b:0.4>"})

    def call(p):
        return lambda: p(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
                         width=SIZE, height=SIZE, num_images_per_prompt=batch,
                         generator=torch.Generator("cuda").manual_seed(SEED))

    runs = {"plain": call(plain), "studio": lambda: gen.run(job), "studio_no_graphs": lambda: eager_gen.run(job),
            "plain_two_loras": call(plain_lora), "studio_two_loras": lambda: gen.run(lora_job),
            "studio_no_graphs_two_loras": lambda: eager_gen.run(lora_job)}
    # the default path's images against the plain eager loop's (CUDA graphs replay the same kernels)
    for key, j in (("graphs", job), ("graphs_two_loras", lora_job)):
        a = np.asarray(gen.run(j).images[-1].image, dtype=np.int16)
        b = np.asarray(eager_gen.run(j).images[-1].image, dtype=np.int16)
        results[f"{key}_max_pixel_diff_vs_no_graphs"] = int(np.abs(a - b).max())
    if compiled_gen is not None:
        # the first call at a shape compiles: timed on its own, then the compiled images are checked against eager
        for key, j in (("studio_compiled", job), ("studio_compiled_two_loras", lora_job)):
            t0 = time.perf_counter()
            compiled_gen.run(j)
            sync()
            results[f"{key}_first_call_s"] = time.perf_counter() - t0
            eager_px = np.asarray(gen.run(j).images[0].image, dtype=np.int16)
            compiled_px = np.asarray(compiled_gen.run(j).images[0].image, dtype=np.int16)
            results[f"{key}_max_pixel_diff_vs_eager"] = int(np.abs(eager_px - compiled_px).max())
            runs[key] = (lambda j=j: compiled_gen.run(j))
    times, activation_peak = round_robin(runs, args.repeats)
    weights_gib = sum(p.numel() * p.element_size() for m in (plain.unet, plain.vae, plain.text_encoder)
                      for p in m.parameters()) / 2**30
    results["weights_gib"] = weights_gib
    for key in runs:
        # a call makes `batch` images
        results[key] = {"s_per_image": median(times[key]) / batch, "times": times[key],
                        "peak_gib": weights_gib + activation_peak[key]}
        r = results[key]
        r["steps_per_s"] = STEPS / r["s_per_image"]  # image-steps per second
        # UNet work only (the 25 CFG passes dominate; VAE decode and text encoder not counted); flops_step is one
        # image's CFG step
        r["unet_tflops_per_s"] = flops_step * STEPS / r["s_per_image"] / 1e12
    results["unet_tflop_per_cfg_step"] = flops_step / 1e12
    results["ratio_studio_over_plain"] = results["studio"]["s_per_image"] / results["plain"]["s_per_image"]
    results["ratio_loras_studio_over_plain"] = (results["studio_two_loras"]["s_per_image"]
                                                / results["plain_two_loras"]["s_per_image"])
    path = write_report(f"generate_bs{batch}" if batch > 1 else "generate", results)
    print(f"{'run':<28}{'s/image':>9}{'steps/s':>9}{'peak GiB':>10}{'UNet TFLOP/s':>14}")
    for key in runs:
        r = results[key]
        print(f"{key:<28}{r['s_per_image']:>9.3f}{r['steps_per_s']:>9.1f}{r['peak_gib']:>10.2f}"
              f"{r['unet_tflops_per_s']:>14.1f}")
    print(f"studio/plain: {results['ratio_studio_over_plain']:.3f}; with two LoRAs: "
          f"{results['ratio_loras_studio_over_plain']:.3f}  -> {path}")
    for key in ("studio_compiled", "studio_compiled_two_loras"):
        if key in results:
            plain_key = "plain_two_loras" if "loras" in key else "plain"
            print(f"{key}: {results[plain_key]['s_per_image'] / results[key]['s_per_image']:.2f}x plain; first call "
                  f"(compiling) {results[key + '_first_call_s']:.1f} s; max pixel diff vs eager studio "
                  f"{results[key + '_max_pixel_diff_vs_eager']}")


if __name__ == "__main__":
    main()
