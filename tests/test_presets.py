"""Presets fill a job's settings; shipped presets are valid; users can save their own."""

import pytest

from studio.generation.job import GenerateJob
from studio.generation.presets import apply_preset, list_presets, load_preset, save_preset


def test_shipped_presets_are_valid(studio_cfg):
    presets = list_presets(studio_cfg.presets_dir)
    assert {"A1111 defaults", "DreamShot table 5.2"} <= set(presets)
    for preset in presets.values():
        apply_preset(GenerateJob(prompt="x"), preset).validate()


def test_dreamshot_preset_matches_table_5_2(studio_cfg):
    job = apply_preset(GenerateJob(prompt="a high-quality close up picture of a man"),
                       list_presets(studio_cfg.presets_dir)["DreamShot table 5.2"])
    assert (job.sampler, job.schedule, job.steps, job.cfg_scale, job.width, job.height) == \
        ("DPM++ SDE", "Karras", 16, 6.0, 512, 512)
    assert job.prompt == "a high-quality close up picture of a man"  # presets never touch the prompt


def test_save_and_reload_user_preset(studio_cfg):
    job = GenerateJob(prompt="secret prompt", sampler="Euler a", schedule="Automatic", steps=33, cfg_scale=4.5,
                      width=768, height=512)
    path = save_preset(studio_cfg.presets_dir, "My look v2", job)
    assert path == studio_cfg.presets_dir / "generation" / "My look v2.json"
    preset = list_presets(studio_cfg.presets_dir)["My look v2"]
    assert "prompt" not in preset.settings
    restored = apply_preset(GenerateJob(prompt="other"), preset)
    assert (restored.sampler, restored.steps, restored.cfg_scale, restored.width) == ("Euler a", 33, 4.5, 768)


def test_bad_presets_are_refused(studio_cfg, tmp_path):
    with pytest.raises(ValueError, match="preset name '../..' cannot be used"):
        save_preset(studio_cfg.presets_dir, "../..", GenerateJob(prompt="x"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "bad", "settings": {"sampler_name": "Euler"}}')
    with pytest.raises(ValueError, match="sampler_name"):
        load_preset(bad)
    broken = studio_cfg.presets_dir / "generation"
    broken.mkdir(parents=True, exist_ok=True)
    (broken / "broken.json").write_text("{not json")
    assert "A1111 defaults" in list_presets(studio_cfg.presets_dir)  # one broken file hides nothing
