"""Training's pure parts: learning-rate schedules, prompt templates, job checks, presets, the inversion modules."""

import math
import random

import pytest
import torch

from studio.config import StudioConfig
from studio.train.inversion_modules import AttentionInversion, MoEInversion, importance_loss, load_loss
from studio.train.job import TrainJob, find_train_preset, job_from_yaml, job_to_yaml, list_train_presets
from studio.train.schedule import LR_SCHEDULERS, lr_factor, parse_schedule
from studio.train.templates import fill_template, list_templates, load_templates

CFG = StudioConfig()

# --- learning-rate schedules (A1111 syntax) ---


@pytest.mark.parametrize("text, expected", [
    ("0.005", {1: 0.005, 10_000: 0.005}),
    ("0.005:100, 1e-3:1000, 1e-5", {1: 0.005, 100: 0.005, 101: 1e-3, 1000: 1e-3, 1001: 1e-5, 50_000: 1e-5}),
    ("0.01:10,0.001:20", {10: 0.01, 11: 0.001, 20: 0.001, 21: 0.001}),
    (" 5e-3 : 2 , 1e-4 ", {2: 5e-3, 3: 1e-4}),
    (0.002, {1: 0.002}),
])
def test_schedule_rates(text, expected):
    schedule = parse_schedule(text)
    for step, rate in expected.items():
        assert schedule.rate_at(step) == pytest.approx(rate), step


@pytest.mark.parametrize("text, quoted", [
    ("", "empty"),
    ("abc", "'abc'"),
    ("0.005:x", "'x'"),
    ("0.005:100, 0.001:50", "'0.001:50'"),
    ("0.005, 0.001:100", "'0.005'"),
    ("-1", "'-1'"),
    ("0.005:0", "at least 1"),
    ("0.005:100,,1e-3", "empty piece"),
])
def test_schedule_errors_quote_the_bad_piece(text, quoted):
    with pytest.raises(ValueError) as e:
        parse_schedule(text)
    assert quoted in str(e.value)


def test_schedule_round_trips_as_text():
    assert str(parse_schedule("0.005:100, 1e-3:1000, 1e-5")) == "0.005:100, 0.001:1000, 1e-05"


@pytest.mark.parametrize("kind", LR_SCHEDULERS)
def test_every_scheduler_factor_equals_diffusers_get_scheduler(kind):
    """Optimizer step n (1-based) gets the factor diffusers' LambdaLR gives its 0-based index n - 1."""
    from diffusers.optimization import get_scheduler

    max_steps, warmup, cycles = 50, 7, 3
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    kwargs = {"num_cycles": cycles} if kind == "cosine_with_restarts" else {}
    scheduler = get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=max_steps, **kwargs)
    for step in range(1, max_steps + 1):
        assert lr_factor(kind, step, max_steps, warmup, cycles) == pytest.approx(optimizer.param_groups[0]["lr"],
                                                                                 abs=1e-12), step
        optimizer.step()
        scheduler.step()


# --- templates ---


def test_fill_template_replaces_name_and_filewords():
    assert fill_template("a painting of [filewords], art by [name]", "mj-style", "a red barn") == \
        "a painting of a red barn, art by mj-style"
    # the token is taken out of the caption, as A1111 does, and no double spaces are left
    assert fill_template("[name], [filewords]", "sks", "sks dog on a sofa") == "sks, dog on a sofa"
    assert fill_template("a painting in the style of [name]", "x-tok", "") == "a painting in the style of x-tok"


def test_shipped_templates_load_and_use_the_name():
    names = list_templates(CFG.assets_dir)
    for expected in ("style", "style_filewords", "subject", "subject_filewords", "painting_style_seed000",
                     "style_seed002", "object_seed002"):
        assert expected in names
    seed000 = load_templates("painting_style_seed000", CFG.assets_dir)
    assert len(seed000.lines) == 19 and len(set(seed000.lines)) == 19  # seed 000 §7: 19 phrases
    assert all("in the style of [name]" in line for line in seed000.lines)
    assert load_templates("style_filewords", CFG.assets_dir).uses_filewords
    rng = random.Random(0)
    prompt = seed000.fill(rng, "monet-tok", "ignored caption")
    assert "monet-tok" in prompt and "[name]" not in prompt


def test_user_templates_override_and_bad_ones_are_refused(tmp_path):
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "mine.txt").write_text("an ink drawing by [name]\n\n", encoding="utf-8")
    (tmp_path / "templates" / "empty.txt").write_text("\n", encoding="utf-8")
    (tmp_path / "templates" / "noname.txt").write_text("a photo\n", encoding="utf-8")
    assert load_templates("mine", CFG.assets_dir, tmp_path).lines == ("an ink drawing by [name]",)
    with pytest.raises(ValueError, match="no lines"):
        load_templates("empty", CFG.assets_dir, tmp_path)
    with pytest.raises(ValueError, match="never uses"):
        load_templates("noname", CFG.assets_dir, tmp_path)
    with pytest.raises(ValueError, match="unknown prompt template 'nope'"):
        load_templates("nope", CFG.assets_dir, tmp_path)
    with pytest.raises(ValueError):
        load_templates("../../etc/passwd", CFG.assets_dir, tmp_path)


# --- the job ---


def good_job(**changes) -> TrainJob:
    return TrainJob(**{"name": "my-style", "data": "ds", **changes})


@pytest.mark.parametrize("changes, message", [
    ({"method": "dreambooth"}, "method must be one of"),
    ({"name": ""}, "name must be"),
    ({"name": "../evil"}, "name must be"),
    ({"name": "a/b"}, "name must be"),
    ({"vectors": 0}, "vectors must be between 1 and 75, got 0"),
    ({"vectors": 76}, "between 1 and 75"),
    ({"resolution": 500}, "multiple of 8"),
    ({"batch_size": 0}, "batch size"),
    ({"learning_rate": "0.005:10, bad"}, "'bad'"),
    ({"mixed_precision": "fp8"}, "mixed precision"),
    ({"method": "ti-moe", "experts": 2, "top_k": 3}, "top-k"),
    ({"flip_p": 1.5}, "flip probability"),
    ({"embedding_format": "ckpt"}, "embedding format"),
    ({"init_word": " "}, "initializer word"),
    ({"data": ""}, "dataset"),
    ({"caption_dropout": 2}, "caption dropout must be between 0 and 1"),
    ({"tag_dropout": -1}, "tag dropout must be between 0 and 1"),
    ({"keep_tokens": -2}, "keep tokens"),
    ({"lr_cycles": 0}, "lr cycles"),
])
def test_job_validation_names_the_problem(changes, message):
    with pytest.raises(ValueError, match=message):
        good_job(**changes).validate()


def test_job_from_dict_refuses_unknown_keys_and_yaml_round_trips():
    with pytest.raises(ValueError, match="unknown training setting"):
        TrainJob.from_dict({"name": "x", "lerning_rate": 1})
    job = good_job(method="ti-moe", learning_rate="0.001:10, 1e-4", experts=6)
    again = job_from_yaml(job_to_yaml(job))
    assert again == job
    with pytest.raises(ValueError, match="not a studio training config"):
        job_from_yaml("just: text")


def test_presets_fill_valid_jobs_with_seed_recipes(tmp_path):
    presets = list_train_presets(tmp_path)
    by_stem = {p.path.stem: p for p in presets.values()}
    assert {"seed000-ti", "seed000-ti-att", "seed000-ti-moe", "seed002-ti", "a1111-defaults"} <= set(by_stem)
    moe = by_stem["seed000-ti-moe"].settings
    assert (moe["experts"], moe["top_k"], moe["aux_weight"], moe["learning_rate"]) == (4, 2, 0.01, "0.001")
    assert by_stem["seed000-ti"].settings["learning_rate"] == "0.005"
    assert by_stem["seed002-ti"].settings["max_steps"] == 2000
    for preset in presets.values():
        good_job().replace(**preset.settings).validate()
    # a user's preset in presets/training/ is found by name or stem; a broken one does not hide the others
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "mine.yaml").write_text("name: Mine\nsettings: {max_steps: 7}\n", encoding="utf-8")
    (tmp_path / "training" / "broken.yaml").write_text("settings: [", encoding="utf-8")
    assert find_train_preset("Mine", tmp_path).settings == {"max_steps": 7}
    assert find_train_preset("mine", tmp_path).settings == {"max_steps": 7}
    with pytest.raises(ValueError, match="unknown training preset"):
        find_train_preset("broken", tmp_path)


# --- inversion modules (seed 000 §6.2, §6.3) ---


def test_attention_module_uses_only_the_cls_position():
    torch.manual_seed(0)
    module = AttentionInversion(image_dim=16, text_dim=8, vectors=2, heads=4)
    images = torch.randn(4, 16)
    states = module.attend(images)
    assert states.shape == (1, 5, 16)  # CLS + 4 images
    expected = module.out(torch.nn.functional.gelu(states[0, 0])).view(2, 8)
    assert torch.allclose(module(images), expected)
    # the other positions differ from the CLS one, so picking position 0 is a real choice
    for i in range(1, 5):
        other = module.out(torch.nn.functional.gelu(states[0, i])).view(2, 8)
        assert not torch.allclose(other, expected, atol=1e-4)
    # the input sequence really starts with the learnable CLS vector
    assert torch.equal(module.sequence(images)[0, 0], module.cls.detach())
    with pytest.raises(ValueError, match="heads"):
        AttentionInversion(image_dim=10, text_dim=8, heads=4)


def test_moe_routing_keeps_exactly_k_experts_per_image():
    torch.manual_seed(0)
    module = MoEInversion(image_dim=12, text_dim=8, num_images=5, experts=4, top_k=2)
    images = torch.randn(5, 12)
    route = module.route(images, torch.Generator().manual_seed(3))
    weights, gates = route["weights"], route["gates"]
    assert ((weights > 0).sum(dim=-1) == 2).all()
    # the kept weights are the two largest softmax gates of each row, unchanged; the others are 0
    top2 = gates.topk(2, dim=-1)
    assert torch.allclose(weights.gather(-1, top2.indices), top2.values)
    assert torch.allclose(gates.sum(-1), torch.ones(5))
    out = module(images, torch.Generator().manual_seed(3))
    assert out.shape == (1, 8)


def test_moe_router_noise_has_variance_one_over_e_squared():
    module = MoEInversion(image_dim=4, text_dim=4, num_images=4096, experts=4, top_k=2)
    route = module.route(torch.randn(4096, 4), torch.Generator().manual_seed(0))
    noise = route["noisy"] - route["clean"]
    assert noise.std().item() == pytest.approx(1 / 4, rel=0.05)
    assert torch.equal(module.route(torch.ones(2, 4))["noisy"], module.route(torch.ones(2, 4))["clean"])


def phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_importance_loss_by_hand():
    gates = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    # importance per expert: 1.1 and 0.9; mean 1.0; population variance 0.01 -> CV^2 = 0.01
    assert importance_loss(gates).item() == pytest.approx(0.01)
    assert importance_loss(torch.tensor([[0.5, 0.5], [0.5, 0.5]])).item() == pytest.approx(0.0)


def test_load_loss_by_hand():
    clean = torch.tensor([[1.0, 0.0], [0.0, 0.5]])
    noisy = torch.tensor([[1.2, -0.1], [0.1, 0.4]])
    std = 0.5
    # k = 1: the threshold is each row's largest noisy logit (1.2 and 0.4)
    p = [[1 - phi((1.2 - 1.0) / std), 1 - phi((1.2 - 0.0) / std)],
         [1 - phi((0.4 - 0.0) / std), 1 - phi((0.4 - 0.5) / std)]]
    load = [p[0][0] + p[1][0], p[0][1] + p[1][1]]  # 0.556433, 0.587457
    mean = sum(load) / 2
    cv2 = (((load[0] - mean) ** 2 + (load[1] - mean) ** 2) / 2) / mean**2
    assert load_loss(clean, noisy, k=1, noise_std=std).item() == pytest.approx(cv2, rel=1e-5)
    assert cv2 == pytest.approx(0.000736, rel=1e-2)


def test_moe_aux_loss_is_half_importance_plus_half_load():
    torch.manual_seed(0)
    module = MoEInversion(image_dim=6, text_dim=4, num_images=3, experts=3, top_k=2)
    images = torch.randn(3, 6)
    module(images, torch.Generator().manual_seed(7))
    route = module.route(images, torch.Generator().manual_seed(7))  # the same draw again
    expected = 0.5 * importance_loss(route["gates"]) + 0.5 * load_loss(route["clean"], route["noisy"], 2, 1 / 3)
    assert module.aux_loss().item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="built for 3 images"):
        module(torch.randn(4, 6))
