"""Extra networks panel of the Generate tab: cards for every LoRA and embedding, click to insert the tag."""

from __future__ import annotations

import hashlib

import gradio as gr
from PIL import Image, ImageDraw

from studio.files.networks import NetworkLibrary, embedding_card, lora_card, preview_image, save_preview
from studio.generation.generate import latest_output, text_widths
from studio.generation.prompt_syntax import format_lora_tag
from studio.ui.state import AppState

TILE = 160
MAX_PREVIEW_PIXELS = 64_000_000  # a card picture larger than this is not decoded (decompression bombs)


def placeholder_tile(name: str) -> Image.Image:
    """A coloured tile with the name's initials for files without a preview image."""
    digest = hashlib.sha256(name.encode()).digest()
    colour = tuple(60 + b % 140 for b in digest[:3])
    tile = Image.new("RGB", (TILE, TILE), colour)
    draw = ImageDraw.Draw(tile)
    initials = "".join(part[0] for part in name.replace("-", " ").replace("_", " ").split()[:2]).upper() or "?"
    draw.text((TILE // 2, TILE // 2), initials, fill=(255, 255, 255), anchor="mm", font_size=56)
    return tile


def card_picture(path, name: str) -> Image.Image:
    """The card's picture as a small image: its preview file (header checked before decoding), else a tile."""
    if path is not None:
        try:
            with Image.open(path) as im:
                if im.width * im.height <= MAX_PREVIEW_PIXELS:
                    im.thumbnail((TILE * 2, TILE * 2))
                    return im.convert("RGB")
        except Exception:  # a damaged preview only costs its picture
            pass
    return placeholder_tile(name)


def _cards(library: NetworkLibrary, widths: tuple[int, ...] | None, family: str | None = None):
    """(lora gallery items, lora rows, embedding items, embedding rows, markdown of skipped files). With the loaded
    model's text `widths` and `family`, files made for other model families are listed as skipped, with theirs."""
    loras, embs = library.loras(family), library.embeddings(widths)
    lora_items, lora_rows = [], []
    for name, lora in sorted(loras.found.items()):
        card = lora_card(lora)
        preview = preview_image(lora.path)
        caption = f"{name} · {card['for']}"
        lora_items.append((card_picture(preview, name), caption))
        lora_rows.append({**card, "path": str(lora.path)})
    emb_items, emb_rows = [], []
    for name, emb in sorted(embs.found.items()):
        card = embedding_card(emb)
        preview = preview_image(emb.path)
        emb_items.append((card_picture(preview, name), f"{name} · {card['vectors']} vec · {card['for']}"))
        emb_rows.append({**card, "path": str(emb.path)})
    skipped = [f"- `loras/{rel}`: {why}" for rel, why in sorted(loras.skipped.items())]
    skipped += [f"- `embeddings/{rel}`: {why}" for rel, why in sorted(embs.skipped.items())]
    note = ("**Skipped or refused:**\n" + "\n".join(skipped)) if skipped else ""
    return lora_items, lora_rows, emb_items, emb_rows, note


def _card_markdown(card: dict) -> str:
    return "\n".join(f"- **{k}**: {v}" for k, v in card.items() if k != "path")


def insert_tag(prompt: str, tag: str, activation: str = "") -> str:
    """Append `tag` (and the card's activation text, as A1111's card click does) with one separating space."""
    prompt = prompt or ""
    for piece in (tag, activation.strip()):
        if piece and piece not in prompt:
            prompt = f"{prompt.rstrip()} {piece}".strip() if prompt.strip() else piece
    return prompt


def lora_insertion(card: dict, weight: float) -> tuple[str, str]:
    """(tag, activation text) for a LoRA card: A1111 uses the card's preferred weight when it has one."""
    return format_lora_tag(card["name"], float(card.get("preferred weight") or weight)), card.get("activation text", "")


def use_last_image(card: dict | None, outputs_dir) -> str:
    """Make the last generated image the selected card's picture (`name.preview.png`); returns a message."""
    if not card:
        raise ValueError("click a card first, then use the last image as its picture")
    latest = latest_output(outputs_dir)
    if latest is None:
        raise ValueError("no generated image yet: generate one first")
    with Image.open(latest) as im:
        written = save_preview(card["path"], im)
    return f"{written.name} is now the picture of {card['name']}"


def build(state: AppState, prompt: gr.Textbox):
    """The accordion; returns its refresh function so other events (model load) can refresh it."""
    with gr.Accordion("LoRAs and embeddings", open=False, elem_id="extra-networks"):
        with gr.Row():
            refresh = gr.Button("↻ Refresh", scale=0, min_width=100, elem_id="networks-refresh")
            weight = gr.Slider(-2, 2, value=1.0, step=0.05, label="Weight for inserted LoRA tags")
        with gr.Tabs():
            with gr.Tab("LoRA"):
                lora_gallery = gr.Gallery(label="LoRAs (click to insert)", columns=5, height=220,
                                          allow_preview=False, fit_columns=False, object_fit="contain", buttons=[],
                                          elem_id="lora-cards")
            with gr.Tab("Embeddings"):
                emb_gallery = gr.Gallery(label="Embeddings (click to insert)", columns=5, height=220,
                                         allow_preview=False, fit_columns=False, object_fit="contain", buttons=[],
                                         elem_id="embedding-cards")
        details = gr.Markdown(elem_id="network-details")
        use_last = gr.Button("Use the last generated image as this card's picture", size="sm",
                             elem_id="networks-use-last")
        skipped = gr.Markdown(elem_id="networks-skipped")
        lora_rows = gr.State([])
        emb_rows = gr.State([])
        selected = gr.State(None)

    def do_refresh():
        current = state.manager.current
        widths, family = (text_widths(current), current.family) if current else (None, None)
        lora_items, lrows, emb_items, erows, note = _cards(state.generator.networks, widths, family)
        empty = (f"No LoRAs or embeddings yet. Put `.safetensors` files in `{state.cfg.loras_dir}` and "
                 f"`{state.cfg.embeddings_dir}` (a `name.preview.png` beside a file becomes its card picture).")
        return lora_items, lrows, emb_items, erows, note or ("" if lrows or erows else empty)

    outputs = [lora_gallery, lora_rows, emb_gallery, emb_rows, skipped]
    refresh.click(do_refresh, None, outputs, api_visibility="private")

    def pick_lora(rows, text, w, evt: gr.SelectData):
        card = rows[evt.index]
        return insert_tag(text, *lora_insertion(card, w)), _card_markdown(card), card

    def pick_embedding(rows, text, evt: gr.SelectData):
        card = rows[evt.index]
        return insert_tag(text, card["name"], card.get("activation text", "")), _card_markdown(card), card

    def do_use_last(card):
        try:
            gr.Info(use_last_image(card, state.cfg.outputs_dir))
        except ValueError as e:
            raise gr.Error(str(e)) from None
        return do_refresh()

    lora_gallery.select(pick_lora, [lora_rows, prompt, weight], [prompt, details, selected], api_visibility="private")
    emb_gallery.select(pick_embedding, [emb_rows, prompt], [prompt, details, selected], api_visibility="private")
    use_last.click(do_use_last, selected, outputs, api_visibility="private")
    return do_refresh, outputs
