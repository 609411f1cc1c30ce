"""The Dataset tab in the real app, in headless Chromium: import a folder, caption, edit, score, save."""

import json
from pathlib import Path

import pytest
from dataset_files import photo, tree_digest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
EDITED = "a hand-written caption, sks style"


@pytest.fixture(scope="module")
def app(shared_app):
    """`python app.py` on a free port with a throwaway home (conftest's shared_app, which the storyboard, survey and
    train tab modules use too; this module's dataset is 'my-style'); (url, home)."""
    return shared_app


def pick(page, elem_id: str, value: str) -> None:
    """Type a value into a dropdown that accepts custom values."""
    box = page.locator(f"#{elem_id} input")
    box.fill(value)
    box.press("Enter")


@pytest.mark.browser
def test_browser_dataset_import_caption_edit_save(app, tmp_path, browser):
    url, home = app
    source = tmp_path / "my art"
    source.mkdir()
    for i in range(3):
        photo(i, 96, 80).save(source / f"piece{i}.png")
    (source / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    before = tree_digest(source)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.get_by_role("tab", name="Dataset").click()
    # 1. import a folder typed as a path, at demo size
    page.locator("#ds-source textarea").fill(str(source))
    page.locator("#ds-size input").fill("64")
    page.locator("#ds-min-side input").fill("32")
    page.locator("#ds-import-btn").click()
    page.wait_for_function("() => document.querySelector('#ds-summary').innerText.includes('kept of 4')",
                           timeout=60_000)
    summary = page.locator("#ds-summary").inner_text()
    problems = page.locator("#ds-problems").inner_text()
    crops = page.locator("#ds-crops img").count()
    # 2. caption with the tiny built-in BLIP
    pick(page, "ds-captioner", "demo-tiny")
    page.locator("#ds-caption-btn").click()
    cell = page.locator("#ds-captions [data-testid=cell-1-3]")
    page.wait_for_function(
        "() => { const c = document.querySelector('#ds-captions [data-testid=cell-1-3]');"
        " return c && c.innerText.trim().length > 0 }", timeout=120_000)
    auto_caption = cell.inner_text().strip()
    edited_file = page.locator("#ds-captions [data-testid=cell-1-1]").inner_text().strip()
    # 3. edit one caption in the grid
    cell.dblclick()
    editor = page.locator("#ds-captions textarea, #ds-captions input[type=text]").first
    editor.fill(EDITED)
    editor.press("Enter")
    page.wait_for_function(
        "() => document.querySelector('#ds-captions [data-testid=cell-1-3]')"
        f".innerText.includes({EDITED!r})", timeout=10_000)
    # ... and leave the third image out by hand
    left_out = page.locator("#ds-captions [data-testid=cell-2-1]").inner_text().strip()
    page.locator("#ds-captions [data-testid=cell-2-2] input[type=checkbox]").click()
    # 4. CLIP scores with the tiny CLIP; threshold -1 keeps every pair of this random model
    page.get_by_text("Caption check: drop pairs whose caption does not match the image").click()
    pick(page, "ds-clip-model", "demo-tiny")
    page.locator("#ds-threshold input").fill("-1")
    page.locator("#ds-score-btn").click()
    page.wait_for_function(
        """() => { const c = document.querySelector('#ds-scores [data-testid="cell-2-1"]');
                   return c && c.innerText.trim().length > 0 }""", timeout=120_000)
    scores = [float(page.locator(f"#ds-scores [data-testid=cell-{r}-1]").inner_text()) for r in range(3)]
    # 5. save under a name
    page.locator("#ds-name textarea, #ds-name input").first.fill("my-style")
    page.locator("#ds-save-btn").click()
    page.wait_for_function(
        "() => document.querySelector('#ds-saved').innerText.includes('with captions')", timeout=60_000)
    saved_text = page.locator("#ds-saved").inner_text()
    page.screenshot(path=str(ARTIFACTS / "dataset.png"), full_page=True)

    assert "3 kept of 4" in summary and "broken.jpg" in problems and "not a readable image" in problems
    assert crops == 3 and auto_caption and auto_caption != EDITED
    assert scores == sorted(scores)
    out = home / "datasets" / "my-style"
    assert "datasets/my-style" in saved_text and str(home) not in saved_text  # no absolute paths in the browser
    assert (out / f"{edited_file}.txt").read_text() == EDITED
    manifest = json.loads((out / "dataset.json").read_text())
    assert len(manifest["images"]) == 2
    assert {Path(e["source"]).name for e in manifest["skipped"]} == {"broken.jpg"}
    removed = [(e["file"], e["reason"]) for e in manifest["removed"]]
    assert removed == [(f"{left_out}.png", "left out by hand")]
    assert not (out / f"{left_out}.png").exists() and "Saved 2 image(s)" in saved_text
    entry = next(e for e in manifest["images"] if e["file"] == f"{edited_file}.png")
    assert entry["caption"] == EDITED and entry["caption_source"] == "edited"
    assert entry["clip_score"] is not None
    others = [e for e in manifest["images"] if e is not entry]
    for e in others:
        assert e["caption_source"] == "demo-tiny"
        assert (out / e["file"]).with_suffix(".txt").read_text() == e["caption"]
    assert tree_digest(source) == before


def test_tab_views_and_choices_round_trip(tmp_path):
    """What the tab shows (duplicate pairs side by side, the caption grid) and how edits come back."""
    from studio.dataset import curate as ds
    from studio.ui import dataset_tab as tab

    folder = tmp_path / "in"
    folder.mkdir()
    photo(0).save(folder / "a.png")
    (folder / "b.png").write_bytes((folder / "a.png").read_bytes())
    photo(1).save(folder / "c.png")
    curation = ds.import_images(ds.CurateJob(inputs=[folder], size=64, min_side=32))
    # one exact pair, shown as A then B (a two-column gallery puts them side by side)
    assert [label for _, label in tab.dup_items(curation)] == ["1A in/a.png ✓", "1B in/b.png"]
    rows = tab.dup_rows(curation)
    assert rows == [[1, "in/a.png", "in/b.png", "exact", 1.0, "a"]]
    assert [r[1:3] for r in tab.grid_rows(curation)] == [["a", True], ["c", True], ["b", False]]
    assert tab.grid_rows(curation)[0][0].startswith("![a](data:image/jpeg;base64,")
    rows[0][5] = "B"  # the user keeps the other one
    tab._apply_dup_rows(curation, rows)
    assert [it.name for it in curation.kept()] == ["b", "c"]
    grid = tab.grid_rows(curation)
    assert [r[1] for r in grid] == ["b", "c", "a"] and grid[2][5] == "exact duplicate of in/b.png"
    grid[1][3] = "  a red   barn "
    grid[0][2] = False  # left out by hand ...
    tab._apply_grid(curation, grid)
    assert curation.items[2].caption == "a red barn" and curation.items[2].caption_source == "edited"
    assert [it.name for it in curation.kept()] == ["c"] and curation.items[1].removed == "left out by hand"
    grid[0][2] = True  # ... and taken back
    tab._apply_grid(curation, grid)
    assert "2** kept of 3" in tab.summary_text(curation)
    assert tab.problem_rows(curation) == [["in/a.png", "removed", "exact duplicate of in/b.png"]]
    curation.items[1].clip_score, curation.items[2].clip_score = 0.3, 0.1
    assert tab.score_rows(curation, 0.2) == [["c", 0.1, "a red barn", "yes"], ["b", 0.3, "", ""]]
    import gradio as gr

    rows[0][5] = "neither"
    with pytest.raises(gr.Error, match="keep must be a, b or both"):
        tab._apply_dup_rows(curation, rows)


def test_size_defaults_follow_the_loaded_model(tmp_path):
    """Issue 28: with micro (64 px) the defaults 512 / 256 skipped every picture; they follow the model now, at
    start-up and after a model is loaded from the menu."""
    from studio.config import StudioConfig
    from studio.ui import build_ui
    from studio.ui.dataset_tab import size_defaults
    from studio.ui.state import AppState

    state = AppState.create(StudioConfig().with_home(tmp_path / "home"))
    assert size_defaults(state) == (512, 256)  # nothing loaded yet
    state.manager.load("demo-tiny")
    native = state.manager.current.native_size
    assert size_defaults(state) == (native, native // 2)
    demo = build_ui(state)
    boxes = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None) in ("ds-size", "ds-min-side")}
    assert (boxes["ds-size"].value, boxes["ds-min-side"].value) == (native, native // 2)
    load = next(fn for fn in demo.fns.values() if fn.api_name == "load_model")
    outputs = dict(zip((getattr(b, "elem_id", None) for b in load.outputs), load.fn("demo-tiny-xl"), strict=True))
    xl = state.manager.current.native_size
    assert (outputs["ds-size"], outputs["ds-min-side"]) == (xl, xl // 2)  # the load sets them too
