"""The metrics as pure functions of embedding tensors, so each can be checked by hand on small fixed vectors.

* CLIP-I / accuracy (seed 000 §7.2): cosine(generated, reference) as a [refs, generated] matrix; the mean over the
  generated images of a prompt, then the maximum over the references.
* CLIP-T / editability (seed 000 §7.2, seed 004 §5.4): mean cosine between the text embedding of the prompt with
  the style phrase removed and each generated image.
* DINO (seed 004 §5.4, DreamBooth): mean pairwise cosine between DINO CLS embeddings of generated and real images.
* FID and KID (torchmetrics) from feature vectors of any network.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable

import torch

# FID is biased upward and noisy with few images; under this many (or under the feature width, where the
# covariance cannot be full rank) the number says little. 2048 is the usual floor quoted with Inception features.
FID_MIN_IMAGES = 2048
# ", a painting in the style of X" up to the next comma
STYLE_PHRASE = re.compile(r"(?:,\s*)?\b(?:(?:a|an)\s+(?:painting|picture|image|photo)\s+)?"
                          r"in\s+the\s+style\s+of\b[^,]*", re.IGNORECASE)


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to length 1 (float64, so hand-computed values match to many digits)."""
    x = torch.as_tensor(x).double()
    if x.dim() == 1:
        x = x[None]
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[len(a), len(b)] cosine similarities."""
    return unit(a) @ unit(b).T


def clip_i_accuracy(generated: torch.Tensor, references: torch.Tensor) -> float:
    """Seed 000's accuracy for one prompt: cos[r, g] -> mean over generated g -> max over references r."""
    _check(generated, "generated")
    _check(references, "references")
    return float(cosine_matrix(references, generated).mean(dim=1).max())


def clip_t(text: torch.Tensor, generated: torch.Tensor) -> float:
    """Seed 000's editability / CLIP-T for one prompt: mean over generated images of cos(text, image)."""
    _check(generated, "generated")
    return float(cosine_matrix(text, generated)[0].mean())


def dino_similarity(generated: torch.Tensor, references: torch.Tensor) -> float:
    """DINO score: the mean of every pairwise cosine between generated and reference embeddings."""
    _check(generated, "generated")
    _check(references, "references")
    return float(cosine_matrix(generated, references).mean())


def mean(values: Iterable[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _check(x: torch.Tensor, name: str) -> None:
    if torch.as_tensor(x).numel() == 0:
        raise ValueError(f"no {name} images to compare")


# --- prompts -----------------------------------------------------------------------------------


def strip_style(prompt: str, phrases: Iterable[str] = ()) -> str:
    """The prompt CLIP-T compares with: without <lora:...> tags and emphasis syntax, without the given style
    phrases (an embedding's name, "Claude Monet") and without "in the style of ..." up to the next comma."""
    from studio.generation.prompt_syntax import extract_network_tags, parse_attention

    text, _ = extract_network_tags(prompt)
    # the words without A1111's emphasis brackets and weights; BREAK becomes a space
    text = "".join(" " if w == -1.0 else t for t, w in parse_attention(text))
    text = STYLE_PHRASE.sub("", text)
    for phrase in sorted((p for p in phrases if p and p.strip()), key=len, reverse=True):
        text = re.sub(re.escape(phrase.strip()), "", text, flags=re.IGNORECASE)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+,", ",", text)
    text = re.sub(r"(,\s*){2,}", ", ", text)
    return text.strip(" ,")


# --- FID and KID -------------------------------------------------------------------------------


class _Features(torch.nn.Module):
    """The torchmetrics 'feature extractor' for features computed beforehand: it passes them through."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two sets of feature vectors [N, D] (torchmetrics' FrechetInceptionDistance on them)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = torch.as_tensor(real).double(), torch.as_tensor(fake).double()
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID needs at least 2 images on each side, got {len(real)} reference and "
                         f"{len(fake)} generated")
    metric = FrechetInceptionDistance(feature=_Features(real.shape[1]))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over random subsets) with torchmetrics; subsets are at most as large as the smaller set."""
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = torch.as_tensor(real).double(), torch.as_tensor(fake).double()
    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise ValueError(f"KID needs at least 2 images on each side, got {len(real)} reference and "
                         f"{len(fake)} generated")
    with warnings.catch_warnings():  # "KID will save all extracted features in buffer": they are small here
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_Features(real.shape[1]), subsets=subsets, subset_size=size)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the subsets are drawn with torch's global generator
        kid_mean, kid_std = metric.compute()
    return float(kid_mean), float(kid_std)


def fid_warning(n_reference: int, n_generated: int, dim: int) -> str | None:
    """A warning to show beside FID when there are too few images for it to mean much, else None."""
    need = max(FID_MIN_IMAGES, dim)
    fewest = min(n_reference, n_generated)
    if fewest >= need:
        return None
    rank = (f"; with fewer images than the feature width ({dim}) the covariance is not even full rank"
            if fewest < dim else "")
    return (f"FID from {n_generated} generated and {n_reference} reference images is not reliable: FID is biased "
            f"upward and noisy with few images (use at least {need}, usually 10,000 or more){rank}. Compare only "
            "FIDs computed with the same image counts and feature network; KID is unbiased with small sets.")
