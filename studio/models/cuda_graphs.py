"""CUDA graphs for the eager UNet: a denoising pass records the UNet's forward (with its ControlNets') once per
shape and replays it at every later step, so the GPU runs the same kernels eager PyTorch would launch, without the ~1000 Python-side
kernel launches per step that make batch-1 sampling launch-bound (docs/benchmarks.md). No compilation: capturing
costs one forward's Python time. Images are the eager ones bit for bit, since the kernels are the same."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

MAX_GRAPHS = 2  # shapes kept per UNet (each holds a pool of one forward's activations)


def _signature(t: torch.Tensor) -> tuple:
    # strides too: kernels (and their rounding) follow the memory layout, e.g. an img2img start's
    return (tuple(t.shape), t.stride(), t.dtype, t.device)


def _dense(t: torch.Tensor) -> bool:
    """No dimension broadcast by a zero stride (expand): clone() keeps such a tensor's strides exactly."""
    return all(stride != 0 or size == 1 for size, stride in zip(t.shape, t.stride(), strict=True))


def module_key(module: torch.nn.Module) -> tuple:
    """What a recorded forward depends on in a model: its attention processors (attention slicing, regions and
    IP-Adapters replace them) and where every parameter lives (a LoRA merge writes into the same storage; a reload,
    peft layers or a device move do not). Computed once per pass: it walks every module."""
    processors = getattr(module, "attn_processors", {})
    return (tuple(id(p) for p in processors.values()), tuple(p.data_ptr() for p in module.parameters()))


def input_key(args: tuple[torch.Tensor, ...]) -> tuple:
    """The inputs' shapes, strides, dtypes and devices (their values are copied in at every replay)."""
    return tuple(_signature(a) for a in args)


def unet_forward(unet, sample, timestep, text, added=None) -> torch.Tensor:
    """The UNet's noise prediction, as denoise calls it."""
    return unet(sample, timestep, encoder_hidden_states=text, added_cond_kwargs=added, return_dict=False)[0]


class Recorded:
    """One recorded call of `fn` (tensors in, one tensor out): static copies of the inputs the replay reads and
    the static output it writes. `warm_up` is the eager call a new key gets first (on a side stream: it sets up
    cuBLAS and cuDNN for the capture, as CUDA graphs need)."""

    def __init__(self, fn, args: tuple[torch.Tensor, ...]):
        self.fn = fn
        self.args = tuple(a.clone() for a in args)
        self.out = self.record()

    @staticmethod
    def warm_up(fn, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = fn(*args)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def record(self) -> torch.Tensor:
        """Capture `fn` on the static inputs; returns the static output (written by each replay)."""
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            return self.fn(*self.args)

    def replay(self) -> None:
        self.graph.replay()

    def __call__(self, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        for static, value in zip(self.args, args, strict=True):
            static.copy_(value)
        self.replay()
        return self.out.clone()  # the next replay overwrites `out`; samplers keep past predictions


@dataclass
class UNetGraphs:
    """The recorded calls made with one UNet, newest last. A key seen for the first time runs eagerly once
    (warm-up) and is recorded at its next call. `record`: what records a call (Recorded; tests use a CPU
    stand-in)."""

    graphs: OrderedDict
    warmed: set
    record: type = Recorded

    def call(self, key: tuple, fn, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """fn(*args), replayed from the recording of `key` plus the inputs' layout where there is one. `key` must
        name everything else `fn` reads (its models' module_keys, Python values such as a ControlNet's scale)."""
        if not all(_dense(a) for a in args):  # a recording's clone would not keep a broadcast input's strides
            return fn(*args)
        key = (key, input_key(args))
        recorded = self.graphs.get(key)
        if recorded is None and key not in self.warmed:
            self.warmed.add(key)
            return self.record.warm_up(fn, args)
        if recorded is None:
            while len(self.graphs) >= MAX_GRAPHS:
                self.graphs.popitem(last=False)
            recorded = self.graphs[key] = self.record(fn, args)
        self.graphs.move_to_end(key)
        return recorded(args)


def graphs_for(unet: torch.nn.Module) -> UNetGraphs:
    """The UNet's recorded calls (kept on the module, so they go when the model is unloaded)."""
    graphs = getattr(unet, "_studio_cuda_graphs", None)
    if graphs is None:
        record = getattr(unet, "_studio_cuda_graphs_record", Recorded)
        graphs = unet._studio_cuda_graphs = UNetGraphs(OrderedDict(), set(), record)
    return graphs


def recorder(unet: torch.nn.Module, *others: torch.nn.Module):
    """For one denoising pass: a function (fn, args, extra key) -> fn(*args), replayed from a recording where
    there is one. `others`: the models fn calls besides the UNet (ControlNets); `extra`: the Python values fn
    reads."""
    graphs = graphs_for(unet)
    models = tuple(module_key(m) for m in (unet, *others))
    return lambda fn, args, extra=(): graphs.call((models, extra), fn, tuple(args))


def release(unet: torch.nn.Module | None) -> None:
    """Drop the UNet's recorded forwards and their memory pools (out of memory, settings changed)."""
    if unet is not None:
        unet._studio_cuda_graphs = None


def enable(unet: torch.nn.Module, on: bool, record: type = Recorded) -> None:
    """Let denoising passes record this UNet (the model manager's setting; off releases what was recorded).
    `record`: Recorded, or a stand-in that replays on the CPU (tests of the inputs' plumbing)."""
    unet._studio_cuda_graphs_on = bool(on)
    unet._studio_cuda_graphs_record = record
    release(unet)


def usable(unet: torch.nn.Module, *others: torch.nn.Module) -> bool:
    """Whether passes may record calls of the UNet (and of `others`, such as ControlNets): enabled for the UNet,
    every model on a CUDA device, not compiled (reduce-overhead records its own graphs), no offload hooks moving
    weights between devices, not training."""
    from studio.models import speed

    if not getattr(unet, "_studio_cuda_graphs_on", False):
        return False
    record = getattr(unet, "_studio_cuda_graphs_record", Recorded)
    for m in (unet, *others):
        if m.training or speed.is_compiled(m) or any(hasattr(x, "_hf_hook") for x in (m, *m.children())):
            return False
        if record is Recorded and next(m.parameters()).device.type != "cuda":
            return False
    return True
