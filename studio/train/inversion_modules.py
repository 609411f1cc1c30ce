"""Inversion modules of seed 000: networks that turn CLIP image embeddings of the training images into the
pseudo-token's embedding. TI-Att (§6.2): a learnable CLS vector before the image embeddings, two attention layers,
GELU, a linear layer; only the CLS position is used. TI-MoE (§6.3): noisy top-k routed experts per image, outputs
concatenated and projected, with V-MoE's importance and load losses."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class AttentionInversion(nn.Module):
    """v_{i+1} = MultiHeadAttention(Q = v_i, K = V = [CLS; images]) for two layers; out = Linear(GELU(v_2[CLS]))."""

    def __init__(self, image_dim: int, text_dim: int, vectors: int = 1, heads: int = 8):
        super().__init__()
        if image_dim % heads:
            raise ValueError(f"attention heads ({heads}) must divide the image-embedding width ({image_dim})")
        self.vectors, self.text_dim = vectors, text_dim
        self.cls = nn.Parameter(torch.randn(image_dim) * image_dim**-0.5)
        self.attn1 = nn.MultiheadAttention(image_dim, heads, batch_first=True)
        self.attn2 = nn.MultiheadAttention(image_dim, heads, batch_first=True)
        self.out = nn.Linear(image_dim, text_dim * vectors)

    def sequence(self, images: torch.Tensor) -> torch.Tensor:
        """[N, D] image embeddings -> [1, N + 1, D] with the CLS vector first."""
        return torch.cat([self.cls[None], images.to(self.cls.dtype)], dim=0)[None]

    def attend(self, images: torch.Tensor) -> torch.Tensor:
        """[1, N + 1, D]: every position after the two attention layers (keys and values: the input sequence)."""
        v0 = self.sequence(images)
        v1, _ = self.attn1(v0, v0, v0, need_weights=False)
        v2, _ = self.attn2(v1, v0, v0, need_weights=False)
        return v2

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[N, D] image embeddings -> [vectors, text_dim]; only the CLS output reaches the linear layer."""
        cls_out = self.attend(images)[0, 0]
        return self.out(F.gelu(cls_out)).view(self.vectors, self.text_dim)

    def aux_loss(self) -> torch.Tensor | None:
        return None


class Expert(nn.Module):
    """f(x) = W2 gelu(W1 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


def coefficient_of_variation_squared(x: torch.Tensor) -> torch.Tensor:
    """(std / mean)^2 over the experts (population std), V-MoE's balance measure; 0 when perfectly even."""
    return x.var(unbiased=False) / x.mean().pow(2).clamp_min(1e-12)


def importance_loss(gates: torch.Tensor) -> torch.Tensor:
    """gates [N, E] (softmax of the noisy router logits, before top-k): CV^2 of each expert's summed gate."""
    return coefficient_of_variation_squared(gates.sum(dim=0))


def load_loss(clean_logits: torch.Tensor, noisy_logits: torch.Tensor, k: int, noise_std: float) -> torch.Tensor:
    """CV^2 of each expert's expected load: P(expert i stays in the top k if only its noise were drawn again)
    = 1 - Phi((kth_largest(noisy logits) - clean_logit_i) / noise_std), summed over the inputs (V-MoE, app. A)."""
    threshold = noisy_logits.topk(k, dim=-1).values[:, -1:]  # [N, 1]
    normal = torch.distributions.Normal(0.0, 1.0)
    prob = 1 - normal.cdf((threshold - clean_logits) / noise_std)
    return coefficient_of_variation_squared(prob.sum(dim=0))


class MoEInversion(nn.Module):
    """Experts f_i, router g(x) = TopK(softmax(Wx + eps)), eps ~ N(0, 1/E^2); per-image outputs
    sum_i g_i(x) f_i(x), concatenated over the N images and projected to the text-embedding width."""

    def __init__(self, image_dim: int, text_dim: int, num_images: int, vectors: int = 1, experts: int = 4,
                 top_k: int = 2, hidden: int | None = None):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError(f"top-k must be between 1 and the number of experts ({experts}), got {top_k}")
        self.vectors, self.text_dim, self.num_images = vectors, text_dim, num_images
        self.experts_n, self.top_k = experts, top_k
        self.noise_std = 1.0 / experts  # variance 1/E^2
        self.router = nn.Linear(image_dim, experts, bias=False)  # W: E x D
        self.experts = nn.ModuleList(Expert(image_dim, hidden or image_dim) for _ in range(experts))
        self.project = nn.Linear(num_images * image_dim, text_dim * vectors)
        self.last_aux: dict[str, torch.Tensor] = {}

    def route(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Router outputs for [N, D] inputs. With a generator (training) the logits get noise; without, none."""
        clean = self.router(x)
        noisy = clean
        if generator is not None:
            eps = torch.randn(clean.shape, generator=generator, dtype=torch.float32).to(clean.device, clean.dtype)
            noisy = clean + eps * self.noise_std
        gates = noisy.softmax(dim=-1)  # [N, E]
        top_vals, top_idx = gates.topk(self.top_k, dim=-1)
        weights = torch.zeros_like(gates).scatter(-1, top_idx, top_vals)  # TopK: the k largest kept, the rest 0
        return {"clean": clean, "noisy": noisy, "gates": gates, "weights": weights, "top_idx": top_idx}

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = images.to(self.router.weight.dtype)
        if x.shape[0] != self.num_images:
            raise ValueError(f"this module was built for {self.num_images} images, got {x.shape[0]}")
        r = self.route(x, generator)
        outputs = torch.stack([expert(x) for expert in self.experts], dim=1)  # [N, E, D]
        mixed = (r["weights"].unsqueeze(-1) * outputs).sum(dim=1)  # [N, D]
        self.last_aux = {
            "importance": importance_loss(r["gates"]),
            "load": load_loss(r["clean"], r["noisy"], self.top_k, self.noise_std) if generator is not None
            else torch.zeros((), device=x.device),
        }
        return self.project(mixed.reshape(1, -1)).view(self.vectors, self.text_dim)

    def aux_loss(self) -> torch.Tensor | None:
        """0.5 L_importance + 0.5 L_load of the last forward pass (seed 000, eq. 2)."""
        if not self.last_aux:
            return None
        return 0.5 * self.last_aux["importance"] + 0.5 * self.last_aux["load"]


def build_module(method: str, image_dim: int, text_dim: int, num_images: int, vectors: int, heads: int,
                 experts: int, top_k: int) -> nn.Module:
    if method == "ti-att":
        return AttentionInversion(image_dim, text_dim, vectors, heads)
    if method == "ti-moe":
        return MoEInversion(image_dim, text_dim, num_images, vectors, experts, top_k)
    raise ValueError(f"{method!r} has no inversion module")


def module_size(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

