"""GPU functional check of the trainers (not a benchmark): every method on CUDA with fp16/bf16 mixed precision and
8-bit AdamW, on demo-tiny, in this process; run it under `accelerate launch --num_processes 2` to check several GPUs.
Usage: python bench/gpu_train_check.py [--multi] [--work DIR]"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from studio.config import StudioConfig  # noqa: E402
from studio.train.job import TrainJob  # noqa: E402
from studio.train.loop import Trainer  # noqa: E402

CASES = {
    "ti-fp16": dict(method="ti", mixed_precision="fp16", learning_rate="0.01"),
    "ti-moe-bf16": dict(method="ti-moe", mixed_precision="bf16", learning_rate="0.003", image_encoder="demo-tiny"),
    "ti-att-fp16": dict(method="ti-att", mixed_precision="fp16", learning_rate="0.003", image_encoder="demo-tiny"),
    "lora-te-fp16-8bit": dict(method="lora", mixed_precision="fp16", optimizer="adamw8bit", learning_rate="1e-3",
                              train_text_encoder=True, text_encoder_lr=5e-4, min_snr_gamma=5.0,
                              gradient_checkpointing=True, lr_scheduler="cosine", lr_warmup=0.1,
                              class_prompt="a photo of a room", class_images=2),
    "finetune-ema-8bit": dict(method="finetune", mixed_precision="fp16", optimizer="adamw8bit",
                              learning_rate="1e-4", ema=True, max_grad_norm=1.0, gradient_checkpointing=True),
}


def make_dataset(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        a = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
        a[:, (i % 3)::6] = [230, 20, 20]
        Image.fromarray(a).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"stripes number {i}")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/gpu-train-check")
    parser.add_argument("--multi", action="store_true", help="name the results file for a several-GPU run")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    work = Path(args.work)
    cfg = StudioConfig().with_home(work / "home")
    cfg.ensure_dirs()
    make_dataset(cfg.datasets_dir / "stripes")
    rank = int(os.environ.get("RANK", "0"))
    results = {}
    # under accelerate launch the precision is fixed for the process: every case runs in fp16 there
    cases = {k: {**v, "mixed_precision": "fp16"} if args.multi else v for k, v in CASES.items()}
    for name, settings in cases.items():
        job = TrainJob.for_method(settings["method"], **{k: v for k, v in settings.items() if k != "method"},
                                  data="stripes", name=f"check-{name}", resolution=64, max_steps=args.steps,
                                  batch_size=2, save_every=6, preview_every=6, preview_steps=4, overwrite=True,
                                  overfit_batches=1)
        t = time.perf_counter()
        result = Trainer(cfg).start(job)
        results[name] = {"state": result.state, "message": result.message, "first": result.losses[:1],
                         "last": result.losses[-1:], "seconds": round(time.perf_counter() - t, 2)}
        print(rank, name, json.dumps(results[name]), flush=True)
    if rank == 0:
        out = Path(os.environ.get("OUT", work))
        (out / f"gpu_train_check{'_multi' if args.multi else ''}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
