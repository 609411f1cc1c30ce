"""The experiment runner on demo-tiny: two synthetic styles (stripes, dots) and two methods (prompt engineering,
Textual Inversion) give both tables and the plot; a second run skips every finished cell; bad files fail up front
naming the bad value."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from studio.config import StudioConfig
from studio.evaluate.experiment import Experiment, ExperimentChangedError, ExperimentRunner, load_experiment
from studio.evaluate.report import table1, table2

ROOT = Path(__file__).resolve().parent.parent


def style_images(folder: Path, kind: str, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = np.full((64, 64, 3), 235, np.uint8)
        if kind == "stripes":
            a[:, (i % 4)::8] = [200, 30, 30]
        else:
            yy, xx = np.mgrid[:64, :64]
            a[((yy + i) % 12 < 4) & ((xx + 2 * i) % 12 < 4)] = [30, 30, 200]
        Image.fromarray(a).save(folder / f"{kind}{i}.png")
    return folder


SPEC = {
    "name": "tiny",
    "model": "demo-tiny",
    "styles": [{"name": "Stripes", "references": "stripes"}, {"name": "Dots", "references": "dots"}],
    "methods": ["pe", "ti"],
    "prompts": ["a house", "a tree"],
    "images_per_prompt": 2,
    "seed": 5,
    "generation": {"steps": 2, "width": 64, "height": 64, "batch_size": 2},
    "training": {"presets": {"ti": ""},
                 "settings": {"max_steps": 2, "batch_size": 1, "resolution": 64, "save_every": 100,
                              "init_word": "painting"}},
    "metrics": ["clip-i", "clip-t"],
    "clip_model": "demo-tiny",
}


@pytest.fixture
def setup(tmp_path):
    cfg = StudioConfig().with_home(tmp_path / "home")
    cfg.ensure_dirs()
    style_images(tmp_path / "stripes", "stripes")
    style_images(tmp_path / "dots", "dots")
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    return cfg, path


def test_runner_writes_both_tables_and_the_plot_and_skips_finished_cells(setup, monkeypatch):
    from studio.train.loop import Trainer

    cfg, path = setup
    started = []
    real_start = Trainer.start

    def counting_start(self, job):
        started.append(job.name)
        return real_start(self, job)

    monkeypatch.setattr(Trainer, "start", counting_start)
    exp = load_experiment(path, cfg)
    result = ExperimentRunner(cfg).run(exp)
    out = cfg.outputs_dir / "experiments" / "tiny"
    assert result.out_dir == out and not result.stopped
    assert sorted(started) == ["dots-ti", "stripes-ti"]  # one training per trained cell
    assert [(c.style, c.method, c.status) for c in result.cells] == [
        ("Stripes", "pe", "done"), ("Stripes", "ti", "done"), ("Dots", "pe", "done"), ("Dots", "ti", "done")]
    # the embeddings are used in the prompts by name, with the same seeds in every cell
    cell = json.loads((out / "cells" / "stripes" / "ti" / "result.json").read_text())
    assert [r["prompt"] for r in cell["per_prompt"]] == ["a house in the style of stripes-ti",
                                                         "a tree in the style of stripes-ti"]
    assert [r["text"] for r in cell["per_prompt"]] == ["a house", "a tree"]
    assert (out / "embeddings" / "stripes-ti.safetensors").is_file()
    names = sorted(p.name for p in (out / "cells" / "dots" / "pe" / "images").glob("*.png"))
    assert names == ["p000-000-5.png", "p000-001-6.png", "p001-000-7.png", "p001-001-8.png"]
    assert names == sorted(p.name for p in (out / "cells" / "dots" / "ti" / "images").glob("*.png"))
    # table 1: one row per method, the mean over the styles of each style's mean over prompts
    rows = list(csv.DictReader((out / "table1.csv").open()))
    assert [r["method"] for r in rows] == ["PE", "TI"]
    cells = json.loads((out / "results.json").read_text())["cells"]
    ti = [c for c in cells if c["method"] == "ti"]
    assert float(rows[1]["accuracy"]) == pytest.approx(sum(c["accuracy"] for c in ti) / 2, abs=1e-4)
    for c in ti:
        assert c["accuracy"] == pytest.approx(sum(r["accuracy"] for r in c["per_prompt"]) / 2)
    # table 2: per style x method
    rows2 = list(csv.DictReader((out / "table2.csv").open()))
    assert [r["style"] for r in rows2] == ["Stripes", "Dots"]
    assert list(rows2[0]) == ["style", "accuracy_pe", "accuracy_ti", "editability_pe", "editability_ti"]
    assert "| Method | Accuracy | Editability |" in (out / "table1.md").read_text()
    header = "| Style | Accuracy PE | Accuracy TI | Editability PE | Editability TI |"
    assert header in (out / "table2.md").read_text()
    plot = Image.open(out / "plot.png")
    assert plot.size == (900, 640) and len(set(plot.convert("RGB").getdata())) > 10

    # 2. a second run redoes nothing: no training, the same numbers
    before = (out / "table2.csv").read_text()
    started.clear()
    again = ExperimentRunner(cfg).run(load_experiment(path, cfg))
    assert started == [] and again.skipped == 4
    assert (out / "table2.csv").read_text() == before

    # 3. a changed prompt list would replace the finished cells: refused unless asked, then every cell is redone
    # (the old numbers are not these settings' numbers)
    spec = {**SPEC, "prompts": ["a house"], "methods": ["pe"]}
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ExperimentChangedError, match=r"tiny/ holds results of this experiment with other settings"):
        ExperimentRunner(cfg).run(load_experiment(path, cfg))
    assert (out / "table2.csv").read_text() == before
    third = ExperimentRunner(cfg).run(load_experiment(path, cfg), replace=True)
    assert [c.status for c in third.cells] == ["done", "done"] and started == []
    assert len(list((out / "cells" / "dots" / "pe" / "images").glob("*.png"))) == 2


def test_tables_from_fixed_cells():
    cells = [{"style": "A", "method": "pe", "accuracy": 0.6, "editability": 0.3},
             {"style": "B", "method": "pe", "accuracy": 0.8, "editability": 0.1},
             {"style": "A", "method": "ti", "accuracy": 0.9, "editability": 0.2}]
    t1 = table1(cells, ["pe", "ti"])
    assert t1[0] == {"method": "PE", "styles": 2, "accuracy": pytest.approx(0.7), "editability": pytest.approx(0.2)}
    assert t1[1]["accuracy"] == 0.9 and t1[1]["styles"] == 1
    t2 = table2(cells, ["A", "B"], ["pe", "ti"])
    assert t2[1] == {"style": "B", "accuracy_pe": 0.8, "accuracy_ti": None, "editability_pe": 0.1,
                     "editability_ti": None}


@pytest.mark.parametrize("change,message", [
    ({"methods": ["pe", "dreambooth"]}, "unknown method.*dreambooth"),
    ({"images_per_prompt": 0}, "images_per_prompt must be a whole number from 1 to 1000, got 0"),
    ({"styles": [{"name": "X", "references": "missing-folder"}]},
     "references folder .*missing-folder does not exist"),
    ({"training": {"settings": {"max_stepz": 3}}}, "unknown training setting.*max_stepz"),
    ({"training": {"settings": {"learning_rate": "fast"}}}, "fast"),
    ({"generation": {"width": 500}}, "width must be a multiple of 8, got 500"),
    ({"prompt_template": "{prompt} by someone"}, "prompt_template must contain"),
    ({"colour": "red"}, r"unknown key\(s\) \['colour'\]"),
    ({"metrics": ["fid"]}, "metrics must be some of clip-i, clip-t, dino"),
    ({"styles": [{"name": "Dots", "references": "dots"}, {"name": "dots", "references": "stripes"}]},
     "two styles have the same name"),
])
def test_bad_experiment_files_fail_up_front_naming_the_value(setup, change, message):
    cfg, path = setup
    path.write_text(yaml.safe_dump({**SPEC, **change}))
    with pytest.raises(ValueError, match=message):
        load_experiment(path, cfg)


def test_references_may_name_a_dataset(setup):
    cfg, path = setup
    style_images(cfg.datasets_dir / "seed000-dots", "dots")
    path.write_text(yaml.safe_dump({**SPEC, "styles": [{"name": "Dots", "references": "seed000-dots"}]}))
    exp = load_experiment(path, cfg)
    assert exp.path("seed000-dots") == (cfg.datasets_dir / "seed000-dots").resolve()


def test_seed000_experiment_ships_with_its_ten_artists():
    data = yaml.safe_load((ROOT / "presets" / "experiments" / "seed000.yaml").read_text())
    exp = Experiment.from_dict(data, ROOT / "presets" / "experiments")
    assert [s.name for s in exp.styles] == ["Claude Monet", "Edvard Munch", "Erte", "Eyvind Earle", "Gustav Klimt",
                                            "Ilya Mashkov", "Luca Giordano", "Mabuse", "Patrick Pietropoli",
                                            "Paul Cezanne"]
    assert exp.methods == ["pe", "ti", "ti-att", "ti-moe"] and exp.images_per_prompt == 8
    assert exp.prompt("a city", exp.styles[0], "pe") == "a city in the style of Claude Monet"
    assert exp.prompt("a city", exp.styles[0], "ti-moe") == "a city in the style of claude-monet-ti-moe"
    job = exp.train_job(exp.styles[0], "ti-moe", StudioConfig(), Path("/tmp/x"))
    assert (job.learning_rate, job.max_steps, job.batch_size, job.experts, job.top_k) == ("0.001", 1000, 4, 4, 2)
    with pytest.raises(ValueError, match="seed000-claude-monet does not exist"):
        exp.validate()  # the images are the user's to supply
