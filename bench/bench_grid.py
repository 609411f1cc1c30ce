"""The parameter explorer on the GPU: a 4 × 3 X/Y plot (Seed × CFG Scale, 12 cells) at 512², 20 steps, DPM++ 2M
Karras, run one image after another (what A1111's X/Y/Z plot does, here 12 Generate calls) and as the explorer's
batched passes (4 and 12 cells per pass), timed round-robin; plus how far the batched cells are from the single
Generate images on the GPU (issue #7). Usage: python bench/bench_grid.py [--repeats 3] [--work DIR]"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import build_sd15_folder, environment, median, sync, timed, write_report  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, oil painting, highly detailed"
NEGATIVE = "blurry, lowres"
STEPS, SIZE = 20, 512


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=None, help="folder for the random model (default: temp)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="studio-bench-"))
    os.environ["STUDIO_HOME"] = str(work / "home")

    from studio.config import StudioConfig
    from studio.explorer.grid import AxisSpec, GridJob, GridRunner
    from studio.generation.generate import Generator
    from studio.generation.job import GenerateJob
    from studio.models.manager import ModelManager

    folder = build_sd15_folder(work / "sd15-random")
    cfg = StudioConfig.from_env(device="cuda", precision="fp16")
    manager = ModelManager(cfg)
    manager.load(str(folder))
    gen = Generator(manager)
    runner = GridRunner(manager, gen)
    base = GenerateJob(prompt=PROMPT, negative_prompt=NEGATIVE, sampler="DPM++ 2M", schedule="Karras", steps=STEPS,
                       cfg_scale=7.0, seed=1, width=SIZE, height=SIZE)

    def grid_job(per_pass: int) -> GridJob:
        return GridJob(base, x=AxisSpec.parse("Seed: 1-4"), y=AxisSpec.parse("CFG Scale: 3, 7, 11"),
                       cells_per_pass=per_pass)

    plans = {n: runner.plan(grid_job(n)) for n in (4, 12)}
    cells = plans[12].cells

    def one_by_one():
        return [gen.run(GenerateJob(**asdict(c.job))).images[0].image for c in cells]

    def batched(n):
        return lambda: runner.run(plans[n])

    runs = {"one_by_one": one_by_one, "grid_4_per_pass": batched(4), "grid_12_per_pass": batched(12)}
    results = {"env": environment(), "settings": {"cells": len(cells), "steps": STEPS, "size": SIZE,
                                                  "sampler": "DPM++ 2M Karras", "axes": "Seed 1-4 x CFG 3,7,11",
                                                  "dtype": "fp16"}}
    outputs, peaks = {}, {}
    for key, fn in runs.items():  # warm-up, outputs, each one's peak above what is resident
        fn()
        sync()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        outputs[key] = fn()
        sync()
        peaks[key] = (torch.cuda.max_memory_allocated() - resident) / 2**30
    times = {k: [] for k in runs}
    for _ in range(args.repeats):
        for key, fn in runs.items():
            times[key] += timed(fn, 1, warmup=0)
    singles = [np.asarray(im).astype(np.int16) for im in outputs["one_by_one"]]
    for key in runs:
        r = results[key] = {"s_per_grid": median(times[key]), "times": times[key], "activation_peak_gib": peaks[key]}
        r["s_per_cell"] = r["s_per_grid"] / len(cells)
        r["speedup_over_one_by_one"] = median(times["one_by_one"]) / r["s_per_grid"]
        if key != "one_by_one":
            grid = outputs[key]
            diffs = [np.abs(np.asarray(grid.images[c.index].image).astype(np.int16) - singles[i])
                     for i, c in enumerate(cells)]
            r["cells_pixel_equal"] = sum(int(d.max() == 0) for d in diffs)
            r["max_abs_diff"] = int(max(d.max() for d in diffs))
            r["mean_abs_diff"] = float(np.mean([d.mean() for d in diffs]))
            r["passes"] = grid.passes_run
    path = write_report("grid", results)
    print(f"{'run':<18}{'s/grid':>9}{'s/cell':>9}{'speedup':>9}{'peak GiB':>10}{'equal':>7}{'max diff':>9}")
    for key in runs:
        r = results[key]
        print(f"{key:<18}{r['s_per_grid']:>9.2f}{r['s_per_cell']:>9.3f}{r['speedup_over_one_by_one']:>9.2f}"
              f"{r['activation_peak_gib']:>10.2f}{r.get('cells_pixel_equal', '-'):>7}{r.get('max_abs_diff', '-'):>9}")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
