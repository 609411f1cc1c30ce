"""Out of GPU memory during generation: free what was allocated and say what to change, instead of a CUDA trace.
(Training has its own handler in train/loop.py: the run stops with advice and keeps its last checkpoint.)"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


class OutOfMemory(RuntimeError):
    """The GPU ran out of memory; the message says what to lower or switch on. The app keeps running."""


def free_memory() -> None:
    """Drop unreachable tensors, then hand cached CUDA blocks back (a no-op where CUDA was never used)."""
    gc.collect()
    torch.cuda.empty_cache()


def generation_advice(batch_size: int, width: int, height: int, memory: dict,
                      batch_label: str = "batch size",
                      batch_note: str = "batch count makes the same number of images one pass at a time") -> str:
    """What to change, most effective first, leaving out what is already on."""
    tips = []
    if batch_size > 1:
        tips.append(f"a smaller {batch_label} (it was {batch_size}; {batch_note})")
    if width * height > 512 * 512:
        tips.append(f"a smaller size (it was {width}x{height})")
    off = [label for key, label in (("vae_tiling", "VAE tiling"), ("attention_slicing", "attention slicing"),
                                    ("cpu_offload", "model CPU offload")) if not memory.get(key)]
    if off:
        tips.append("turning on " + ", ".join(off) + " in the Models tab")
    tips.append("closing other programs that use the GPU")
    return "; ".join(tips)


def run_with_advice(work: Callable[[], T], what: str, advice: Callable[[], str]) -> T:
    """`work()`; on CUDA OOM free memory and raise OutOfMemory('<what> ran out of GPU memory ... Try ...').

    Memory is freed after the except block, once the OOM exception is gone: its traceback holds the frames (and
    tensors) of the failed step, which would otherwise stay allocated."""
    try:
        return work()
    except torch.cuda.OutOfMemoryError as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else "CUDA out of memory"
    free_memory()
    raise OutOfMemory(f"{what} ran out of GPU memory ({detail[:160]}). Memory was freed and the studio keeps "
                      f"running. Try {advice()}.")
