"""Masked training (issue 24 item 5): a NAME.mask.png beside an image, or its alpha channel, weights the loss; the
loss ignores what the mask leaves out (its gradient there is zero), masks are cropped and mirrored with their
images, white masks train exactly as no masks, and the LoRA's metadata records it as kohya does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from test_train_lora import NAME, lora_job
from test_train_ti import home_cfg

from studio.train.data import load_train_data
from studio.train.loop import Trainer
from studio.train.masks import latent_mask, loss_weights, weighted_losses


def half_mask(size: tuple[int, int], left: bool = True) -> Image.Image:
    """White over the left (or right) half."""
    a = np.zeros((size[1], size[0]), dtype=np.uint8)
    if left:
        a[:, : size[0] // 2] = 255
    else:
        a[:, size[0] // 2 :] = 255
    return Image.fromarray(a, "L")


def test_the_loss_ignores_what_the_mask_leaves_out():
    pred = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randn(2, 4, 8, 8)
    masks = torch.stack([latent_mask(half_mask((64, 64)), (8, 8))] * 2)
    weighted_losses(pred, target, loss_weights(masks, 0.0)).sum().backward()
    assert torch.count_nonzero(pred.grad[..., 4:]) == 0  # the right half: no gradient at all
    assert torch.count_nonzero(pred.grad[..., :4]) == pred.grad[..., :4].numel()
    left_only = pred.grad.clone()
    pred.grad = None
    weighted_losses(pred, target, loss_weights(masks, 0.1)).sum().backward()
    assert torch.allclose(pred.grad[..., 4:], 0.1 * 2 * (pred - target)[..., 4:].detach() / pred[0].numel())
    assert torch.equal(pred.grad[..., :4], left_only[..., :4])
    # no weights, or weights of 1 everywhere: the plain mean squared error, bit for bit
    plain = torch.nn.functional.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    assert torch.equal(weighted_losses(pred, target, None), plain)
    assert torch.equal(weighted_losses(pred, target, torch.ones(2, 1, 8, 8)), plain)


def test_latent_masks_are_area_averaged_and_mirror_with_their_image():
    mask = half_mask((64, 32))
    small = latent_mask(mask, (4, 8))
    assert small.shape == (1, 4, 8) and torch.equal(small[0, :, :4], torch.ones(4, 4))
    assert torch.equal(small[0, :, 4:], torch.zeros(4, 4))
    assert torch.equal(latent_mask(mask, (4, 8), flipped=True), small.flip(-1))
    assert torch.equal(latent_mask(None, (4, 8)), torch.ones(1, 4, 8))


def test_masks_are_paired_with_their_images_cropped_like_them_or_read_from_alpha(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    wide = Image.new("RGB", (128, 64), (200, 30, 30))
    wide.save(folder / "wide.png")
    mask = Image.new("L", (128, 64), 0)
    mask.paste(255, (32, 0, 64, 64))  # a white band over the left half of the centre square
    mask.save(folder / "wide.mask.png")
    clear = Image.new("RGBA", (64, 64), (20, 20, 200, 255))
    clear.putalpha(half_mask((64, 64), left=False))
    clear.save(folder / "clear.png")
    Image.new("RGB", (64, 64), (10, 200, 10)).save(folder / "plain.png")
    Image.new("RGB", (64, 64), (90, 90, 90)).save(folder / "onetrainer.png")
    half_mask((64, 64)).save(folder / "onetrainer-masklabel.png")  # OneTrainer's mask name
    Image.new("L", (32, 16), 255).save(folder / "plain-small.mask.png")  # no image of that name: ignored
    data = load_train_data(folder, 32)
    by_name = {item.name.split("/")[-1]: item for item in data.images}
    assert sorted(by_name) == ["clear.png", "onetrainer.png", "plain.png", "wide.png"]  # masks are not images
    assert np.array_equal(np.asarray(by_name["onetrainer.png"].mask) > 127, np.asarray(half_mask((32, 32))) > 127)
    assert by_name["plain.png"].mask is None
    assert by_name["wide.png"].mask.size == (32, 32)  # centre-cropped and scaled as the image was
    assert np.array_equal(np.asarray(by_name["wide.png"].mask) > 127, np.asarray(half_mask((32, 32))) > 127)
    assert np.array_equal(np.asarray(by_name["clear.png"].mask) > 127,
                          np.asarray(half_mask((32, 32), left=False)) > 127)
    opaque = Image.new("RGBA", (64, 64), (1, 2, 3, 255))
    opaque.save(folder / "plain.png")  # fully opaque alpha masks nothing
    assert {i.name.split("/")[-1]: i for i in load_train_data(folder, 32).images}["plain.png"].mask is None
    (folder / "wide.mask.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="mask .*wide.mask.png of .*wide.png"):
        load_train_data(folder, 32)


def _masked_home(tmp_path, name: str, white: bool):
    cfg = home_cfg(tmp_path, name)
    for image in sorted((cfg.datasets_dir / "stripes").glob("img*.png")):
        mask = Image.new("L", (64, 64), 255) if white else half_mask((64, 64))
        mask.save(image.with_name(image.stem + ".mask.png"))
    return cfg


def test_white_masks_train_as_no_masks_and_half_masks_change_the_loss(tmp_path):
    settings = dict(max_steps=2, save_every=100, flip_p=0.5)
    plain = Trainer(home_cfg(tmp_path, "plain")).start(lora_job(**settings))
    white = Trainer(_masked_home(tmp_path, "white", True)).start(lora_job(masked_loss=True, **settings))
    assert white.state == "finished", white.message
    assert white.losses == plain.losses  # weights of 1: the same loss, bit for bit
    cfg = _masked_home(tmp_path, "half", False)
    trainer = Trainer(cfg)
    half = trainer.start(lora_job(masked_loss=True, unmasked_weight=0.25, **settings))
    assert half.state == "finished", half.message
    assert half.losses != plain.losses
    masks = trainer.latent_masks[0]  # image 0's latent masks, as cached: the half, and its mirror
    assert torch.equal(masks[1], masks[0].flip(-1)) and masks[0][0, 0, 0] == 1 and masks[0][0, 0, -1] == 0
    with safe_open(str(cfg.loras_dir / f"{NAME}.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert (meta["ss_masked_loss"], meta["ss_unmasked_weight"]) == ("True", "0.25")
    assert "masked_loss: true" in (half.run_dir / "config.yaml").read_text(encoding="utf-8")


def test_masked_training_without_any_mask_is_refused_before_the_model_loads(tmp_path):
    with pytest.raises(ValueError, match="no image has a mask: put NAME.mask.png beside NAME.png"):
        Trainer(home_cfg(tmp_path)).start(lora_job(masked_loss=True, max_steps=1))
    with pytest.raises(ValueError, match="unmasked weight"):
        lora_job(masked_loss=True, unmasked_weight=1.5).validate()


def test_command_line_flags_fill_the_job():
    from studio.cli import build_parser
    from studio.cli.train import train_job_from_args

    args = build_parser().parse_args(["train", "lora", "--data", "stripes", "--name", "x-y", "--masked-loss",
                                      "--unmasked-weight", "0.1"])
    job = train_job_from_args(args)
    assert (job.masked_loss, job.unmasked_weight) == (True, 0.1)
