"""Pretrain the micro model on the procedural world; writes a diffusers folder (fp16) and an evaluation.

    python -m studio.micro.pretrain --out OUT [--vae-seconds 50 --unet-seconds 380 --images 80000]

1. render the world (seeded, in worker processes), 2. train the VAE (reconstruction + small KL),
3. encode every image once, 4. train UNet and text encoder together on the captions (epsilon
objective with Min-SNR weighting, 10% empty captions for classifier-free guidance, EMA), 5. save and
pack, 6. train a canny ControlNet on the world's edge maps against the frozen EMA model, 7. evaluate the
EMA model with the oracle on the fixed prompt set, and the ControlNet by placing unplaced prompts. Stages are bounded by seconds as well as steps, so
a run fits the lent GPU's time; the folder is packed into 15 MB parts periodically (the device tool
returns files of at most 16 MB), and `--init-from` continues from a saved folder.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from studio.micro import oracle, world

PART_BYTES = 15 * 1024 * 1024
# SD 1.5's noise schedule (the prediction type is PretrainConfig.prediction)
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                steps_offset=1)


@dataclass
class PretrainConfig:
    out: str = "outputs/micro-pretrain"
    seed: int = 0
    images: int = 80_000  # rendered world images (textures plain/striped/dotted, 10% two objects)
    size: int = world.SIZE
    workers: int = 0  # render processes; 0 = all CPUs
    # VAE
    vae_steps: int = 4000
    vae_seconds: float = 50.0
    vae_batch: int = 256
    vae_lr: float = 1e-3
    kl_weight: float = 1e-5  # per latent element against per pixel squared error (sums, as in LDM)
    # extra VAE-only images (as a share of `images`) drawn with every texture, the held-out ones too: the style stays
    # out of the captions and the UNet, but the VAE can draw it, so TI / LoRA can teach it later (with 0, the VAE
    # cannot reproduce diagonal stripes: docs/micro-model.md)
    vae_held_out: float = 0.5
    # UNet + text encoder
    unet_steps: int = 100_000
    unet_seconds: float = 380.0
    unet_batch: int = 256
    unet_lr: float = 5e-4
    warmup: int = 200
    cfg_dropout: float = 0.1  # captions replaced by "" so that guidance works
    noise_offset: float = 0.05  # lets the model reach very dark and very bright backgrounds
    # v-prediction (as SD 2.x-v): at high noise the target is about -x0, so the loss rewards putting the object where
    # the prompt says; with epsilon the first run learned colour, shape and size but not position (docs/micro-model.md)
    prediction: str = "v_prediction"  # or "epsilon"
    min_snr_gamma: float = 5.0  # Min-SNR-5 loss weights (Hang et al. 2023): faster convergence; 0 = plain MSE
    ema_decay: float = 0.999
    pack_every_s: float = 120.0
    # canny ControlNet (ControlNetModel.from_unet of the EMA UNet), trained on the world's cv2.Canny(100, 200) maps
    controlnet_seconds: float = 60.0  # 0 skips it
    controlnet_batch: int = 256
    controlnet_lr: float = 2e-4
    controlnet_prompt_dropout: float = 0.5  # as ControlNet's authors: half the captions empty, so edges alone steer
    # evaluation
    eval_prompts: int = 200  # 0 skips the evaluation (python -m studio.micro.evaluate does it later)
    eval_steps: int = 20
    eval_guidance: tuple[float, ...] = (3.0, 5.0, 7.5)
    init_from: str = ""  # a saved micro folder to continue from (its VAE is kept, not retrained)
    tokenizer_dir: str = ""  # a saved CLIP tokenizer folder; default: built from open_clip's BPE file


# --- 0. the model: same classes as SD 1.x, tiny widths ----------------------------------------------


def build_vae():
    from diffusers import AutoencoderKL

    # three blocks: 4x down-scaling, so 64 px images give 16x16x4 latents
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64, 64),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         latent_channels=4, layers_per_block=1, norm_num_groups=32, sample_size=world.SIZE)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=world.SIZE // 4, in_channels=4, out_channels=4, block_out_channels=(64, 128, 192),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32)


def build_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    # SD 1.x's text encoder shape (OpenAI CLIP: quick_gelu, pads with <|endoftext|>), narrow and shallow;
    # the 49408-token embedding is most of its size
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=128, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))


def load_tokenizer(cfg: PretrainConfig):
    if cfg.tokenizer_dir:
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(cfg.tokenizer_dir)
    from studio.models.tokenizer import clip_tokenizer

    return clip_tokenizer("sd1")


def make_scheduler(prediction: str = "v_prediction"):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**SCHEDULE, prediction_type=prediction)


# --- 1. data ----------------------------------------------------------------------------------------

CHUNK = 1000


def _render_chunk(args) -> tuple[np.ndarray, list[str]]:
    seed, n, size = args
    images, captions, _ = world.dataset(n, seed, size=size, textures=world.TEXTURES,
                                        texture_weights=(0.6, 0.2, 0.2), p_two=0.1)
    return images, captions


def _render_vae_chunk(args) -> np.ndarray:
    seed, n, size = args
    return world.dataset(n, seed, size=size, textures=world.TEXTURES + world.HELD_OUT_TEXTURES, p_two=0.1)[0]


def render_world(cfg: PretrainConfig, count: int | None = None, offset: int = 0, fn=_render_chunk):
    """cfg.images scenes in chunks of 1000, chunk i seeded (seed, i): the same set for any worker count."""
    count = cfg.images if count is None else count
    jobs = [(cfg.seed * 1_000_003 + offset + i, min(CHUNK, count - i * CHUNK), cfg.size)
            for i in range(math.ceil(count / CHUNK))]
    workers = cfg.workers or os.cpu_count() or 1
    if workers == 1 or len(jobs) == 1:
        parts = [fn(j) for j in jobs]
    else:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(fn, jobs))
    if fn is _render_vae_chunk:
        return np.concatenate(parts)
    return np.concatenate([p[0] for p in parts]), [c for p in parts for c in p[1]]


def to_pixels(batch_uint8: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    return batch_uint8.permute(0, 3, 1, 2).float() / 127.5 - 1.0


# --- 2. VAE -----------------------------------------------------------------------------------------


def train_vae(vae, images: torch.Tensor, cfg: PretrainConfig, device, log) -> None:
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    g = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
    start, step = time.time(), 0
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    while step < cfg.vae_steps and time.time() - start < cfg.vae_seconds:
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=g)
        x = to_pixels(images[idx.to(images.device)].to(device))
        with amp:
            post = vae.encode(x).latent_dist
            recon = vae.decode(post.sample()).sample
        rec = ((recon.float() - x) ** 2).flatten(1).sum(1)
        kl = post.kl().float()
        loss = (rec + cfg.kl_weight * kl).mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0 or step == 1:
            log(f"vae step {step} mse {rec.mean().item() / x[0].numel():.5f} kl {kl.mean().item():.1f} "
                f"{time.time() - start:.0f}s")
    vae.eval().requires_grad_(False)
    log(f"vae done: {step} steps in {time.time() - start:.0f}s")


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, device, batch: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (unscaled), kept to sample fresh latents each step."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        d = vae.encode(to_pixels(images[i: i + batch].to(device))).latent_dist
        means.append(d.mean.float())
        stds.append(d.std.float())
    return torch.cat(means), torch.cat(stds)


# --- 4. UNet + text encoder -------------------------------------------------------------------------


class EMA:
    def __init__(self, modules, decay: float):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone().float() for p in self.params]
        self.decay = decay
        self.steps = 0

    @torch.no_grad()
    def update(self):
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to(self, modules):
        params = [p for m in modules for p in m.parameters()]
        for p, s in zip(params, self.shadow, strict=True):
            p.copy_(s.to(p.dtype))


def snr_weights(alphas_cumprod_t: torch.Tensor, gamma: float, prediction: str = "epsilon") -> torch.Tensor:
    """Min-SNR-gamma weights: min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v (1 everywhere
    when gamma is 0)."""
    if gamma <= 0:
        return torch.ones_like(alphas_cumprod_t)
    snr = alphas_cumprod_t / (1 - alphas_cumprod_t)
    return snr.clamp(max=gamma) / (snr + 1 if prediction == "v_prediction" else snr)


def target_for(prediction: str, x0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to output: the noise, or v = sqrt(a) noise - sqrt(1 - a) x0."""
    if prediction == "v_prediction":
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    if prediction != "epsilon":
        raise ValueError(f"prediction must be epsilon or v_prediction, got {prediction!r}")
    return noise


def train_unet(unet, text_encoder, means, stds, ids, empty_ids, scaling, cfg, device, log, on_pack):
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(**SCHEDULE)
    alphas = noise_sched.alphas_cumprod.to(device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    for m in (unet, text_encoder):
        m.train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    ema = EMA([unet, text_encoder], cfg.ema_decay)
    g = torch.Generator(device=device).manual_seed(cfg.seed + 2)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    start = last_pack = time.time()
    step, losses = 0, []
    n = len(means)
    while step < cfg.unet_steps:
        frac = (time.time() - start) / cfg.unet_seconds
        if frac >= 1:
            break
        # warm up, hold, then decay to 10% over the last 30% of the time budget
        lr = cfg.unet_lr * min(1.0, (step + 1) / cfg.warmup) * (1.0 if frac < 0.7 else 1 - 0.9 * (frac - 0.7) / 0.3)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, n, (cfg.unet_batch,), device=device, generator=g)
        x0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, device=device, generator=g)) * scaling
        tok = ids[idx].clone()
        drop = torch.rand(len(idx), device=device, generator=g) < cfg.cfg_dropout
        tok[drop] = empty_ids
        noise = torch.randn(x0.shape, device=device, generator=g)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn((len(idx), x0.shape[1], 1, 1), device=device, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), device=device, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with amp:
            context = text_encoder(tok)[0]
            pred = unet(noisy, t, encoder_hidden_states=context).sample
        loss = (snr_weights(a.view(-1), cfg.min_snr_gamma, cfg.prediction)
                * F.mse_loss(pred.float(), target_for(cfg.prediction, x0, noise, a), reduction="none").mean(dim=(1, 2, 3))
                ).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        step += 1
        losses.append(loss.item() if step % 50 == 0 else None)
        if step % 200 == 0 or step == 1:
            recent = [v for v in losses[-1000:] if v is not None]
            log(f"unet step {step} loss {np.mean(recent) if recent else loss.item():.4f} lr {lr:.2e} "
                f"{time.time() - start:.0f}s")
        if time.time() - last_pack > cfg.pack_every_s:
            on_pack(ema, step)
            last_pack = time.time()
    log(f"unet done: {step} steps in {time.time() - start:.0f}s")
    return ema, step


# --- 6. canny ControlNet ----------------------------------------------------------------------------

CANNY_LOW, CANNY_HIGH = 100, 200  # the storyboard's default thresholds (studio.control.preprocess.canny_map at 64 px)


def canny_edges(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, H, W) uint8 edge maps: cv2.Canny on the RGB pixels, as controlnet_aux's
    CannyDetector (and so the storyboard) computes them."""
    import cv2

    return np.stack([cv2.Canny(im, CANNY_LOW, CANNY_HIGH) for im in images]) if len(images) else \
        np.zeros(images.shape[:3], np.uint8)


def build_controlnet(unet):
    from diffusers import ControlNetModel

    # two stride-2 convolutions in the conditioning embedding: 64 px edge maps -> the 16x16 latent grid
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 64))


def edge_condition(edges: torch.Tensor) -> torch.Tensor:
    """(B, H, W) uint8 edges -> (B, 3, H, W) float in [0, 1], the pipelines' control image layout."""
    return (edges.float() / 255.0).unsqueeze(1).expand(-1, 3, -1, -1)


def train_controlnet(controlnet, unet, text_encoder, means, stds, edges, ids, empty_ids, scaling, cfg, device, log):
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(**SCHEDULE)
    alphas = noise_sched.alphas_cumprod.to(device)
    for m in (unet, text_encoder):
        m.eval().requires_grad_(False)
    controlnet.train().requires_grad_(True)
    opt = torch.optim.AdamW(controlnet.parameters(), lr=cfg.controlnet_lr, weight_decay=0.0)
    g = torch.Generator(device=device).manual_seed(cfg.seed + 3)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    start, step, recent = time.time(), 0, []
    while time.time() - start < cfg.controlnet_seconds:
        idx = torch.randint(0, len(means), (cfg.controlnet_batch,), device=device, generator=g)
        x0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, device=device, generator=g)) * scaling
        tok = ids[idx].clone()
        tok[torch.rand(len(idx), device=device, generator=g) < cfg.controlnet_prompt_dropout] = empty_ids
        noise = torch.randn(x0.shape, device=device, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), device=device, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with amp:
            with torch.no_grad():
                context = text_encoder(tok)[0]
            down, mid = controlnet(noisy, t, encoder_hidden_states=context, controlnet_cond=edge_condition(edges[idx]),
                                   return_dict=False)
            pred = unet(noisy, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample
        loss = F.mse_loss(pred.float(), target_for(cfg.prediction, x0, noise, a))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            recent.append(loss.item())
        if step % 200 == 0 or step == 1:
            log(f"controlnet step {step} loss {np.mean(recent[-10:]) if recent else loss.item():.4f} "
                f"{time.time() - start:.0f}s")
    controlnet.eval().requires_grad_(False)
    log(f"controlnet done: {step} steps in {time.time() - start:.0f}s")
    return step


# --- 5. save and pack -------------------------------------------------------------------------------


def assemble(vae, unet, text_encoder, tokenizer, prediction: str, dtype=torch.float16):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=make_scheduler(prediction), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def save_folder(pipe, folder: Path, info: dict) -> None:
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / "training.json").write_text(json.dumps(info, indent=1), encoding="utf-8")


def pack(folder: Path, out_dir: Path, name: str = "micro") -> list[Path]:
    """The folder as an uncompressed tar split into parts of at most 15 MB, replaced atomically."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(folder, arcname=name)
    data = buf.getvalue()
    parts = []
    for i in range(0, len(data), PART_BYTES):
        p = out_dir / f"{name}.tar.{i // PART_BYTES:02d}"
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_bytes(data[i: i + PART_BYTES])
        os.replace(tmp, p)
        parts.append(p)
    for old in out_dir.glob(f"{name}.tar.[0-9][0-9]"):
        if old not in parts:
            old.unlink()
    return parts


def unpack(parts_dir: Path, dest: Path, name: str = "micro") -> Path:
    """Join micro.tar.NN parts and extract them under dest; returns dest/name."""
    parts = sorted(Path(parts_dir).glob(f"{name}.tar.[0-9][0-9]"))
    if not parts:
        raise FileNotFoundError(f"no {name}.tar.NN parts in {parts_dir}")
    data = b"".join(p.read_bytes() for p in parts)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return Path(dest) / name


# --- 6. evaluation ----------------------------------------------------------------------------------


@torch.no_grad()
def generate(pipe, prompts: list[str], steps: int, guidance: float, seed: int = 0, batch: int = 200) -> list[np.ndarray]:
    images = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i: i + batch]
        gens = [torch.Generator("cpu").manual_seed(seed + i + j) for j in range(len(chunk))]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="np")
        images += [np.clip(np.rint(im * 255), 0, 255).astype(np.uint8) for im in out.images]
    return images


def evaluate(pipe, cfg: PretrainConfig) -> tuple[dict, list[np.ndarray]]:
    scenes = world.eval_scenes(cfg.eval_prompts)
    prompts = [world.caption(s) for s in scenes]
    result, best_images, best = {}, None, -1.0
    for gs in cfg.eval_guidance:
        images = generate(pipe, prompts, cfg.eval_steps, gs)
        acc = oracle.accuracy(scenes, images, attributes=("background", "colour", "shape", "position", "size"))
        result[f"guidance_{gs:g}"] = acc
        core = np.mean([acc[a] for a in ("background", "colour", "shape", "position")])
        if core > best:
            best, best_images = core, images
    return result, best_images


def unplaced(scene) -> str:
    """The scene's caption without its position: where the object goes is left to the ControlNet."""
    text = world.caption(scene)
    return text.rsplit(", ", 1)[0] if scene.count == 1 else text


@torch.no_grad()
def evaluate_controlnet(pipe, controlnet, cfg: PretrainConfig, guidance: float = 5.0, batch: int = 200) -> dict:
    """Oracle accuracy of unplaced prompts with each scene's canny map as the control, and without it (chance
    for position): the ControlNet works when the object lands where the edges put it."""
    from diffusers import StableDiffusionControlNetPipeline
    from PIL import Image

    scenes = world.eval_scenes(cfg.eval_prompts)
    prompts = [unplaced(s) for s in scenes]
    edges = canny_edges(np.stack([world.render(s, cfg.size) for s in scenes]))
    cn_pipe = StableDiffusionControlNetPipeline.from_pipe(pipe, controlnet=controlnet)
    cn_pipe.set_progress_bar_config(disable=True)
    attributes = ("background", "colour", "shape", "position", "size")
    result = {}
    for label, use in (("with_control", True), ("without_control", False)):
        images = []
        for i in range(0, len(prompts), batch):
            chunk = prompts[i: i + batch]
            gens = [torch.Generator("cpu").manual_seed(i + j) for j in range(len(chunk))]
            kwargs = dict(num_inference_steps=cfg.eval_steps, guidance_scale=guidance, generator=gens, output_type="np")
            if use:
                control = [Image.fromarray(e).convert("RGB") for e in edges[i: i + batch]]
                out = cn_pipe(chunk, image=control, **kwargs)
            else:
                out = pipe(chunk, **kwargs)
            images += [np.clip(np.rint(im * 255), 0, 255).astype(np.uint8) for im in out.images]
        result[label] = oracle.accuracy(scenes, images, attributes=attributes)
    result["guidance"] = guidance
    return result


def save_grid(images: list[np.ndarray], path: Path, cols: int = 10, rows: int = 8, scale: int = 2) -> None:
    from PIL import Image

    n = min(len(images), cols * rows)
    h, w = images[0].shape[:2]
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = images[k]
    Image.fromarray(grid).resize((cols * w * scale, rows * h * scale), Image.NEAREST).save(path)


# --- the recipe -------------------------------------------------------------------------------------


def run(cfg: PretrainConfig) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "log.txt", "a", encoding="utf-8")
    t0 = time.time()

    def log(msg):
        line = f"[{time.time() - t0:6.1f}s] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    tokenizer = load_tokenizer(cfg)
    # 1. data (before CUDA starts: the workers fork)
    images_np, captions = render_world(cfg)
    vae_extra = np.zeros((0, cfg.size, cfg.size, 3), np.uint8)
    if cfg.vae_held_out > 0 and not cfg.init_from:
        vae_extra = render_world(cfg, int(cfg.images * cfg.vae_held_out), offset=500_000, fn=_render_vae_chunk)
    log(f"rendered {len(images_np)} images (+{len(vae_extra)} for the VAE only)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    images = torch.from_numpy(images_np).to(device)

    # 2. VAE (or the one of the folder we continue from)
    if cfg.init_from:
        from diffusers import StableDiffusionPipeline

        base = StableDiffusionPipeline.from_pretrained(cfg.init_from, dtype=torch.float32)
        vae, unet, text_encoder = base.vae, base.unet, base.text_encoder
        vae.to(device).requires_grad_(False)
        scaling = float(vae.config.scaling_factor)
        log(f"continuing from {cfg.init_from}")
    else:
        torch.manual_seed(cfg.seed)
        vae, unet, text_encoder = build_vae(), build_unet(), build_text_encoder()
        vae.to(device)
        vae_images = torch.cat([images, torch.from_numpy(vae_extra).to(device)]) if len(vae_extra) else images
        train_vae(vae, vae_images, cfg, device, log)
        del vae_images
        scaling = None
    # 3. latents once; the scaling factor gives them unit variance, as SD's 0.18215 does
    means, stds = encode_all(vae, images, device)
    if scaling is None:
        scaling = float(1.0 / (means + stds * torch.randn_like(means)).std())
        vae.register_to_config(scaling_factor=scaling)
    log(f"latents {tuple(means.shape)} scaling {scaling:.4f}")
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids = ids.to(device)
    edges = torch.from_numpy(canny_edges(images_np)).to(device) if cfg.controlnet_seconds > 0 else None
    empty_ids = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0].to(device)
    del images

    unet.to(device)
    text_encoder.to(device)
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"micro-{os.getpid()}"
    info = {"config": asdict(cfg), "scaling_factor": scaling, "device": torch.cuda.get_device_name()
            if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    def save_ema(ema, step):
        u, te = build_unet(), build_text_encoder()
        u.load_state_dict(unet.state_dict())
        te.load_state_dict(text_encoder.state_dict())
        ema.copy_to([u, te])
        pipe = assemble(vae.to("cpu"), u, te, tokenizer, cfg.prediction)
        save_folder(pipe, folder, {**info, "unet_steps": step, "seconds": round(time.time() - t0)})
        vae.to(device=device, dtype=torch.float32)
        pack(folder, out)
        log(f"packed step {step}")
        return pipe

    # 4. UNet + text encoder
    ema, steps = train_unet(unet, text_encoder, means, stds, ids, empty_ids, scaling, cfg, device, log, save_ema)
    # 5. save the EMA weights (fp16)
    pipe = save_ema(ema, steps)
    # 6. a canny ControlNet for the EMA model (what ships), trained against it frozen
    cn_folder, cn_steps = folder.parent / f"{folder.name}-controlnet-canny", 0
    if cfg.controlnet_seconds > 0:
        ema.copy_to([unet, text_encoder])
        controlnet = build_controlnet(unet).to(device)
        cn_steps = train_controlnet(controlnet, unet, text_encoder, means, stds, edges, ids, empty_ids, scaling, cfg,
                                    device, log)
        controlnet.to(torch.float16).save_pretrained(cn_folder, safe_serialization=True)
        pack(cn_folder, out, name="micro-controlnet-canny")
        log("packed the ControlNet")
        del controlnet
    if cfg.eval_prompts <= 0:
        log("evaluation skipped (--eval-prompts 0)")
        return {**info, "unet_steps": steps}
    # 6. evaluate what was saved: reload the folder, as users will
    from diffusers import StableDiffusionPipeline

    eval_dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=eval_dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    result, best_images = evaluate(pipe, cfg)
    report = {**info, "unet_steps": steps, "controlnet_steps": cn_steps, "eval": result,
              "eval_prompts": cfg.eval_prompts,
              "eval_steps": cfg.eval_steps, "scheduler": type(pipe.scheduler).__name__,
              "total_seconds": round(time.time() - t0)}
    (out / "eval.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    save_grid(best_images, out / "samples.png")
    log(json.dumps(result))
    if cn_steps:
        from diffusers import ControlNetModel

        controlnet = ControlNetModel.from_pretrained(cn_folder, dtype=eval_dtype).to(device)
        report["controlnet"] = evaluate_controlnet(pipe, controlnet, cfg)
        (out / "eval.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
        log(json.dumps(report["controlnet"]))
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = PretrainConfig()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, tuple):
            p.add_argument(flag, type=float, nargs="+", default=value)
        else:
            p.add_argument(flag, type=type(value), default=value)
    args = p.parse_args(argv)
    cfg = PretrainConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(args).items()})
    run(cfg)


if __name__ == "__main__":
    main()
