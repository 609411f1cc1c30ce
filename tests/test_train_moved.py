"""The end of a run says how far the result moved the model (issue 28 item 7: a LoRA that changed the image by
2/255 gave no hint why): the last preview against the step-0 one, with advice when it barely changed."""

from __future__ import annotations

import numpy as np
from PIL import Image
from test_train_lora import lora_job
from test_train_ti import home_cfg

from studio.train.loop import BARELY_MOVED, Trainer, moved_note, preview_change


def test_preview_change_is_the_mean_pixel_difference(tmp_path):
    a = np.full((8, 8, 3), 100, dtype=np.uint8)
    b = a.copy()
    b[:4] += 20  # half the pixels 20 levels brighter: 10 on average
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(b).save(tmp_path / "b.png")
    assert preview_change(tmp_path / "a.png", tmp_path / "b.png") == 10.0
    assert preview_change(tmp_path / "a.png", tmp_path / "missing.png") is None
    assert preview_change(tmp_path / "a.png", tmp_path / "a.png") is None  # a run of 0 steps: nothing to compare
    assert "barely" in moved_note(BARELY_MOVED / 2) and "more steps" in moved_note(0.5)
    assert "barely" not in moved_note(10.0) and "10.0/255" in moved_note(10.0)


def test_a_run_that_learned_nothing_says_so_at_the_end(tmp_path):
    result = Trainer(home_cfg(tmp_path)).start(lora_job(max_steps=2, save_every=100, preview_every=1,
                                                        learning_rate="1e-12"))
    assert result.state == "finished"
    assert "changed the preview by 0.0/255" in result.message and "train more steps" in result.message
    assert "train more steps" in (result.run_dir / "status.json").read_text(encoding="utf-8")
    quiet = Trainer(home_cfg(tmp_path / "b")).start(lora_job(max_steps=2, save_every=100, preview_every=0))
    assert quiet.message == f"finished 2 steps; saved {quiet.output.name}"  # no previews: nothing to compare
