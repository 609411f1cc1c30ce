"""What each memory setting costs and saves (issue #10, "memory settings users can pick for small cards"):

- generation (512², 25 steps, DPM++ 2M Karras, CFG 7, batch 1, fp16): the Models tab's attention slicing, VAE tiling
  and model CPU offload, one at a time, against none; VAE tiling and attention slicing also at 1024², where tiling
  starts to act (diffusers tiles only images larger than the VAE's sample size);
- training (512², batch 1, fp16 mixed): gradient checkpointing and 8-bit AdamW (when bitsandbytes imports on CUDA),
  for TI and LoRA rank 4, against neither.

Each row: seconds per image or steps/s (median), and the peak GPU memory of the run (`max_memory_allocated`, reset
before it). One process, settings in turn (no round-robin: a setting that reloads the model or moves it to the CPU
cannot stay resident beside the others), so compare ratios taken in the same run.
Usage: python bench/bench_memory.py [--repeats 5] [--steps 30] [--work DIR] [--tiny] [--only generation|training]
`--tiny` runs it with the tiny random model at 64 px on the CPU: a check of the script, not a measurement."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_train_ti import build_tiny_folder, cleanup, make_dataset, peak_gib, reset_peak, studio_block  # noqa: E402
from bench.common import build_sd15_folder, environment, median, sync, write_report  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, oil painting, highly detailed"
GENERATION_SETTINGS = {  # name -> (attention_slicing, vae_tiling, cpu_offload)
    "none": (False, False, False),
    "attention_slicing": (True, False, False),
    "vae_tiling": (False, True, False),
    "cpu_offload": (False, False, True),
}
BIG_SETTINGS = ("none", "attention_slicing", "vae_tiling")


def eight_bit_available(cuda: bool) -> bool:
    if not cuda:
        return False
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


def generation_rows(folder: Path, size: int, big: int, repeats: int, cuda: bool) -> dict:
    from studio.config import StudioConfig
    from studio.generation.generate import Generator
    from studio.generation.job import GenerateJob
    from studio.models.manager import ModelManager

    manager = ModelManager(StudioConfig.from_env(device="cuda" if cuda else "cpu",
                                                 precision="fp16" if cuda else "fp32"))
    manager.load(str(folder))
    gen = Generator(manager)
    rows = {}
    plan = [(name, size) for name in GENERATION_SETTINGS] + ([(name, big) for name in BIG_SETTINGS] if big else [])
    for name, side in plan:
        slicing, tiling, offload = GENERATION_SETTINGS[name]
        manager.set_memory_options(slicing, tiling, offload)
        job = GenerateJob(prompt=PROMPT, sampler="DPM++ 2M", schedule="Karras", steps=25, cfg_scale=7.0, seed=1234,
                          width=side, height=side)
        gen.run(job)  # warm-up at this shape and setting
        cleanup(cuda)
        reset_peak(cuda)
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            gen.run(job)
            sync()
            times.append(time.perf_counter() - t0)
        key = f"{name}_{side}"
        rows[key] = {"setting": name, "size": side, "s_per_image": median(times), "times": times,
                     "peak_gib": peak_gib(cuda)}
        print(f"generate {key:<24} {rows[key]['s_per_image']:7.3f} s/image  peak {rows[key]['peak_gib']:6.2f} GiB",
              flush=True)
    manager.set_memory_options(False, False, False)
    del gen, manager
    cleanup(cuda)
    return rows


def training_rows(folder: Path, data_dir: Path, res: int, steps: int, cuda: bool) -> dict:
    from studio.config import StudioConfig

    cfg = StudioConfig.from_env(device="cuda" if cuda else "cpu", precision="fp16" if cuda else "fp32")
    precision = "fp16" if cuda else "no"
    settings = {"none": {}, "gradient_checkpointing": {"gradient_checkpointing": True}}
    if eight_bit_available(cuda):
        settings["adamw8bit"] = {"optimizer": "adamw8bit"}
        settings["both"] = {"gradient_checkpointing": True, "optimizer": "adamw8bit"}
    rows = {}
    for method, method_fields in (("ti", {}), ("lora", {"rank": 4, "alpha": 4.0, "learning_rate": "1e-4"})):
        for name, fields in settings.items():
            b = studio_block(cfg, folder, data_dir, 1, steps, res, precision, cuda,
                             extra={"method": method, **method_fields, **fields})
            key = f"{method}_{name}"
            rows[key] = {"method": method, "setting": name, "steps_per_s": 1 / median(b["times"]),
                         "peak_gib": b["peak_gib"], "final_loss": b["losses"][-1]}
            print(f"train    {key:<24} {rows[key]['steps_per_s']:7.2f} steps/s  peak {b['peak_gib']:6.2f} GiB",
                  flush=True)
    if not eight_bit_available(cuda):
        rows["note"] = "bitsandbytes did not import (or no CUDA): 8-bit AdamW rows left out"
    return rows


def with_ratios(rows: dict, group_key: str) -> None:
    """Each row's time and memory against the 'none' row of its group (same size, or same method)."""
    for row in rows.values():
        if not isinstance(row, dict):
            continue
        base = rows.get(f"none_{row['size']}") if group_key == "size" else rows.get(f"{row['method']}_none")
        if base is None:
            continue
        if "s_per_image" in row:
            row["time_vs_none"] = row["s_per_image"] / base["s_per_image"]
        else:
            row["time_vs_none"] = base["steps_per_s"] / row["steps_per_s"]
        row["peak_vs_none_gib"] = row["peak_gib"] - base["peak_gib"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30, help="training steps per setting")
    parser.add_argument("--work", default=None)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--only", choices=("generation", "training"), default=None, help="run one half")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    work = Path(args.work or tempfile.mkdtemp(prefix="studio-bench-memory-"))
    os.environ["STUDIO_HOME"] = str(work / "home")
    folder = build_tiny_folder(work / "tiny") if args.tiny else build_sd15_folder(work / "sd15-random")
    size, big = (64, 128) if args.tiny else (512, 1024)
    data_dir = make_dataset(work / "data", size)
    results = {"env": environment(), "settings": {"tiny": args.tiny, "size": size, "big": big,
                                                  "repeats": args.repeats, "train_steps": args.steps}}
    if args.only != "training":
        results["generation"] = generation_rows(folder, size, big, args.repeats, cuda)
        with_ratios(results["generation"], "size")
    if args.only != "generation":
        results["training"] = training_rows(folder, data_dir, size, args.steps, cuda)
        with_ratios(results["training"], "method")
    path = write_report("memory", results)
    print(f"{'row':<34}{'time vs none':>14}{'peak GiB':>10}{'vs none':>9}")
    for group in ("generation", "training"):
        for key, row in results.get(group, {}).items():
            if isinstance(row, dict) and "time_vs_none" in row:
                print(f"{group[:5] + ' ' + key:<34}{row['time_vs_none']:>13.2f}x{row['peak_gib']:>10.2f}"
                      f"{row['peak_vs_none_gib']:>+9.2f}")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
