"""A validation split (issue 24 item 6): held-out images never reach a training batch; their loss, at fixed noise
and timesteps, is logged every N steps (loss.csv, the live view, the plot's third series); it does not move when
nothing is learned (lr 1e-12) and moves when the LoRA learns; a split that leaves nothing to train on is refused."""

from __future__ import annotations

import dataclasses

import pytest
from test_train_lora import lora_job
from test_train_ti import home_cfg

from studio.train.data import load_train_data, split_validation
from studio.train.loop import Trainer
from studio.train.run_folder import RunFolder
from studio.train.worker import view_from_folder
from studio.ui.train_tab import loss_frame


def test_the_split_is_seeded_and_keeps_images_to_train_on(tmp_path):
    cfg = home_cfg(tmp_path)
    data = load_train_data(cfg.datasets_dir / "stripes", 64)
    kept, held = split_validation(data, 0.25, seed=3)
    assert len(held) == 1 and len(kept.images) == 3
    assert {i.name for i in held} | {i.name for i in kept.images} == {i.name for i in data.images}
    assert [i.name for i in split_validation(data, 0.25, seed=3)[1]] == [i.name for i in held]  # from the seed
    assert {split_validation(data, 0.25, seed=s)[1][0].name for s in range(20)} != {held[0].name}  # seeds differ
    assert split_validation(data, 0.0, seed=3) == (data, [])
    with pytest.raises(ValueError, match="leaves none to train on"):
        split_validation(dataclasses.replace(data, images=data.images[:1]), 0.5, seed=3)


def test_held_out_images_are_validated_and_never_trained_on(tmp_path):
    cfg = home_cfg(tmp_path)
    seen = []
    trainer = Trainer(cfg)
    original = trainer._micro_step

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append([trainer_data_names[i] for i in trainer.last_batch["indices"]])
        return out

    trainer._micro_step = recording
    data = load_train_data(cfg.datasets_dir / "stripes", 64)
    held_name = split_validation(data, 0.25, seed=0)[1][0].name
    kept = split_validation(data, 0.25, seed=0)[0]
    trainer_data_names = [i.name for i in kept.images]
    result = trainer.start(lora_job(max_steps=6, save_every=100, validation_split=0.25, validate_every=2, seed=0,
                                    learning_rate="3e-2"))
    assert result.state == "finished", result.message
    assert seen and all(held_name not in names for names in seen)
    rows = RunFolder.open(result.run_dir).losses()
    validated = [(r["step"], r["val_loss"]) for r in rows if r["val_loss"] is not None]
    assert [s for s, _ in validated] == [2, 4, 6]
    assert len({v for _, v in validated}) == 3  # the LoRA learned: the held-out loss moved
    view = view_from_folder(RunFolder.open(result.run_dir))
    assert view.val_losses == validated
    frame = loss_frame(view.losses, val_losses=view.val_losses)
    assert sorted(frame[frame.series == "validation"].step) == [2, 4, 6]


def test_validation_loss_does_not_move_when_nothing_is_learned(tmp_path):
    result = Trainer(home_cfg(tmp_path)).start(lora_job(max_steps=4, save_every=100, validation_split=0.25,
                                                        validate_every=1, learning_rate="1e-12"))
    values = [r["val_loss"] for r in RunFolder.open(result.run_dir).losses()]
    assert len(values) == 4 and max(values) - min(values) < 1e-6 * values[0], values  # fixed noise and timesteps


def test_bad_splits_are_refused():
    with pytest.raises(ValueError, match="validation split"):
        lora_job(validation_split=0.9).validate()
    with pytest.raises(ValueError, match="TI-Att and TI-MoE"):
        lora_job(method="ti-att", validation_split=0.2).validate()
