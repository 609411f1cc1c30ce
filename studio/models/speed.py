"""Optional speed-ups that keep outputs equivalent: torch.compile of the UNet (with CUDA graphs in
reduce-overhead mode) and of a storyboard's ControlNet; training compiles forward and backward, never with CUDA
graphs. Why and what it costs: docs/benchmarks.md."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

# "off": eager; "default": inductor kernels; "reduce-overhead": inductor kernels replayed as CUDA graphs;
# "max-autotune": also searches kernel configurations (slow to compile, sometimes faster)
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
# Training: inductor kernels only. CUDA graph trees replay every call into one static memory pool, so a replay
# overwrites the previous replay's outputs; in training those outputs include the backward graph's parameter
# gradients, which autograd keeps in `.grad` across micro-batches (accumulation, clipping, the optimizer step) and
# which the next forward's replay would overwrite. "reduce-overhead" is refused, and "max-autotune" runs as
# inductor's "max-autotune-no-cudagraphs" (the same kernel search, without CUDA graphs).
TRAIN_COMPILE_MODES = ("off", "default", "max-autotune")
TRAIN_INDUCTOR_MODES = {"default": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def check_compile_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}; got {mode!r}")
    return mode


def check_train_compile_mode(mode: str) -> str:
    if mode == "reduce-overhead":
        raise ValueError("compile mode 'reduce-overhead' (CUDA graphs) is for generation only: training compiles "
                         "without CUDA graphs, whose replays would overwrite the gradients; use default or "
                         "max-autotune (or off)")
    if mode not in TRAIN_COMPILE_MODES:
        raise ValueError(f"training compile mode must be one of {', '.join(TRAIN_COMPILE_MODES)}; got {mode!r}")
    return mode


COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def use_compile_cache(folder: Path) -> Path:
    """Keep torch.compile's caches (inductor's FX graphs and kernels, AOTAutograd's graphs) in the studio's cache
    folder instead of /tmp, so a later launch on this machine reuses them: its first compiled image took 13 s
    instead of 66 s on an H200 (docs/benchmarks.md). A folder the user set in TORCHINDUCTOR_CACHE_DIR wins. Inductor
    reads the variable when it compiles, so this is set before the first compile of the process."""
    if not os.environ.get(COMPILE_CACHE_ENV):
        folder.mkdir(parents=True, exist_ok=True)
        os.environ[COMPILE_CACHE_ENV] = str(folder)
    return Path(os.environ[COMPILE_CACHE_ENV])


def compile_unet(unet: torch.nn.Module, mode: str, backend: str = "inductor", training: bool = False) -> bool:
    """Compile `unet` in place (the module keeps its class, config and weights, so LoRA merging, which writes into
    the weights in place, still reaches the compiled kernels and CUDA graphs; its state_dict keys carry no
    `_orig_mod.` prefix). Returns whether it compiled.

    Shapes are static: each image size and batch compiles once and is cached (up to torch._dynamo's recompile
    limit, after which that shape runs eagerly). `training`: forward and backward, without CUDA graphs
    (TRAIN_COMPILE_MODES). `backend` is for tests ("eager"/"aot_eager" on CPU)."""
    check_train_compile_mode(mode) if training else check_compile_mode(mode)
    if mode == "off":
        return False
    inductor_mode = TRAIN_INDUCTOR_MODES[mode] if training else mode
    options = {} if backend != "inductor" else {"mode": inductor_mode}
    unet.compile(backend=backend, dynamic=False, **options)
    unet._studio_compile = (mode, backend)  # what compiled_as reports, for modules compiled to match this one
    return True


def compiled_as(module: torch.nn.Module) -> tuple[str, str] | None:
    """(mode, backend) that compile_unet compiled `module` with (generation, not training), or None."""
    return getattr(module, "_studio_compile", None) if is_compiled(module) else None


@contextmanager
def uncompiled(module: torch.nn.Module) -> Iterator[None]:
    """Run `module` eagerly inside the block, even if it is compiled (training previews: no inference graph to
    compile for a few images every N steps). Only this module: torch.compiler.set_stance would switch every
    compiled module of the process, also the Generate tab's, which may be sampling in another thread."""
    compiled = getattr(module, "_compiled_call_impl", None)
    module._compiled_call_impl = None
    try:
        yield
    finally:
        module._compiled_call_impl = compiled


COMPILE_NOTE = ("compiling for this image size (Compile UNet: the first pass at a size waits about 1-3 minutes, "
                "or some 15 s when this machine compiled it before)")


def compile_note(module: torch.nn.Module, shape: tuple) -> str | None:
    """COMPILE_NOTE the first time a compiled `module` is about to run at `shape` (the batch and sizes its caller
    passes), so progress says why the first step is slow; None when it is not compiled or has seen the shape."""
    if not is_compiled(module):
        return None
    seen = getattr(module, "_studio_shapes_seen", None)
    if seen is None:
        seen = module._studio_shapes_seen = set()
    if shape in seen:
        return None
    seen.add(shape)
    return COMPILE_NOTE


def is_compiled(module: torch.nn.Module) -> bool:
    # nn.Module.compile() sets this; there is no public getter
    return getattr(module, "_compiled_call_impl", None) is not None


def mark_step() -> None:
    """Tell CUDA graph trees that a new denoising step starts: the previous step's outputs have been consumed, so
    the graph may overwrite them (without this, reading them later raises). Harmless when nothing is compiled."""
    torch.compiler.cudagraph_mark_step_begin()
