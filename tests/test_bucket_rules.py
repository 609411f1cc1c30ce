"""kohya's bucket rules (issue 24 item 1): the bucket set from a min side, a max side and a step within the
training area, the no-upscale rule (each image in a bucket of its own size, never enlarged), the job's checks,
the command line, and a LoRA run on such buckets with kohya's metadata. Without them the buckets stay SDXL's."""

from __future__ import annotations

import pytest
from PIL import Image
from safetensors import safe_open
from test_train_lora import NAME, lora_job
from test_train_ti import home_cfg

from studio.train.data import (
    SDXL_BUCKETS,
    BucketRule,
    kohya_bucket_sizes,
    load_train_data,
    own_size_bucket,
)
from studio.train.job import TrainJob
from studio.train.loop import Trainer


@pytest.mark.parametrize("resolution,low,high,step", [(512, 256, 1024, 64), (1024, 256, 2048, 64), (768, 320, 960, 32)])
def test_kohya_buckets_are_the_tallest_sizes_within_the_area_for_every_width(resolution, low, high, step):
    sizes = kohya_bucket_sizes(resolution, low, high, step)
    area = resolution * resolution
    square = resolution // step * step
    assert (square, square) in sizes and sizes == sorted(set(sizes))
    assert {(h, w) for w, h in sizes} == set(sizes)  # both orientations
    for w, h in sizes:
        assert w % step == 0 and h % step == 0 and w * h <= area
        if (w, h) != (square, square):
            assert low <= min(w, h) and max(w, h) <= high
    for width in range(low, high + 1, step):  # every width on the step: its tallest height, if that is tall enough
        fits = [h for h in range(low, high + 1, step) if width * h <= area]
        if fits:
            assert (width, max(fits)) in sizes
        else:
            assert all(w != width for w, _ in sizes if (w, _) != (square, square))


def test_no_upscale_buckets_are_the_image_s_own_size_shrunk_to_the_area():
    assert own_size_bucket(300, 200, 512 * 512, 64) == (256, 192)  # small: its own size, cut to the step
    assert own_size_bucket(2000, 1000, 512 * 512, 64) == (704, 320)  # large: shrunk to the area first
    assert own_size_bucket(40, 30, 512 * 512, 64) == (64, 64)  # never below one step
    rule = BucketRule(no_upscale=True)
    assert rule.bucket_for(300, 200, 512) == (256, 192)
    assert BucketRule().sizes(1024) == list(SDXL_BUCKETS) and not BucketRule().kohya  # the default stays SDXL's
    assert BucketRule(step=64).kohya and BucketRule(step=64).sizes(512) == kohya_bucket_sizes(512, 256, 1024, 64)


def test_images_train_in_their_rule_s_buckets_and_are_never_enlarged(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    Image.new("RGB", (300, 200), (200, 30, 30)).save(folder / "small.png")
    Image.new("RGB", (2000, 1000), (30, 30, 200)).save(folder / "wide.png")
    data = load_train_data(folder, 512, buckets=True, rule=BucketRule(no_upscale=True))
    sizes = {item.name.split("/")[-1]: item.image.size for item in data.images}
    assert sizes == {"small.png": (256, 192), "wide.png": (704, 320)}
    small = next(i for i in data.images if i.name.endswith("small.png"))
    assert small.scaled_size[0] <= 200 and small.scaled_size[1] <= 300  # scaled down to cover, not up
    kohya = load_train_data(folder, 512, buckets=True, rule=BucketRule(64, 1024, 64))
    assert {item.image.size for item in kohya.images} <= set(kohya_bucket_sizes(512, 64, 1024, 64))
    # the wide image (2:1) in the set's nearest aspect: 704x320 (2.2:1; 640x384 is 1.67:1, 768x320 2.4:1)
    assert next(i for i in kohya.images if i.name.endswith("wide.png")).image.size == (704, 320)


@pytest.mark.parametrize("changes,message", [
    ({"bucket_min_side": 1024, "bucket_max_side": 512}, "min side .* must not be above the max side"),
    ({"bucket_step": 60}, "bucket step must be a multiple of 8"),
    ({"bucket_min_side": 64, "bucket_max_side": 128, "resolution": 512}, "far below the resolution"),
    ({"bucket_no_upscale": "yes"}, "bucket no upscale must be true or false"),
])
def test_job_refuses_bad_bucket_rules(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainJob(name="x", data="d", **changes).validate()


def test_a_lora_trains_on_kohya_buckets_and_records_them(tmp_path):
    cfg = home_cfg(tmp_path)
    for i, size in enumerate(((96, 48), (48, 96))):  # two images of other shapes beside the 64² ones
        Image.new("RGB", size, (20 + 100 * i, 40, 40)).save(cfg.datasets_dir / "stripes" / f"odd{i}.png")
    logged = []
    trainer = Trainer(cfg, on_event=lambda kind, info: logged.append(info["text"]) if kind == "log" else None)
    result = trainer.start(lora_job(max_steps=3, save_every=100, buckets=True, bucket_min_side=32,
                                    bucket_max_side=128, bucket_step=32))
    assert result.state == "finished", result.message
    log = "\n".join(logged)
    # kohya's set at 64 px, sides 32..128 on 32: 32x128, 32x96, 64x64, 96x32, 128x32; 2:1 and 1:2 go to 3:1, 1:3
    assert "aspect-ratio buckets: 32x96: 1, 64x64: 4, 96x32: 1" in log
    with safe_open(str(cfg.loras_dir / f"{NAME}.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert (meta["ss_enable_bucket"], meta["ss_min_bucket_reso"], meta["ss_max_bucket_reso"]) == ("True", "32", "128")
    assert meta["ss_bucket_no_upscale"] == "False"


def test_command_line_flags_fill_the_job():
    from studio.cli import build_parser
    from studio.cli.train import train_job_from_args

    job = train_job_from_args(build_parser().parse_args(
        ["train", "lora", "--data", "d", "--name", "n", "--buckets", "--bucket-min-side", "320", "--bucket-max-side",
         "1536", "--bucket-step", "32", "--bucket-no-upscale"]))
    job.validate()
    assert (job.bucket_min_side, job.bucket_max_side, job.bucket_step, job.bucket_no_upscale) == (320, 1536, 32, True)
