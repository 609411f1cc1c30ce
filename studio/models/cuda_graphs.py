"""CUDA graphs for the eager UNet: a denoising pass records the UNet's forward once per shape and replays it at
every later step, so the GPU runs the same kernels eager PyTorch would launch, without the ~1000 Python-side
kernel launches per step that make batch-1 sampling launch-bound (docs/benchmarks.md). No compilation: capturing
costs one forward's Python time. Images are the eager ones bit for bit, since the kernels are the same."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

MAX_GRAPHS = 2  # shapes kept per UNet (each holds a pool of one forward's activations)


def _tensors(added: dict | None) -> tuple[tuple[str, torch.Tensor], ...]:
    return tuple(sorted((added or {}).items()))


def _signature(t: torch.Tensor) -> tuple:
    # strides too: kernels (and their rounding) follow the memory layout, e.g. an img2img start's
    return (tuple(t.shape), t.stride(), t.dtype, t.device)


def module_key(unet: torch.nn.Module) -> tuple:
    """What a recorded forward depends on in the UNet: its attention processors (attention slicing, regions and
    IP-Adapters replace them) and where every parameter lives (a LoRA merge writes into the same storage; a reload,
    peft layers or a device move do not). Computed once per pass: it walks every module."""
    return (tuple(id(p) for p in unet.attn_processors.values()), tuple(p.data_ptr() for p in unet.parameters()))


def input_key(sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
              added: dict | None) -> tuple:
    """The inputs' shapes, strides, dtypes and devices (their values are copied in at every replay)."""
    return (_signature(sample), _signature(timestep), _signature(encoder_hidden_states),
            tuple((k, _signature(v)) for k, v in _tensors(added)))


def unet_forward(unet, sample, timestep, text, added) -> torch.Tensor:
    return unet(sample, timestep, encoder_hidden_states=text, added_cond_kwargs=added, return_dict=False)[0]


class Recorded:
    """One recorded UNet forward: static input tensors the replay reads and the static output it writes. Its
    `warm_up` is the eager call a new shape gets first (on a side stream: it sets up cuBLAS and cuDNN for the
    capture, as CUDA graphs need)."""

    def __init__(self, unet: torch.nn.Module, sample: torch.Tensor, timestep: torch.Tensor,
                 encoder_hidden_states: torch.Tensor, added: dict | None):
        self.unet = unet
        self.sample = sample.clone()
        self.timestep = timestep.clone()
        self.text = encoder_hidden_states.clone()
        self.added = {k: v.clone() for k, v in _tensors(added)} or None
        self.out = self.record()

    @staticmethod
    def warm_up(unet, sample, timestep, text, added) -> torch.Tensor:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = unet_forward(unet, sample, timestep, text, added)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def record(self) -> torch.Tensor:
        """Capture the forward on the static inputs; returns the static output (written by each replay)."""
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            return unet_forward(self.unet, self.sample, self.timestep, self.text, self.added)

    def replay(self) -> None:
        self.graph.replay()

    def __call__(self, sample, timestep, encoder_hidden_states, added) -> torch.Tensor:
        self.sample.copy_(sample)
        self.timestep.copy_(timestep)
        self.text.copy_(encoder_hidden_states)
        for k, v in _tensors(added):
            self.added[k].copy_(v)
        self.replay()
        return self.out.clone()  # the next replay overwrites `out`; samplers keep past predictions


@dataclass
class UNetGraphs:
    """The recorded forwards of one UNet, newest last. A key seen for the first time runs eagerly once (warm-up)
    and is recorded at its next call. `record`: what records a forward (Recorded; tests use a CPU stand-in)."""

    graphs: OrderedDict
    warmed: set
    record: type = Recorded

    def call(self, unet, module: tuple, sample, timestep, encoder_hidden_states, added=None) -> torch.Tensor:
        """The UNet's noise prediction (`module`: module_key(unet), taken at the start of the pass)."""
        if not torch.is_tensor(timestep):
            timestep = torch.tensor(timestep, device=sample.device)
        key = (module, input_key(sample, timestep, encoder_hidden_states, added))
        recorded = self.graphs.get(key)
        if recorded is None and key not in self.warmed:
            self.warmed.add(key)
            return self.record.warm_up(unet, sample, timestep, encoder_hidden_states, added)
        if recorded is None:
            while len(self.graphs) >= MAX_GRAPHS:
                self.graphs.popitem(last=False)
            recorded = self.graphs[key] = self.record(unet, sample, timestep, encoder_hidden_states, added)
        self.graphs.move_to_end(key)
        return recorded(sample, timestep, encoder_hidden_states, added)


def graphs_for(unet: torch.nn.Module) -> UNetGraphs:
    """The UNet's recorded forwards (kept on the module, so they go when the model is unloaded)."""
    graphs = getattr(unet, "_studio_cuda_graphs", None)
    if graphs is None:
        record = getattr(unet, "_studio_cuda_graphs_record", Recorded)
        graphs = unet._studio_cuda_graphs = UNetGraphs(OrderedDict(), set(), record)
    return graphs


def recorder(unet: torch.nn.Module):
    """For one denoising pass: a function (sample, timestep, encoder_hidden_states, added_cond_kwargs) -> the
    UNet's output, replayed from a recording where there is one."""
    graphs, module = graphs_for(unet), module_key(unet)
    return lambda sample, timestep, text, added=None: graphs.call(unet, module, sample, timestep, text, added)


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


def usable(unet: torch.nn.Module) -> bool:
    """Whether passes may record the UNet's forward: enabled for it, on a CUDA device, not compiled
    (reduce-overhead records its own graphs), no offload hooks moving weights between devices, not training."""
    from studio.models import speed

    if not getattr(unet, "_studio_cuda_graphs_on", False) or unet.training or speed.is_compiled(unet):
        return False
    if any(hasattr(m, "_hf_hook") for m in (unet, *unet.children())):
        return False
    record = getattr(unet, "_studio_cuda_graphs_record", Recorded)
    return record is not Recorded or next(unet.parameters()).device.type == "cuda"
