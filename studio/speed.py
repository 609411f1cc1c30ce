"""Optional speed-ups that keep outputs equivalent: torch.compile of the UNet (optionally with CUDA graphs).

Eager SD 1.5 sampling is launch-bound on a modern GPU (see docs/benchmarks.md): the GPU waits for Python to
queue thousands of small kernels per step. Compiling the UNet fuses them; CUDA graphs replay a whole step with
one launch. The first image at each new size (and after a LoRA file is first loaded, which changes the module
tree) pays the compile time; later ones are fast."""

from __future__ import annotations

import torch

# "off": eager; "default": inductor kernels; "reduce-overhead": inductor kernels replayed as CUDA graphs;
# "max-autotune": also searches kernel configurations (slow to compile, sometimes faster)
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


def check_compile_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}; got {mode!r}")
    return mode


def compile_unet(unet: torch.nn.Module, mode: str, backend: str = "inductor") -> bool:
    """Compile `unet` in place (the module keeps its class, config and weights, so LoRA merging, which writes into
    the weights in place, still reaches the compiled kernels and CUDA graphs). Returns whether it compiled.

    Shapes are static: each image size and batch compiles once and is cached (up to torch._dynamo's recompile
    limit, after which that shape runs eagerly). `backend` is for tests ("eager"/"aot_eager" on CPU)."""
    check_compile_mode(mode)
    if mode == "off":
        return False
    options = {} if backend != "inductor" else {"mode": mode}
    unet.compile(backend=backend, dynamic=False, **options)
    return True


def is_compiled(module: torch.nn.Module) -> bool:
    # nn.Module.compile() sets this; there is no public getter
    return getattr(module, "_compiled_call_impl", None) is not None


def mark_step() -> None:
    """Tell CUDA graph trees that a new denoising step starts: the previous step's outputs have been consumed, so
    the graph may overwrite them (without this, reading them later raises). Harmless when nothing is compiled."""
    torch.compiler.cudagraph_mark_step_begin()
