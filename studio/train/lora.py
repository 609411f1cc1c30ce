"""LoRA (and DreamBooth-LoRA) on the shared loop: peft adapters on the UNet's attention projections (optionally
more layers, optionally the text encoders' q/k/v/out: SDXL's two with one rate), written as a kohya-format file
(SDXL: original UNet names, lora_te1_ / lora_te2_) with `ss_*` / `modelspec.*` metadata that A1111, ComfyUI, kohya
and diffusers load.

The same method trains the LyCORIS networks (TrainJob.network): LoCon (LoRA with the ResNet 3x3 convolutions), LoHa,
LoKr and DoRA, written in LyCORIS' keys (`hada_w1_a`, `lokr_w1`, `dora_scale`, …; studio.files.networks'
peft_to_lycoris_layers) that A1111, ComfyUI, kohya and the studio's own loader read. They are peft's adapters
(`LoHaConfig`, `LoKrConfig`, `LoraConfig(use_dora=True)`, LoraConfig with conv targets), not the lycoris-lora
package's: peft is already the training dependency (checkpoints, resume, accelerate, SDXL's text encoders all work
as for LoRA), it is installed where the studio is (lycoris-lora is not), and its LoHa/LoKr parameters are LyCORIS'
own, ported from it (the same names, shapes, products and factorization), so they map 1:1 onto LyCORIS' keys; only
the scale is written as alpha / rank, and DoRA's magnitude as LyCORIS' per-output `dora_scale`."""

from __future__ import annotations

import datetime as dt
import random
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from studio.files.atomic import atomic_path
from studio.files.networks import (
    LORA_EXTS,
    kohya_metadata,
    network_metadata,
    peft_to_layers,
    peft_to_lycoris_layers,
    save_kohya_lora,
    save_kohya_network,
)
from studio.generation.conditioning import PromptEncoder, XLPromptEncoder
from studio.train.data import STREAM_INIT, rng_seed
from studio.train.job import LORA_TARGETS, NETWORK_LABELS, TEXT_ENCODER_TARGETS, TrainJob
from studio.train.method import (
    CachedText,
    ParamGroup,
    TrainContext,
    TrainMethod,
    check_output_free,
    first_rate,
    rate_function,
)
from studio.train.schedule import warmup_steps
from studio.train.templates import fill_template

ADAPTER = "studio_train"
# the UNet's 3x3 convolutions a conv rank trains (LyCORIS' and kohya's conv_dim: the ResNet blocks' and the down- and
# upsamplers'); a regex of module-name ends, as peft's rank_pattern / alpha_pattern read it
CONV_TARGETS = ["conv1", "conv2", "downsamplers.0.conv", "upsamplers.0.conv"]
CONV_PATTERN = r"conv1|conv2|downsamplers\.0\.conv|upsamplers\.0\.conv"


def network_config(job: TrainJob, targets: list[str], convs: bool = False, **extra):
    """The peft config of the job's network on `targets` (module-name ends); `convs`: the UNet, where a conv rank
    (TrainJob.conv_dims) adds the 3x3 convolutions at their own rank and alpha. `extra`: more config fields (SDXL's
    layers_to_transform). LoHa and LoKr have no input dropout in peft: the job's dropout drops ΔW's output rows
    there (LyCORIS' rank_dropout)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    alpha = float(job.alpha if job.alpha is not None else job.rank)
    conv = job.conv_dims if convs else None
    targets = list(targets)
    if conv is not None:
        targets += [t for t in CONV_TARGETS if t not in targets]
        extra.update(rank_pattern={CONV_PATTERN: conv[0]}, alpha_pattern={CONV_PATTERN: conv[1]})
    if job.network == "loha":
        return LoHaConfig(r=job.rank, alpha=alpha, rank_dropout=job.dropout, target_modules=targets, **extra)
    if job.network == "lokr":
        return LoKrConfig(r=job.rank, alpha=alpha, rank_dropout=job.dropout, decompose_factor=job.lokr_factor,
                          target_modules=targets, **extra)
    return LoraConfig(r=job.rank, lora_alpha=alpha, lora_dropout=job.dropout, init_lora_weights="gaussian",
                      use_dora=job.network == "dora", target_modules=targets, **extra)


def adapter_scaling(module: nn.Module, adapter: str = ADAPTER) -> dict[str, float]:
    """Module path -> peft's scale (alpha / r) of the adapter's layers in `module`, for peft_to_lycoris_layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: float(layer.scaling[adapter]) for name, layer in module.named_modules()
            if isinstance(layer, BaseTunerLayer) and adapter in getattr(layer, "scaling", {})}


def caption_prompt(job: TrainJob, caption: str) -> str:
    """An image's training prompt: the instance prompt ([filewords] = the caption) or the caption itself."""
    if job.instance_prompt.strip():
        return fill_template(job.instance_prompt, job.name, caption)
    return caption


def tag_frequency(captions: list[str], dataset_name: str) -> dict[str, dict[str, int]]:
    """kohya's `ss_tag_frequency`: {dataset: {tag: count}} over comma-separated caption tags."""
    counts = Counter(tag.strip() for caption in captions for tag in caption.split(",") if tag.strip())
    return {dataset_name: dict(counts.most_common())}


class LoraMethod(TrainMethod):
    label = "LoRA"

    def __init__(self, ctx: TrainContext, captions: list[str]):
        super().__init__(ctx)
        job = ctx.job
        self.captions = captions
        self.label = NETWORK_LABELS[job.network].split(" (")[0]
        alpha = job.alpha if job.alpha is not None else job.rank
        # the UNet (and text encoder) run in the mixed-precision dtype; the LoRA weights train in fp32
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng_seed(job.seed, STREAM_INIT))
            self.unet.add_adapter(network_config(job, LORA_TARGETS[job.lora_targets], convs=True),
                                  adapter_name=ADAPTER)
            for encoder in self.encoders():
                encoder.add_adapter(network_config(job, TEXT_ENCODER_TARGETS, **self.used_layers(encoder)),
                                    adapter_name=ADAPTER)
        self.alpha = alpha
        self.modules = {"unet": self.unet}
        self.modules.update(zip(("text_encoder", "text_encoder_2"), self.encoders(), strict=False))
        for module in self.modules.values():
            for p in module.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        if job.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            for encoder in self.encoders():
                encoder.gradient_checkpointing_enable()
        self.unet.train()
        for encoder in self.encoders():
            encoder.train()

    def used_layers(self, encoder: nn.Module) -> dict:
        """SDXL's first text encoder: adapters on all layers but the last, whose output SDXL never reads (it takes
        the penultimate layer; the pooled embedding comes from the second encoder). A LoRA there would never train,
        and several GPUs refuse parameters without gradients."""
        if not self.xl or encoder is not self.text_encoder:
            return {}
        return {"layers_to_transform": list(range(encoder.config.num_hidden_layers - 1)), "layers_pattern": "layers"}

    def encoders(self) -> list[nn.Module]:
        """The text encoders that get adapters: none, the one, or (SDXL) both."""
        if not self.job.train_text_encoder:
            return []
        return [self.text_encoder, self.text_encoder_2] if self.xl else [self.text_encoder]

    @staticmethod
    def check_output(cfg, job: TrainJob) -> None:
        check_output_free(cfg.loras_dir, job, LORA_EXTS)

    def _trained(self, module: nn.Module) -> list[nn.Parameter]:
        return [p for p in module.parameters() if p.requires_grad]

    def param_groups(self) -> list[ParamGroup]:
        groups = [ParamGroup("unet", self._trained(self.unet), rate_function(self.job, self.job.learning_rate))]
        if self.job.train_text_encoder:  # SDXL: both encoders, one rate
            te_rate = self.job.text_encoder_lr if self.job.text_encoder_lr is not None else self.job.learning_rate
            params = [p for encoder in self.encoders() for p in self._trained(encoder)]
            groups.append(ParamGroup("text_encoder", params, rate_function(self.job, te_rate)))
        return groups

    def prompts(self, captions: list[str], rng: random.Random) -> list[str]:
        return [caption_prompt(self.job, caption) for caption in captions]

    def encode(self, prompts: list[str], generator: torch.Generator | None):
        if self.xl:
            return self._encode_xl(prompts)
        if getattr(self, "_encoder", None) is None:  # built once (its vocabulary lookup costs ~20 ms), after prepare()
            self._encoder = PromptEncoder(self.tokenizer, self.text_encoder, runner=self.trainable("text_encoder"))
        encoder = self._encoder
        if self.job.train_text_encoder:
            return encoder.encode_batch(prompts)
        with torch.no_grad():
            return encoder.encode_batch(prompts)

    def _encode_xl(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL: through both (trained) text encoders, or from the per-caption cache when they are frozen."""
        if getattr(self, "_encoder", None) is None:  # after prepare(): the wrapped encoders run the forward pass
            encoder = XLPromptEncoder(self.ctx.pipe)
            if self.job.train_text_encoder:
                encoder.set_runners(self.trainable("text_encoder"), self.trainable("text_encoder_2"))
            # frozen encoders: per prompt, kept unless the caption options change prompts every step
            self._encoder = (encoder if self.job.train_text_encoder
                             else CachedText(encoder, keep=not self.caption_options.random))
        if self.job.train_text_encoder:
            return self._encoder.encode_batch(prompts)
        return self._encoder(prompts)

    def denoiser(self) -> nn.Module:
        return self.trainable("unet")

    # checkpoints: only the adapter weights

    def state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        state = {}
        for name, module in self.modules.items():
            state.update({f"{name}.{k}": v for k, v in get_peft_model_state_dict(module, adapter_name=ADAPTER).items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        for name, module in self.modules.items():
            part = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(f"{name}.")}
            result = set_peft_model_state_dict(module, part, adapter_name=ADAPTER)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"checkpoint does not fit this LoRA: unexpected {result.unexpected_keys[:3]}")

    def preview_encoder(self) -> PromptEncoder | XLPromptEncoder:
        return XLPromptEncoder(self.ctx.pipe) if self.xl else PromptEncoder(self.tokenizer, self.text_encoder)

    # the file

    def metadata(self, step: int) -> dict[str, str]:
        job, ctx = self.job, self.ctx
        data_name = Path(str(job.data)).name
        trigger = job.instance_prompt.replace("[filewords]", "").strip(" ,") if job.instance_prompt else ""
        trigger = trigger or job.caption_prefix.strip(" ,")  # a caption prefix is the trigger word of tag runs
        return kohya_metadata(
            output_name=job.name, family=ctx.model.family, rank=job.rank, alpha=float(self.alpha),
            base_model_name=ctx.model.name, steps=step, num_images=len(self.captions),
            resolution=(job.resolution, job.resolution), learning_rate=first_rate(job.learning_rate),
            unet_lr=first_rate(job.learning_rate),
            text_encoder_lr=(job.text_encoder_lr if job.text_encoder_lr is not None
                             else first_rate(job.learning_rate)) if job.train_text_encoder else None,
            lr_scheduler=job.lr_scheduler, optimizer=job.optimizer_label(), seed=job.seed, trigger_phrase=trigger,
            tag_frequency=tag_frequency(self.captions, data_name),
            lr_warmup_steps=warmup_steps(job.lr_warmup, job.max_steps),
            lr_scheduler_num_cycles=job.lr_cycles if job.lr_scheduler == "cosine_with_restarts" else None,
            shuffle_caption=job.shuffle_tags, keep_tokens=job.keep_tokens, caption_dropout_rate=job.caption_dropout,
            caption_tag_dropout_rate=job.tag_dropout, caption_dropout_every_n_epochs=0,
            comment=f"trained with studio ({job.method}); run {ctx.run_path.name if ctx.run_path else ''}",
            extra={**self.bucket_metadata(),
                   **network_metadata(job.network, job.conv_dims, job.lokr_factor,
                                      job.dropout if job.network in ("loha", "lokr") else 0.0),
                   "ss_sd_model_hash": ctx.model_hash[:10], "ss_new_sd_model_hash": ctx.model_hash,
                   "ss_masked_loss": job.masked_loss,  # kohya's key; the unmasked weight is the studio's
                   **({"ss_unmasked_weight": job.unmasked_weight} if job.masked_loss else {}),
                   "ss_network_dropout": job.dropout, "ss_max_train_steps": job.max_steps,
                   "ss_batch_size_per_device": job.batch_size, "ss_gradient_accumulation_steps": job.grad_accum,
                   "ss_mixed_precision": job.mixed_precision, "ss_min_snr_gamma": job.min_snr_gamma or "",
                   "ss_noise_offset": job.noise_offset or "", "ss_prior_loss_weight": job.prior_loss_weight,
                   "ss_num_reg_images": job.class_images, "ss_gradient_checkpointing": job.gradient_checkpointing,
                   "studio.method": job.method, "studio.lora_targets": job.lora_targets,
                   **({"studio.network": job.network} if job.network != "lora" else {}),
                   **({"studio.caption_prefix": job.caption_prefix} if job.caption_prefix else {}),
                   **({"studio.caption_suffix": job.caption_suffix} if job.caption_suffix else {}),
                   "modelspec.date": dt.date.today().isoformat()})

    def bucket_metadata(self) -> dict[str, str]:
        """kohya's bucket keys (`ss_enable_bucket`, `ss_bucket_info`), for runs on aspect-ratio buckets."""
        if not self.ctx.bucketed:
            return {}
        rule = self.job.bucket_rule()
        out = {"ss_enable_bucket": "True", "ss_bucket_no_upscale": str(bool(rule.no_upscale))}
        if rule.kohya:  # kohya's own keys for its bucket rule
            out.update({"ss_min_bucket_reso": str(rule.min_side or 256), "ss_max_bucket_reso": str(rule.max_side or 1024)})
        return out

    def layers(self, name: str) -> dict:
        """Module path -> LoraLayer of one trained module (empty when it has no adapter)."""
        from peft import get_peft_model_state_dict

        module = self.modules.get(name)
        if module is None:
            return {}
        state = get_peft_model_state_dict(module, adapter_name=ADAPTER)
        if self.job.network != "lora":  # module path -> {LyCORIS suffix: tensor}
            return peft_to_lycoris_layers(state, adapter_scaling(module))
        return peft_to_layers(state, self.alpha)

    def save(self, step: int, final: bool, run_path: Path | None) -> Path:
        job, ctx = self.job, self.ctx
        if final:
            path = Path(ctx.cfg.loras_dir) / f"{job.name}.safetensors"
        else:
            path = run_path / "loras" / f"{job.name}-{step}.safetensors"
        te_layers = self.layers("text_encoder") if job.train_text_encoder else None
        write = save_kohya_lora if job.network == "lora" else save_kohya_network
        if self.xl:  # kohya's SDXL layout: original (SGM) UNet names, lora_te1_ / lora_te2_
            from studio.files.convert import original_unet_module_names

            write(path, self.layers("unet"), te_layers, self.metadata(step),
                  text_encoder_2=self.layers("text_encoder_2"), unet_names=original_unet_module_names(self.unet))
        else:
            write(path, self.layers("unet"), te_layers, self.metadata(step))
        if final and job.save_diffusers and run_path is not None:
            self.save_diffusers_copy(run_path / "diffusers")
        return path

    def save_diffusers_copy(self, folder: Path) -> Path:
        """diffusers' own layout (`pytorch_lora_weights.safetensors`), for `load_lora_weights(folder)`."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from peft.utils import get_peft_model_state_dict

        folder.mkdir(parents=True, exist_ok=True)
        unet_state = get_peft_model_state_dict(self.unet, adapter_name=ADAPTER)
        te_state = (get_peft_model_state_dict(self.text_encoder, adapter_name=ADAPTER)
                    if self.job.train_text_encoder else None)
        kwargs = {}
        if self.xl:
            te2 = self.text_encoder_2
            te2_state = get_peft_model_state_dict(te2, adapter_name=ADAPTER) if te_state else None
            kwargs = {"text_encoder_2_lora_layers": te2_state, "text_encoder_2_lora_adapter_metadata":
                      te2.peft_config[ADAPTER].to_dict() if te2_state else None}
        pipeline_class = StableDiffusionXLPipeline if self.xl else StableDiffusionPipeline
        with atomic_path(folder / "pytorch_lora_weights.safetensors") as tmp:
            tmp.unlink(missing_ok=True)
            pipeline_class.save_lora_weights(
                tmp.parent, unet_lora_layers=unet_state, text_encoder_lora_layers=te_state, weight_name=tmp.name,
                safe_serialization=True, unet_lora_adapter_metadata=self.unet.peft_config[ADAPTER].to_dict(),
                text_encoder_lora_adapter_metadata=(self.text_encoder.peft_config[ADAPTER].to_dict()
                                                    if te_state else None), **kwargs)
        return folder
