"""LyCORIS networks (LoCon with Tucker convs, LoHa, LoKr, full/diff, DoRA) on demo-tiny and demo-tiny-xl: files written
here from the published formulas with random factors, merged by LoraSlot into exactly W + s·ΔW (ΔW computed here
independently: explicit matrix products, torch.kron, the convolutions themselves), bit-exact without them, the
algorithms the studio does not merge refused by name, and the family told from LyCORIS shapes."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_sdxl_networks import sgm_path

from studio.files import adapters
from studio.files.adapters import ActiveLora, LoraSlot
from studio.files.networks import LoraFile, NetworkFileError, NetworkLibrary, lora_card, lora_family
from studio.models.tiny import build_tiny_pipeline, build_tiny_xl_pipeline

ATTN = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"  # Linear 32 -> 64, no bias
ATTN_SQ = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # Linear 32 -> 32
CONV = "down_blocks.1.resnets.0.conv1"  # Conv2d 32 -> 64, 3x3, bias
CONV_SQ = "down_blocks.0.resnets.0.conv1"  # Conv2d 32 -> 32, 3x3
TE = "encoder.layers.0.mlp.fc1"  # CLIP Linear 32 -> 37, bias
OFT_MESSAGE = "is an OFT network; the studio loads LoRA, LoCon, LoHa, LoKr, DoRA and full (diff) networks"


def unet_key(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def te_key(path: str, prefix: str = "lora_te_") -> str:
    full = path if path.startswith("text_model.") else "text_model." + path
    return prefix + full.replace(".", "_")


class Rand:
    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, *shape, scale: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g) * scale


@pytest.fixture(scope="module")
def sd1():
    return build_tiny_pipeline("sd1")  # its own copy: the slot wraps and merges into it


@pytest.fixture(scope="module")
def xl():
    return build_tiny_xl_pipeline()


def module(pipe, component: str, path: str):
    m = dict(getattr(pipe, component).named_modules())[path]
    return m.get_base_layer() if hasattr(m, "get_base_layer") else m


def weight(pipe, component: str, path: str) -> torch.Tensor:
    return module(pipe, component, path).weight.detach().clone()


def snapshot(pipe) -> dict:
    return {(c, k): v.detach().clone() for c in ("unet", "text_encoder", "text_encoder_2")
            if getattr(pipe, c, None) is not None for k, v in getattr(pipe, c).state_dict().items()}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


def write(tmp_path, name: str, tensors: dict, dtype=torch.float32):
    """The file in tmp_path/loras/, found by the library's scan as a prompt would find it."""
    folder = tmp_path / "loras"
    folder.mkdir(exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(folder / f"{name}.safetensors"))
    return NetworkLibrary(folder, tmp_path / "embeddings").find_lora(name)


def stored(lora, key: str) -> torch.Tensor:
    """A tensor as the file holds it (e.g. rounded to float16), in float32: what the reference must start from."""
    from safetensors.torch import load_file

    return load_file(str(lora.path))[key].float()


# --- the formulas, written out independently of studio.files.lycoris ---

def ref_updown(up: torch.Tensor, down: torch.Tensor, shape) -> torch.Tensor:
    """up·down for any kernel: the k×k of a conv down stays with its input channels."""
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape)


def ref_tucker(core, a, b) -> torch.Tensor:
    """W[:, :, y, x] = aᵀ · core[:, :, y, x] · b, one kernel position at a time (a: [r, out], b: [r, in])."""
    out = torch.zeros(a.shape[1], b.shape[1], *core.shape[2:])
    for y in range(core.shape[2]):
        for x in range(core.shape[3]):
            out[:, :, y, x] = a.T @ core[:, :, y, x] @ b
    return out


def ref_dora(w0, delta, m, axis: str) -> torch.Tensor:
    merged = w0 + delta
    if axis == "out":
        norm = torch.stack([merged[o].norm() for o in range(merged.shape[0])]).reshape(m.shape)
    else:
        norm = torch.stack([merged[:, i].norm() for i in range(merged.shape[1])]).reshape(m.shape)
    return m * merged / norm


def test_loha_on_attention_conv_and_text_encoder_with_te_and_unet_weights(sd1, tmp_path):
    r = Rand(1)
    rank, alpha = 4, 2.0
    tensors = {}
    layers = {unet_key(ATTN): ("unet", ATTN, 64, 32), unet_key(CONV): ("unet", CONV, 64, 32 * 9),
              te_key(TE): ("text_encoder", TE, 37, 32)}
    for key, (_, _, out, inputs) in layers.items():
        tensors.update({f"{key}.hada_w1_a": r(out, rank), f"{key}.hada_w1_b": r(rank, inputs),
                        f"{key}.hada_w2_a": r(out, rank), f"{key}.hada_w2_b": r(rank, inputs),
                        f"{key}.alpha": torch.tensor(alpha)})
    lora = write(tmp_path, "hadamard", tensors, torch.float16)  # kept in the file's dtype, merged in float32
    assert lora.algorithm == "loha" and lora_card(lora)["algorithm"] == "LoHa" and lora_card(lora)["rank"] == "4"
    slot = LoraSlot(sd1)
    base = snapshot(sd1)
    w0 = {key: weight(sd1, c, p) for key, (c, p, _, _) in layers.items()}
    slot.apply([ActiveLora(lora, te=0.5, unet=1.5)])
    for key, (component, path, _, _) in layers.items():
        s = 0.5 if component == "text_encoder" else 1.5
        h = {n: stored(lora, f"{key}.hada_{n}") for n in ("w1_a", "w1_b", "w2_a", "w2_b")}
        delta = ((h["w1_a"] @ h["w1_b"]) * (h["w2_a"] @ h["w2_b"]) * alpha / rank).reshape(w0[key].shape)
        assert torch.allclose(weight(sd1, component, path), w0[key] + s * delta, atol=1e-5), key
        assert delta.abs().max() > 0.05
    # te=0: the text encoder is untouched, bit for bit
    slot.apply([ActiveLora(lora, te=0.0, unet=1.0)])
    assert torch.equal(weight(sd1, "text_encoder", TE), w0[te_key(TE)])
    assert not torch.equal(weight(sd1, "unet", ATTN), w0[unet_key(ATTN)])
    slot.apply([ActiveLora(lora, te=0.0, unet=0.0)])  # weight 0: the base model
    assert_same(snapshot(sd1), base)
    slot.apply([ActiveLora(lora, te=1.0, unet=1.0)])
    slot.apply([])
    assert_same(snapshot(sd1), base)


def test_loha_tucker_conv_rebuilds_each_factor_from_its_core(sd1, tmp_path):
    r = Rand(2)
    rank, alpha = 3, 6.0
    key = unet_key(CONV)
    t1, t2 = r(rank, rank, 3, 3), r(rank, rank, 3, 3)
    w1a, w1b, w2a, w2b = r(rank, 64), r(rank, 32), r(rank, 64), r(rank, 32)
    lora = write(tmp_path, "hadatucker", {f"{key}.hada_t1": t1, f"{key}.hada_t2": t2, f"{key}.hada_w1_a": w1a,
                                          f"{key}.hada_w1_b": w1b, f"{key}.hada_w2_a": w2a, f"{key}.hada_w2_b": w2b,
                                          f"{key}.alpha": torch.tensor(alpha)})
    slot = LoraSlot(sd1)
    w0 = weight(sd1, "unet", CONV)
    slot.apply([ActiveLora(lora, 1.0, 0.8)])
    delta = ref_tucker(t1, w1a, w1b) * ref_tucker(t2, w2a, w2b) * alpha / rank
    assert torch.allclose(weight(sd1, "unet", CONV), w0 + 0.8 * delta, atol=1e-5)
    slot.apply([])
    assert torch.equal(weight(sd1, "unet", CONV), w0)


def test_locon_tucker_kernel_is_the_three_convolutions_and_alpha_defaults_to_rank(sd1, tmp_path):
    r = Rand(3)
    rank, alpha = 4, 1.0
    tucker, plain = unet_key(CONV), unet_key(CONV_SQ)
    down, mid, up = r(rank, 32, 1, 1), r(rank, rank, 3, 3), r(64, rank, 1, 1)
    down3, up3 = r(rank, 32, 3, 3), r(32, rank, 1, 1)  # a 3x3 down without mid, and no alpha (alpha = rank)
    lora = write(tmp_path, "locon", {f"{tucker}.lora_down.weight": down, f"{tucker}.lora_mid.weight": mid,
                                     f"{tucker}.lora_up.weight": up, f"{tucker}.alpha": torch.tensor(alpha),
                                     f"{plain}.lora_down.weight": down3, f"{plain}.lora_up.weight": up3})
    assert lora.algorithm == "locon" and lora_card(lora)["algorithm"] == "LoCon"
    slot = LoraSlot(sd1)
    w0, w0_sq = weight(sd1, "unet", CONV), weight(sd1, "unet", CONV_SQ)
    slot.apply([ActiveLora(lora, 1.0, 1.0)])
    delta = (weight(sd1, "unet", CONV) - w0) / (alpha / rank)
    # the merged kernel does what the three convolutions do: 1x1 down, 3x3 mid, 1x1 up
    x = Rand(30)(2, 32, 6, 6, scale=1.0)
    chained = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)
    assert torch.allclose(F.conv2d(x, delta, padding=1), chained, atol=1e-4)
    assert torch.allclose(weight(sd1, "unet", CONV_SQ), w0_sq + ref_updown(up3, down3, w0_sq.shape), atol=1e-5)
    slot.apply([])
    assert torch.equal(weight(sd1, "unet", CONV), w0) and torch.equal(weight(sd1, "unet", CONV_SQ), w0_sq)


def test_lokr_scale_is_one_for_full_factors_and_alpha_over_rank_for_decomposed_ones(sd1, tmp_path):
    r = Rand(4)
    attn, attn_sq, conv, conv_sq = unet_key(ATTN), unet_key(ATTN_SQ), unet_key(CONV), unet_key(CONV_SQ)
    te = te_key(TE)
    w1, w2 = r(4, 2), r(16, 16)  # full w1 and w2 on 32 -> 64: alpha is ignored
    w1s, w2a, w2b = r(4, 4), r(8, 2), r(2, 8)  # w2 of rank 2 on 32 -> 32
    cw1, cw2 = r(2, 4), r(32, 8, 3, 3)  # conv: a 4-D w2, w1 as [2, 4, 1, 1]
    tw1, t2, tw2a, tw2b = r(2, 2), r(3, 3, 3, 3), r(3, 16), r(3, 16)  # conv: w2 as a Tucker core
    ew1a, ew1b, ew2 = r(1, 2), r(2, 2), r(37, 16)  # text encoder 32 -> 37: w1 decomposed (rank 2)
    tensors = {f"{attn}.lokr_w1": w1, f"{attn}.lokr_w2": w2, f"{attn}.alpha": torch.tensor(8.0),
               f"{attn_sq}.lokr_w1": w1s, f"{attn_sq}.lokr_w2_a": w2a, f"{attn_sq}.lokr_w2_b": w2b,
               f"{attn_sq}.alpha": torch.tensor(1.0),
               f"{conv}.lokr_w1": cw1, f"{conv}.lokr_w2": cw2,
               f"{conv_sq}.lokr_w1": tw1, f"{conv_sq}.lokr_t2": t2, f"{conv_sq}.lokr_w2_a": tw2a,
               f"{conv_sq}.lokr_w2_b": tw2b, f"{conv_sq}.alpha": torch.tensor(6.0),
               f"{te}.lokr_w1_a": ew1a, f"{te}.lokr_w1_b": ew1b, f"{te}.lokr_w2": ew2, f"{te}.alpha": torch.tensor(3.0)}
    lora = write(tmp_path, "kron", tensors)
    assert lora.algorithm == "lokr" and lora_card(lora)["algorithm"] == "LoKr"
    expected = {("unet", ATTN): torch.kron(w1, w2),
                ("unet", ATTN_SQ): torch.kron(w1s, w2a @ w2b) * 1.0 / 2,
                ("unet", CONV): torch.kron(cw1[:, :, None, None], cw2),
                ("unet", CONV_SQ): torch.kron(tw1[:, :, None, None], ref_tucker(t2, tw2a, tw2b)) * 6.0 / 3,
                ("text_encoder", TE): torch.kron(ew1a @ ew1b, ew2) * 3.0 / 2}
    slot = LoraSlot(sd1)
    w0 = {k: weight(sd1, *k) for k in expected}
    slot.apply([ActiveLora(lora, te=-1.0, unet=0.6)])
    for (component, path), delta in expected.items():
        s = -1.0 if component == "text_encoder" else 0.6
        assert delta.shape == w0[(component, path)].shape
        assert torch.allclose(weight(sd1, component, path), w0[(component, path)] + s * delta, atol=1e-5), path
    slot.apply([])
    assert all(torch.equal(weight(sd1, *k), w0[k]) for k in expected)


@pytest.mark.parametrize("axis", ["out", "in"])
def test_dora_decomposes_the_original_weight_on_the_files_axis(sd1, tmp_path, axis):
    r = Rand(5 if axis == "out" else 6)
    rank, alpha = 4, 2.0
    tensors, layers = {}, {}
    for component, path, key, out, inputs, kernel in (("unet", ATTN, unet_key(ATTN), 64, 32, ()),
                                                      # square: [out, 1] and [1, in] hold as many values
                                                      ("unet", ATTN_SQ, unet_key(ATTN_SQ), 32, 32, ()),
                                                      ("unet", CONV, unet_key(CONV), 64, 32, (3, 3)),
                                                      ("text_encoder", TE, te_key(TE), 37, 32, ())):
        down, up = r(rank, inputs, *kernel), r(out, rank, *([1, 1] if kernel else []))
        ones = [1] * len(kernel)
        m_shape = [out, 1, *ones] if axis == "out" else [1, inputs, *ones]
        m = r(*m_shape, scale=0.1).abs() + 0.5
        tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": torch.tensor(alpha), f"{key}.dora_scale": m})
        layers[(component, path)] = (down, up, m)
    lora = write(tmp_path, f"dora{axis}", tensors)
    assert lora.algorithm == "locon+dora" and lora_card(lora)["algorithm"] == "LoCon + DoRA"  # a 3x3 conv: LoCon
    linear_only = {k: v for k, v in tensors.items() if k.startswith(unet_key(ATTN) + ".")}
    assert lora_card(write(tmp_path, f"doralinear{axis}", linear_only))["algorithm"] == "DoRA"
    slot = LoraSlot(sd1)
    w0 = {k: weight(sd1, *k) for k in layers}
    refs = {}
    for k, (down, up, m) in layers.items():
        refs[k] = ref_dora(w0[k], ref_updown(up, down, w0[k].shape) * alpha / rank, m, axis)
        # W' has the file's magnitude along its axis
        norms = refs[k].flatten(1).norm(dim=1) if axis == "out" else refs[k].transpose(0, 1).flatten(1).norm(dim=1)
        assert torch.allclose(norms, m.flatten(), atol=1e-5)
    slot.apply([ActiveLora(lora, 0.7, 0.7)])
    for k in layers:
        assert torch.allclose(weight(sd1, *k), w0[k] + 0.7 * (refs[k] - w0[k]), atol=1e-5), k
    # with a plain LoRA (a peft adapter) on the same layer, DoRA still decomposes the original weight
    plain = write(tmp_path, f"plain{axis}", {f"{unet_key(ATTN)}.lora_down.weight": r(2, 32),
                                             f"{unet_key(ATTN)}.lora_up.weight": r(64, 2),
                                             f"{unet_key(ATTN)}.alpha": torch.tensor(2.0)})
    slot.apply([ActiveLora(plain, 1.0, 1.0)])
    plain_delta = weight(sd1, "unet", ATTN) - w0[("unet", ATTN)]
    assert plain_delta.abs().max() > 0.01
    slot.apply([ActiveLora(lora, 1.0, 1.0), ActiveLora(plain, 1.0, 1.0)])
    assert torch.allclose(weight(sd1, "unet", ATTN), refs[("unet", ATTN)] + plain_delta, atol=1e-5)
    slot.apply([])
    assert all(torch.equal(weight(sd1, *k), w0[k]) for k in layers)
    slot.clear()


def test_full_diff_changes_weights_and_biases_and_restores_both(sd1, tmp_path):
    r = Rand(7)
    attn, conv, te = unet_key(ATTN), unet_key(CONV), te_key(TE)
    d_attn, d_conv, b_conv, d_te, b_te = r(64, 32), r(64, 32, 3, 3), r(64), r(37, 32), r(37)
    lora = write(tmp_path, "fulldiff", {f"{attn}.diff": d_attn, f"{conv}.diff": d_conv, f"{conv}.diff_b": b_conv,
                                        f"{te}.diff": d_te, f"{te}.diff_b": b_te})
    assert lora.algorithm == "full" and lora_card(lora)["algorithm"] == "full (diff)"
    slot = LoraSlot(sd1)
    conv_m, te_m = module(sd1, "unet", CONV), module(sd1, "text_encoder", TE)
    w0 = {p: weight(sd1, c, p) for c, p in (("unet", ATTN), ("unet", CONV), ("text_encoder", TE))}
    b0_conv, b0_te = conv_m.bias.detach().clone(), te_m.bias.detach().clone()
    slot.apply([ActiveLora(lora, te=2.0, unet=0.5)])
    assert torch.allclose(weight(sd1, "unet", ATTN), w0[ATTN] + 0.5 * d_attn, atol=1e-6)
    assert torch.allclose(weight(sd1, "unet", CONV), w0[CONV] + 0.5 * d_conv, atol=1e-6)
    assert torch.allclose(conv_m.bias, b0_conv + 0.5 * b_conv, atol=1e-6)
    assert torch.allclose(weight(sd1, "text_encoder", TE), w0[TE] + 2.0 * d_te, atol=1e-6)
    assert torch.allclose(te_m.bias, b0_te + 2.0 * b_te, atol=1e-6)
    slot.apply([])
    assert torch.equal(conv_m.bias, b0_conv) and torch.equal(te_m.bias, b0_te)
    assert all(torch.equal(weight(sd1, c, p), w0[p]) for c, p in (("unet", ATTN), ("unet", CONV), ("text_encoder", TE)))


def test_sdxl_lycoris_on_original_unet_names_and_both_text_encoders(xl, tmp_path):
    r = Rand(8)
    attn = "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"  # 96 -> 64
    conv = "down_blocks.1.resnets.0.conv1"  # 32 -> 64, 3x3
    te2 = "text_model.encoder.layers.0.self_attn.q_proj"  # 64 -> 64
    k_attn, k_conv = unet_key(sgm_path(attn, 2)), unet_key(sgm_path(conv, 2))
    k_te1, k_te2 = te_key(TE, "lora_te1_"), te_key(te2, "lora_te2_")
    rank = 4
    h = {n: r(*s) for n, s in (("w1_a", (64, rank)), ("w1_b", (rank, 96)), ("w2_a", (64, rank)), ("w2_b", (rank, 96)))}
    cdown, cmid, cup = r(rank, 32, 1, 1), r(rank, rank, 3, 3), r(64, rank, 1, 1)
    k1, k2a, k2b = r(4, 4), r(16, 2), r(2, 16)
    tdown, tup = r(rank, 32), r(37, rank)
    tensors = {**{f"{k_attn}.hada_{n}": v for n, v in h.items()}, f"{k_attn}.alpha": torch.tensor(2.0),
               f"{k_conv}.lora_down.weight": cdown, f"{k_conv}.lora_mid.weight": cmid,
               f"{k_conv}.lora_up.weight": cup, f"{k_conv}.alpha": torch.tensor(2.0),
               f"{k_te2}.lokr_w1": k1, f"{k_te2}.lokr_w2_a": k2a, f"{k_te2}.lokr_w2_b": k2b,
               f"{k_te2}.alpha": torch.tensor(1.0),
               f"{k_te1}.lora_down.weight": tdown, f"{k_te1}.lora_up.weight": tup, f"{k_te1}.alpha": torch.tensor(4.0),
               f"{k_te1}.dora_scale": r(37, 1).abs() + 0.5}
    lora = write(tmp_path, "xlmix", tensors)
    assert lora.family == "sdxl" and lora_card(lora)["algorithm"] == "LoHa + DoRA"
    targets = [("unet", attn), ("unet", conv), ("text_encoder", TE), ("text_encoder_2", te2)]
    slot = LoraSlot(xl)
    w0 = {k: weight(xl, *k) for k in targets}
    base = snapshot(xl)
    slot.apply([ActiveLora(lora, te=0.4, unet=1.2)])
    assert not slot.unmatched_notes([ActiveLora(lora, 0.4, 1.2)])
    expected = {
        ("unet", attn): (h["w1_a"] @ h["w1_b"]) * (h["w2_a"] @ h["w2_b"]) * 2.0 / rank,
        ("unet", conv): ref_tucker(cmid, cup.flatten(1).T, cdown.flatten(1)) * 2.0 / rank,
        ("text_encoder_2", te2): torch.kron(k1, k2a @ k2b) * 1.0 / 2,
    }
    dora_te = ref_dora(w0[("text_encoder", TE)], tup @ tdown, tensors[f"{k_te1}.dora_scale"], "out")
    expected[("text_encoder", TE)] = dora_te - w0[("text_encoder", TE)]
    for k, delta in expected.items():
        s = 1.2 if k[0] == "unet" else 0.4  # the te weight reaches both text encoders
        assert torch.allclose(weight(xl, *k), w0[k] + s * delta, atol=1e-5), k
    slot.apply([ActiveLora(lora, 0.0, 0.0)])
    assert_same(snapshot(xl), base)


def test_algorithms_the_studio_does_not_merge_are_refused_by_name(sd1, tmp_path):
    key = unet_key(ATTN)
    oft = {f"{key}.oft_blocks": torch.zeros(4, 16, 16), f"{key}.alpha": torch.tensor(1.0)}
    folder = tmp_path / "loras"
    folder.mkdir()
    save_file(oft, str(folder / "orthogonal.safetensors"))
    save_file({f"{key}.weight": torch.ones(64), f"{key}.on_input": torch.tensor(False)},
              str(folder / "ia3.safetensors"))
    save_file({f"{key}.a1.weight": torch.zeros(4, 32), f"{key}.a2.weight": torch.zeros(64, 4),
               f"{key}.b1.weight": torch.zeros(4, 32), f"{key}.b2.weight": torch.zeros(64, 4)},
              str(folder / "glora.safetensors"))
    scan = NetworkLibrary(folder, tmp_path / "embeddings").loras()
    assert OFT_MESSAGE in scan.skipped["orthogonal.safetensors"]
    assert "is an IA3 network" in scan.skipped["ia3.safetensors"]
    assert "is a GLoRA network" in scan.skipped["glora.safetensors"]
    base = snapshot(sd1)
    with pytest.raises(NetworkFileError, match=re.escape(OFT_MESSAGE)):
        LoraSlot(sd1).apply([ActiveLora(LoraFile("orthogonal", folder / "orthogonal.safetensors"), 1.0, 1.0)])
    assert_same(snapshot(sd1), base)


def test_family_is_told_from_lycoris_shapes_and_an_sd1_loha_is_refused_on_sdxl(xl, tmp_path):
    k = unet_key("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k")  # a name demo-tiny-xl has too
    loha = {f"{k}.hada_w1_a": (320, 4), f"{k}.hada_w1_b": (4, 768), f"{k}.hada_w2_a": (320, 4),
            f"{k}.hada_w2_b": (4, 768), f"{k}.alpha": ()}
    assert lora_family(loha) == "sd1"
    assert lora_family({f"{k}.lokr_w1": (8, 8), f"{k}.lokr_w2_a": (40, 4), f"{k}.lokr_w2_b": (4, 128)}) == "sd2"
    assert lora_family({f"{k}.lokr_w1_a": (8, 2), f"{k}.lokr_w1_b": (2, 16), f"{k}.lokr_w2": (80, 128)}) == "sdxl"
    assert lora_family({f"{k}.diff": (640, 2048)}) == "sdxl"
    assert lora_family({te_key("encoder.layers.0.self_attn.q_proj") + ".hada_w1_b": (4, 1024)}) == "sd2"
    # the file itself, on demo-tiny-xl: the panel's filter names its family, the slot refuses its shapes
    r = Rand(9)
    lora = write(tmp_path, "sd15loha", {key: r(*shape) if shape else torch.tensor(4.0) for key, shape in loha.items()})
    assert lora.family == "sd1"
    assert "made for SD 1.x models" in NetworkLibrary(tmp_path / "loras", tmp_path / "e").loras("sdxl").skipped[
        "sd15loha.safetensors"]
    base = snapshot(xl)
    with pytest.raises(NetworkFileError, match="another model family"):
        LoraSlot(xl).apply([ActiveLora(lora, 1.0, 1.0)])
    assert_same(snapshot(xl), base)


def test_unmatched_layers_are_told_and_a_file_matching_nothing_is_refused(sd1, tmp_path):
    r = Rand(10)
    key, stray = unet_key(ATTN), "lora_unet_no_such_block"
    tensors = {f"{key}.lokr_w1": r(4, 2), f"{key}.lokr_w2": r(16, 16), f"{stray}.lokr_w1": r(2, 2),
               f"{stray}.lokr_w2": r(2, 2)}
    lora = write(tmp_path, "partly", tensors)
    slot = LoraSlot(sd1)
    w0 = weight(sd1, "unet", ATTN)
    slot.apply([ActiveLora(lora, 1.0, 1.0)])
    notes = slot.unmatched_notes([ActiveLora(lora, 1.0, 1.0)])
    assert len(notes) == 1 and "1 of its layers match nothing" in notes[0] and stray in notes[0]
    assert not torch.equal(weight(sd1, "unet", ATTN), w0)
    slot.apply([])
    nothing = write(tmp_path, "nowhere", {f"{stray}.lokr_w1": r(2, 2), f"{stray}.lokr_w2": r(2, 2)})
    with pytest.raises(NetworkFileError, match="none of its 1 layers matches this model"):
        slot.apply([ActiveLora(nothing, 1.0, 1.0)])
    assert torch.equal(weight(sd1, "unet", ATTN), w0)


def test_lycoris_entries_are_evicted_and_cleared(sd1, tmp_path, monkeypatch):
    r = Rand(11)
    key = unet_key(ATTN)
    a = write(tmp_path, "a", {f"{key}.diff": r(64, 32)})
    b = write(tmp_path, "b", {f"{key}.diff": r(64, 32)})
    monkeypatch.setattr(adapters, "MAX_CACHED_ADAPTERS", 1)
    slot = LoraSlot(sd1)
    w0 = weight(sd1, "unet", ATTN)
    slot.apply([ActiveLora(a, 1.0, 1.0)])
    slot.apply([ActiveLora(b, 1.0, 1.0)])
    assert list(slot.loaded) == [adapters.adapter_id(b)] and list(slot.lycoris) == [adapters.adapter_id(b)]
    assert torch.allclose(weight(sd1, "unet", ATTN), w0 + b.state_dict()[f"{key}.diff"], atol=1e-6)
    slot.clear()
    assert not slot.loaded and not slot.lycoris and torch.equal(weight(sd1, "unet", ATTN), w0)


def test_a_loha_in_a_prompt_changes_the_image_and_weight_zero_is_the_base_image(tmp_path):
    from studio.config import StudioConfig
    from studio.generation.generate import Generator
    from studio.generation.job import GenerateJob
    from studio.models.manager import ModelManager

    cfg = StudioConfig().with_home(tmp_path / "home")
    cfg.ensure_dirs()
    manager = ModelManager(cfg)
    manager.load("demo-tiny")
    pipe = manager.current.pipe
    r = Rand(12)
    tensors = {}
    for path, m in pipe.unet.named_modules():
        if path.endswith(("attn1.to_q", "attn2.to_v", "attn1.to_out.0")):
            out, inputs = m.weight.shape
            for n in ("1", "2"):
                tensors[f"{unet_key(path)}.hada_w{n}_a"] = r(out, 4, scale=0.5)
                tensors[f"{unet_key(path)}.hada_w{n}_b"] = r(4, inputs, scale=0.5)
            tensors[f"{unet_key(path)}.alpha"] = torch.tensor(4.0)
    save_file({k: v.half() for k, v in tensors.items()}, str(cfg.loras_dir / "hatch.safetensors"))
    gen = Generator(manager)

    def image(prompt):
        job = GenerateJob(prompt=prompt, negative_prompt="", steps=3, width=64, height=64, seed=7, sampler="Euler",
                          schedule="Automatic")
        return np.asarray(gen.run(job).images[0].image).astype(np.int16)

    base = image("a lighthouse")
    assert np.abs(image("a lighthouse <lora:hatch:1>") - base).max() > 10
    assert np.array_equal(image("a lighthouse <lora:hatch:0>"), base)
    assert np.array_equal(image("a lighthouse"), base)
