"""A1111 sampler/schedule names build the right diffusers schedulers on SD 1.5's config."""

from __future__ import annotations

import pytest
import torch
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

from studio.generation.samplers import (
    SAMPLERS,
    SCHEDULE_TYPES,
    check,
    infotext_names,
    make_scheduler,
    resolve_schedule,
    split_legacy_name,
)

SD15_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}

EXPECTED_CLASS = {
    "DPM++ 2M": DPMSolverMultistepScheduler,
    "DPM++ SDE": DPMSolverSDEScheduler,
    "DPM++ 2M SDE": DPMSolverMultistepScheduler,
    "Euler a": EulerAncestralDiscreteScheduler,
    "Euler": EulerDiscreteScheduler,
    "LMS": LMSDiscreteScheduler,
    "Heun": HeunDiscreteScheduler,
    "DPM2": KDPM2DiscreteScheduler,
    "DPM2 a": KDPM2AncestralDiscreteScheduler,
    "DDIM": DDIMScheduler,
    "UniPC": UniPCMultistepScheduler,
}

# (flag set, timestep_spacing) each concrete schedule type must produce
EXPECTED_SCHEDULE = {
    "Uniform": (None, "linspace"),
    "Karras": ("use_karras_sigmas", "linspace"),
    "Exponential": ("use_exponential_sigmas", "linspace"),
    "Beta": ("use_beta_sigmas", "linspace"),
    "SGM Uniform": (None, "trailing"),
}
SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")

PAIRS = [(name, schedule) for name, spec in SAMPLERS.items() for schedule in spec.schedules]


def test_names_in_a1111_order():
    assert list(SAMPLERS) == list(EXPECTED_CLASS)
    assert SCHEDULE_TYPES == ["Automatic", "Uniform", "Karras", "Exponential", "Beta", "SGM Uniform"]
    for spec in SAMPLERS.values():
        assert spec.schedules[0] == "Automatic"
        assert set(spec.schedules) <= set(SCHEDULE_TYPES)
        assert spec.default_schedule in spec.schedules


@pytest.mark.parametrize(("sampler", "schedule"), PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_every_pair_builds(sampler, schedule):
    scheduler = make_scheduler(sampler, schedule, SD15_CONFIG, seed=0)
    assert type(scheduler) is EXPECTED_CLASS[sampler]
    config = scheduler.config
    # the model's noise schedule survives the change of class
    assert (config.beta_start, config.beta_end, config.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert config.num_train_timesteps == 1000
    assert config.prediction_type == "epsilon"

    resolved = resolve_schedule(sampler, schedule)
    if resolved == "Automatic":
        assert sampler == "DDIM"
        assert config.timestep_spacing == "leading"  # diffusers' DDIM default; with steps_offset=1, A1111's
    else:
        flag, spacing = EXPECTED_SCHEDULE[resolved]
        assert config.timestep_spacing == spacing
        for name in SIGMA_FLAGS:
            if name in config:
                assert config[name] is (name == flag), name
            else:
                assert flag is None

    scheduler.set_timesteps(10)
    assert len(scheduler.timesteps) >= 10


@pytest.mark.parametrize(
    ("sampler", "options"),
    [
        ("DPM++ 2M", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        ("DPM++ 2M SDE", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
        ("DDIM", {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}),
    ],
)
def test_sampler_options(sampler, options):
    config = make_scheduler(sampler, "Automatic", SD15_CONFIG).config
    assert {k: config[k] for k in options} == options


@pytest.mark.parametrize(
    ("sampler", "default"),
    [
        ("DPM++ 2M", "Karras"),
        ("DPM++ SDE", "Karras"),
        ("DPM++ 2M SDE", "Exponential"),
        ("Euler a", "Uniform"),
        ("Euler", "Uniform"),
        ("DPM2", "Karras"),
        ("DPM2 a", "Karras"),
        ("DDIM", "Automatic"),
        ("UniPC", "Uniform"),
    ],
)
def test_automatic_is_the_samplers_default(sampler, default):
    assert resolve_schedule(sampler, "Automatic") == default
    assert infotext_names(sampler, "Automatic") == {"Sampler": sampler, "Schedule type": default}
    auto = make_scheduler(sampler, "Automatic", SD15_CONFIG)
    auto.set_timesteps(10)
    if default != "Automatic":
        explicit = make_scheduler(sampler, default, SD15_CONFIG)
        explicit.set_timesteps(10)
        assert torch.equal(auto.timesteps, explicit.timesteps)


def test_infotext_names_keeps_explicit_schedule():
    assert infotext_names("Euler", "Karras") == {"Sampler": "Euler", "Schedule type": "Karras"}


def test_v_prediction_is_kept():
    for sampler in SAMPLERS:
        config = make_scheduler(
            sampler, "Automatic", {**SD15_CONFIG, "prediction_type": "v_prediction"}
        ).config
        assert config.prediction_type == "v_prediction", sampler


def test_solver_settings_of_the_models_scheduler_do_not_leak():
    # a model shipped with a DPM++ 2M SDE Karras scheduler; the user asks for plain DPM++ 2M Uniform
    base = {
        **SD15_CONFIG,
        "_class_name": "DPMSolverMultistepScheduler",
        "algorithm_type": "sde-dpmsolver++",
        "solver_type": "heun",
        "use_karras_sigmas": True,
        "timestep_spacing": "trailing",
    }
    config = make_scheduler("DPM++ 2M", "Uniform", base).config
    assert config.algorithm_type == "dpmsolver++"
    assert config.solver_type == "midpoint"
    assert config.use_karras_sigmas is False
    assert config.timestep_spacing == "linspace"
    # the model's own spacing is what "Automatic" means for DDIM
    assert make_scheduler("DDIM", "Automatic", base).config.timestep_spacing == "trailing"


def test_karras_changes_sigmas_of_dpmpp_2m():
    uniform = make_scheduler("DPM++ 2M", "Uniform", SD15_CONFIG)
    karras = make_scheduler("DPM++ 2M", "Karras", SD15_CONFIG)
    uniform.set_timesteps(10)
    karras.set_timesteps(10)
    assert uniform.sigmas.shape == karras.sigmas.shape
    assert not torch.allclose(uniform.sigmas, karras.sigmas)
    # same end points, Karras spends more steps at low noise
    assert torch.isclose(uniform.sigmas[0], karras.sigmas[0])
    assert karras.sigmas[5] < uniform.sigmas[5]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("DPM++ 2M Karras", ("DPM++ 2M", "Karras")),
        ("DPM++ 2M", ("DPM++ 2M", "Automatic")),
        ("Euler a", ("Euler a", "Automatic")),
        ("Euler", ("Euler", "Automatic")),
        ("DPM++ SDE Karras", ("DPM++ SDE", "Karras")),
        ("DPM++ 2M SDE Karras", ("DPM++ 2M SDE", "Karras")),
        ("DPM++ 2M SDE Exponential", ("DPM++ 2M SDE", "Exponential")),
        ("LMS Karras", ("LMS", "Karras")),
        ("DPM2 Karras", ("DPM2", "Karras")),
        ("DPM2 a Karras", ("DPM2 a", "Karras")),
        ("Euler SGM Uniform", ("Euler", "SGM Uniform")),
        ("dpm++ 2m  karras", ("DPM++ 2M", "Karras")),
        ("UniPC", ("UniPC", "Automatic")),
    ],
)
def test_split_legacy_name(name, expected):
    assert split_legacy_name(name) == expected


def test_split_unknown_name_lists_choices_and_close_matches():
    with pytest.raises(ValueError) as err:
        split_legacy_name("DPM++ 2N Karras")
    msg = str(err.value)
    assert "'DPM++ 2N Karras'" in msg and "Euler a" in msg and "did you mean" in msg and "DPM++ 2M" in msg


def test_unknown_sampler_error():
    with pytest.raises(
        ValueError, match=r"unknown sampler 'Eulr'; choose one of DPM\+\+ 2M, .*did you mean 'Euler'"
    ):
        check("Eulr", "Automatic")
    with pytest.raises(ValueError, match="unknown sampler 'Foo'"):
        make_scheduler("Foo", "Automatic", SD15_CONFIG)


def test_unsupported_schedule_error():
    with pytest.raises(
        ValueError,
        match="DDIM does not support schedule type 'Karras'; it supports: Automatic, Uniform, SGM Uniform",
    ):
        check("DDIM", "Karras")
    with pytest.raises(ValueError, match="Euler a does not support schedule type 'Exponential'"):
        make_scheduler("Euler a", "Exponential", SD15_CONFIG)
    with pytest.raises(ValueError, match="unknown schedule type 'karas'.*did you mean 'Karras'"):
        check("Euler", "karas")


def _run_steps(scheduler, n=3):
    scheduler.set_timesteps(8)
    sample = torch.linspace(-1, 1, 2 * 4 * 4 * 4).reshape(2, 4, 4, 4) * scheduler.init_noise_sigma
    model_output = torch.full_like(sample, 0.1)
    outputs = []
    for t in scheduler.timesteps[:n]:
        sample = scheduler.step(model_output, t, sample).prev_sample
        outputs.append(sample.clone())
    return outputs


def test_dpmpp_sde_is_reproducible_with_a_seed():
    first = _run_steps(make_scheduler("DPM++ SDE", "Karras", SD15_CONFIG, seed=1234))
    second = _run_steps(make_scheduler("DPM++ SDE", "Karras", SD15_CONFIG, seed=1234))
    other = _run_steps(make_scheduler("DPM++ SDE", "Karras", SD15_CONFIG, seed=4321))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    # the noise really comes from the seed (the first step is deterministic, the second adds noise)
    assert not torch.equal(first[-1], other[-1])


def test_a_scheduler_is_reusable_across_runs():
    scheduler = make_scheduler("DPM++ SDE", "Automatic", SD15_CONFIG, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(_run_steps(scheduler), _run_steps(scheduler), strict=True))
