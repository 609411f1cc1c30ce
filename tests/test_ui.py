"""The real app, launched as users launch it: driven in headless Chromium and through gradio_client."""

from pathlib import Path

import pytest
from conftest import launch_app

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
A1111_TEXT = ("masterpiece, a castle on a hill\nNegative prompt: lowres, bad hands\n"
              "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 3344, Size: 512x768, "
              "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.6.0")


def _shared_files(home: Path) -> None:
    """A kohya LoRA and an embedding for demo-tiny, as users drop them into loras/ and embeddings/."""
    import torch
    from safetensors.torch import save_file

    (home / "loras").mkdir(parents=True)
    (home / "embeddings").mkdir(parents=True)
    layer = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    g = torch.Generator().manual_seed(0)
    save_file({f"{layer}.lora_down.weight": torch.randn(2, 32, generator=g),
               f"{layer}.lora_up.weight": torch.randn(32, 2, generator=g), f"{layer}.alpha": torch.tensor(2.0)},
              str(home / "loras" / "inkwash.safetensors"), metadata={"ss_network_dim": "2", "ss_network_alpha": "2"})
    save_file({"emb_params": torch.randn(1, 32, generator=g)}, str(home / "embeddings" / "glow.safetensors"))


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """`python app.py` on a free port with a throwaway home; yields (url, home)."""
    home = tmp_path_factory.mktemp("home")
    _shared_files(home)
    for url in launch_app(home, ROOT):
        yield url, home


@pytest.mark.browser
def test_browser_generate_shows_image(app, browser):
    url, home = app
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    # launched on demo-tiny (launch_app asks for it), the studio says plainly that its weights are random
    page.get_by_text("random weights").first.wait_for(timeout=60_000)
    # demo-tiny's native size (64) was put into the size sliders when it loaded
    page.locator("#prompt textarea").fill("a lighthouse at dusk")
    for slider in ("#width", "#height"):
        box = page.locator(f"{slider} input[type=number]")
        box.fill("64")
        box.press("Enter")
    # a LoRA card click appends its tag at the chosen weight
    page.get_by_text("LoRAs and embeddings").click()
    page.locator("#lora-cards .thumbnail-item").first.click()
    page.wait_for_function(
        "() => document.querySelector('#prompt textarea').value.endsWith('<lora:inkwash:1>')", timeout=30_000)
    page.locator("#generate-btn").click()
    image = page.locator("#gallery img").first
    image.wait_for(state="visible", timeout=120_000)
    page.get_by_text("Seed:").first.wait_for(timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "generate.png"), full_page=True)
    infotext = page.locator("#infotext textarea").input_value()

    # dropping an A1111 PNG fills in its parameters
    from PIL import Image

    from studio.generation.infotext import png_info

    a1111 = home / "from-a1111.png"
    Image.new("RGB", (64, 64), "white").save(a1111, pnginfo=png_info(A1111_TEXT))
    page.get_by_text("PNG info").click()
    page.locator("#png-info input[type=file]").set_input_files(str(a1111))
    page.wait_for_function(
        "() => document.querySelector('#prompt textarea').value.startsWith('masterpiece, a castle')",
        timeout=30_000)
    negative = page.locator("#negative-prompt textarea").input_value()
    seed = page.locator("#seed input").input_value()
    steps = page.locator("#steps input[type=number]").input_value()
    page.screenshot(path=str(ARTIFACTS / "png-info.png"), full_page=True)
    assert negative == "lowres, bad hands" and seed == "3344" and steps == "28"
    assert infotext.startswith("a lighthouse at dusk <lora:inkwash:1>")
    assert 'Lora hashes: "inkwash: ' in infotext
    assert "Size: 64x64" in infotext and "Model: demo-tiny" in infotext
    saved = list((home / "outputs").rglob("*.png"))
    assert len(saved) == 1


def test_api_generate_and_clear_errors(app):
    from gradio_client import Client

    url, home = app
    client = Client(url, verbose=False)
    args = dict(prompt="a red circle", negative="", sampler="Euler", schedule="Automatic", steps=3, cfg_scale=7,
                seed=42, width=64, height=64, batch_size=1, batch_count=1, clip_skip=1)
    gallery, seed_md, infotext = client.predict(*args.values(), api_name="/generate")
    assert len(gallery) == 1 and "Seed: 42" in infotext and "42" in seed_md
    bad = dict(args, width=500)
    with pytest.raises(Exception, match="width must be a multiple of 8, got 500"):
        client.predict(*bad.values(), api_name="/generate")
    # the slider's own range check answers first in the UI and the API
    with pytest.raises(Exception, match="steps must be between 1 and 150|less than minimum value 1"):
        client.predict(*dict(args, steps=0).values(), api_name="/generate")


def test_api_prompt_expansion_with_demo_tiny(app):
    from gradio_client import Client

    url, home = app
    client = Client(url, verbose=False)
    first = client.predict("a castle on a hill", "demo-tiny", 5, 2, api_name="/expand_prompt")
    again = client.predict("a castle on a hill", "demo-tiny", 5, 2, api_name="/expand_prompt")
    assert first == again  # seeded
    text = first["value"] if isinstance(first, dict) else first  # a Radio update comes back as a dict
    assert text.startswith("a castle on a hill") and len(text) > len("a castle on a hill")
    with pytest.raises(Exception, match="not found|not available offline"):
        client.predict("a castle", "/no/such/folder", 5, 1, api_name="/expand_prompt")
