"""A1111 sampler names and schedule types, mapped onto diffusers schedulers.

Seeds do not reproduce A1111's images bit for bit: the solvers are diffusers', not k-diffusion's.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)

AUTOMATIC = "Automatic"
SCHEDULE_TYPES: list[str] = [AUTOMATIC, "Uniform", "Karras", "Exponential", "Beta", "SGM Uniform"]

# What each schedule type sets. Every entry sets all three sigma flags and the spacing, so a flag left
# on in the model's scheduler config (some ship use_karras_sigmas=True) cannot leak into another choice.
# The sigma schedules use "linspace" spacing so they span the model's full sigma range, as k-diffusion's do.
_SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
_SCHEDULE_KWARGS: dict[str, dict[str, Any]] = {
    "Uniform": {"timestep_spacing": "linspace"},
    "Karras": {"timestep_spacing": "linspace", "use_karras_sigmas": True},
    "Exponential": {"timestep_spacing": "linspace", "use_exponential_sigmas": True},
    "Beta": {"timestep_spacing": "linspace", "use_beta_sigmas": True},
    "SGM Uniform": {"timestep_spacing": "trailing"},
}

# The keys of a model's scheduler config that describe the model (its noise schedule and what the UNet
# predicts). Solver settings of the model's own scheduler (algorithm_type, solver_type, sigma flags, ...)
# are left behind so that they cannot change the sampler the user picked.
MODEL_CONFIG_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "steps_offset",
    "set_alpha_to_one",
    "rescale_betas_zero_snr",
    "timestep_spacing",
)

_ALL_SIGMA = (AUTOMATIC, "Uniform", "Karras", "Exponential", "Beta", "SGM Uniform")
_SPACING_ONLY = (AUTOMATIC, "Uniform", "SGM Uniform")


@dataclass(frozen=True)
class SamplerSpec:
    """One A1111 sampler: the diffusers class and settings that play its part.

    `schedules` lists the schedule types the class really accepts. "Automatic" resolves to
    `default_schedule`, the sampler's own default as in A1111 1.9+ (Karras for DPM++ 2M, DPM++ SDE,
    DPM2 and DPM2 a; Exponential for DPM++ 2M SDE; Uniform, the model's own timesteps, for the rest).
    DDIM's default stays "Automatic": the spacing of the model's scheduler config (or diffusers'
    "leading"), which with steps_offset=1 is A1111's DDIM discretization.
    `seed_kwarg` names the constructor argument that seeds the sampler's own noise, if it has one.
    """

    name: str
    scheduler_cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    schedules: tuple[str, ...] = _ALL_SIGMA
    default_schedule: str = "Uniform"
    seed_kwarg: str | None = None


def _spec(*args: Any, **kwargs: Any) -> tuple[str, SamplerSpec]:
    spec = SamplerSpec(*args, **kwargs)
    return spec.name, spec


SAMPLERS: dict[str, SamplerSpec] = dict(
    [
        _spec(
            "DPM++ 2M",
            DPMSolverMultistepScheduler,
            {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint"},
            default_schedule="Karras",
        ),
        # DPMSolverSDEScheduler is k-diffusion's dpmpp_sde (Brownian-tree noise, needs torchsde);
        # DPMSolverSinglestepScheduler would be a deterministic solver, not this one.
        _spec(
            "DPM++ SDE", DPMSolverSDEScheduler, {}, default_schedule="Karras", seed_kwarg="noise_sampler_seed"
        ),
        _spec(
            "DPM++ 2M SDE",
            DPMSolverMultistepScheduler,
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "midpoint"},
            default_schedule="Exponential",
        ),
        # EulerAncestralDiscreteScheduler has no sigma-schedule flags, only timestep spacing
        _spec("Euler a", EulerAncestralDiscreteScheduler, {}, schedules=_SPACING_ONLY),
        _spec("Euler", EulerDiscreteScheduler, {}),
        _spec("LMS", LMSDiscreteScheduler, {}),
        _spec("Heun", HeunDiscreteScheduler, {}),
        _spec("DPM2", KDPM2DiscreteScheduler, {}, default_schedule="Karras"),
        _spec("DPM2 a", KDPM2AncestralDiscreteScheduler, {}, default_schedule="Karras"),
        # clip_sample: DDIM's default clips x0 to [-1, 1], right for pixels but wrong for SD latents
        _spec(
            "DDIM", DDIMScheduler, {"clip_sample": False}, schedules=_SPACING_ONLY, default_schedule=AUTOMATIC
        ),
        _spec("UniPC", UniPCMultistepScheduler, {}),
    ]
)

_BY_LOWER = {name.lower(): name for name in SAMPLERS}


def _close(value: str, choices: list[str]) -> list[str]:
    lowered = {c.lower(): c for c in choices}
    return [lowered[m] for m in difflib.get_close_matches(value.lower(), list(lowered), n=3, cutoff=0.5)]


def _unknown_sampler(name: str) -> ValueError:
    msg = f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}"
    close = _close(name, list(SAMPLERS))
    if close:
        msg += f"; did you mean {' or '.join(repr(c) for c in close)}?"
    return ValueError(msg)


def canonical_sampler(name: str) -> str | None:
    """The known sampler spelled as `name` (any case, surrounding blanks ignored), else None."""
    return _BY_LOWER.get(" ".join(name.split()).lower())


def sampler_and_schedule(sampler: str, schedule: str | None) -> tuple[str, str]:
    """(sampler, schedule) as a user gave them: with no schedule, an older A1111 name ("DPM++ 2M Karras") carries
    it (split_legacy_name); with one, both are taken as given."""
    return split_legacy_name(sampler) if schedule is None else (sampler, schedule)


def split_legacy_name(name: str) -> tuple[str, str]:
    """Split an A1111 sampler name that may carry its schedule: "DPM++ 2M Karras" -> ("DPM++ 2M", "Karras").

    A plain sampler name gives (name, "Automatic"). Unknown names raise ValueError.
    """
    exact = canonical_sampler(name)
    if exact:
        return exact, AUTOMATIC
    words = " ".join(name.split())
    # longest label first so "SGM Uniform" is not read as "Uniform"
    for label in sorted(SCHEDULE_TYPES[1:], key=len, reverse=True):
        if words.lower().endswith(" " + label.lower()):
            base = canonical_sampler(words[: -len(label) - 1])
            if base:
                return base, label
    raise _unknown_sampler(name)


def check(sampler: str, schedule: str) -> None:
    """Raise ValueError, naming the bad value and the choices, unless the pair can be built."""
    spec = SAMPLERS.get(sampler)
    if spec is None:
        raise _unknown_sampler(sampler)
    if schedule not in spec.schedules:
        if schedule in SCHEDULE_TYPES:
            raise ValueError(
                f"{sampler} does not support schedule type {schedule!r}; it supports: {', '.join(spec.schedules)}"
            )
        msg = f"unknown schedule type {schedule!r}; {sampler} supports: {', '.join(spec.schedules)}"
        close = _close(schedule, list(spec.schedules))
        if close:
            msg += f"; did you mean {' or '.join(repr(c) for c in close)}?"
        raise ValueError(msg)


def resolve_schedule(sampler: str, schedule: str) -> str:
    """The schedule type actually used: "Automatic" becomes the sampler's default."""
    check(sampler, schedule)
    return SAMPLERS[sampler].default_schedule if schedule == AUTOMATIC else schedule


def scheduler_kwargs(sampler: str, schedule: str) -> dict[str, Any]:
    """The constructor arguments that `make_scheduler` passes on top of the model's config."""
    resolved = resolve_schedule(sampler, schedule)
    spec = SAMPLERS[sampler]
    kwargs = dict(spec.kwargs)
    if resolved != AUTOMATIC:
        if "use_karras_sigmas" in _init_params(spec.scheduler_cls):
            kwargs.update(dict.fromkeys(_SIGMA_FLAGS, False))
        kwargs.update(_SCHEDULE_KWARGS[resolved])
    return kwargs


def _init_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.__init__).parameters)


def make_scheduler(sampler: str, schedule: str, base_config: Mapping[str, Any], seed: int | None = None):
    """A fresh diffusers scheduler for (sampler, schedule) on the model whose scheduler config is `base_config`.

    Only the model-describing keys of `base_config` (MODEL_CONFIG_KEYS) are kept. `seed` seeds the
    sampler's own noise where it has one (DPM++ SDE); the others draw noise from the pipeline's generator.
    """
    spec = SAMPLERS.get(sampler)
    if spec is None:
        raise _unknown_sampler(sampler)
    kwargs = scheduler_kwargs(sampler, schedule)
    if spec.seed_kwarg and seed is not None:
        kwargs[spec.seed_kwarg] = int(seed)
    accepted = _init_params(spec.scheduler_cls)
    # a silently dropped argument would silently change the schedule; fail loudly instead
    unexpected = sorted(k for k in kwargs if k not in accepted)
    if unexpected:
        raise ValueError(f"{spec.scheduler_cls.__name__} does not accept {', '.join(unexpected)}")
    config = {k: v for k, v in dict(base_config).items() if k in MODEL_CONFIG_KEYS and k in accepted}
    return spec.scheduler_cls.from_config(config, **kwargs)


def infotext_names(sampler: str, schedule: str) -> dict[str, str]:
    """The infotext labels for a run; like A1111, "Automatic" is written as the schedule it resolved to."""
    return {"Sampler": sampler, "Schedule type": resolve_schedule(sampler, schedule)}
