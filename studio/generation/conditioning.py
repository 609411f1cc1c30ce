"""Prompt text to CLIP text-encoder conditioning the AUTOMATIC1111 way: 75-token chunks, emphasis
weights, BREAK, clip skip and textual-inversion embeddings, without changing the model."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from studio.generation.prompt_syntax import BREAK, parse_attention

CHUNK_LENGTH = 75  # CLIP's 77 positions less BOS and EOS
# a full chunk moves the words after a comma this close to its end into the next chunk (A1111's default)
COMMA_BACKTRACK = 20
COMMA_TOKEN = ",</w>"
# the token id under an embedding's vectors; the hook overwrites its embedding, so any id works
PLACEHOLDER_ID = 0


@dataclass
class TextualInversion:
    name: str
    vectors: torch.Tensor  # [n_vectors, dim]


@dataclass
class EncodedPrompt:
    embeds: torch.Tensor  # [1, 77 * n_chunks, dim]
    used_embeddings: list[str]
    pooled: torch.Tensor | None = None  # [1, dim] the first chunk's projected text embedding (SDXL's bigG)


@dataclass
class _Chunk:
    """Up to 75 tokens (no BOS/EOS yet), their weights, and where embeddings' vectors go."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (offset, vectors)

    def split_off(self, start: int) -> _Chunk:
        """Remove everything from `start` on and return it as a new chunk."""
        tail = _Chunk(
            self.tokens[start:],
            self.weights[start:],
            [(offset - start, vectors) for offset, vectors in self.fixes if offset >= start],
        )
        del self.tokens[start:], self.weights[start:]
        self.fixes = [(offset, vectors) for offset, vectors in self.fixes if offset < start]
        return tail


class _Packer:
    """Packs weighted tokens into chunks with A1111's rules (comma backtrack, BREAK, whole embeddings)."""

    def __init__(self, comma_id: int | None):
        self.comma_id = comma_id
        self.chunks: list[_Chunk] = []
        self.current = _Chunk()
        self.last_comma = -1

    def close(self) -> None:
        self.chunks.append(self.current)
        self.current = _Chunk()
        self.last_comma = -1

    def make_room(self, token: int) -> None:
        """Start a new chunk if the current one is full, carrying the words after a nearby comma along."""
        if len(self.current.tokens) < CHUNK_LENGTH:
            return
        near_comma = self.last_comma >= 0 and CHUNK_LENGTH - self.last_comma <= COMMA_BACKTRACK
        if token == self.comma_id or not near_comma:
            self.close()
            return
        carried = self.current.split_off(self.last_comma + 1)
        self.close()
        self.current = carried

    def add_token(self, token: int, weight: float) -> None:
        self.make_room(token)
        if token == self.comma_id:
            self.last_comma = len(self.current.tokens)
        self.current.tokens.append(token)
        self.current.weights.append(weight)

    def add_embedding(self, first_token: int, vectors: torch.Tensor, weight: float) -> None:
        self.make_room(first_token)
        # an embedding's vectors belong together: never split them over two chunks
        if len(self.current.tokens) + len(vectors) > CHUNK_LENGTH:
            self.close()
        self.current.fixes.append((len(self.current.tokens), vectors))
        self.current.tokens += [PLACEHOLDER_ID] * len(vectors)
        self.current.weights += [weight] * len(vectors)

    def finish(self) -> list[_Chunk]:
        if self.current.tokens or not self.chunks:
            self.close()
        return self.chunks


def _embedding_lookup(
    tokenizer, embeddings: Mapping[str, TextualInversion], width: int
) -> dict[int, list[tuple[list[int], str]]]:
    """First token id -> (token ids of the name, name), longest name first."""
    lookup: dict[int, list[tuple[list[int], str]]] = {}
    for name, embedding in embeddings.items():
        vectors = embedding.vectors
        if vectors.ndim != 2 or not 1 <= vectors.shape[0] <= CHUNK_LENGTH:
            raise ValueError(
                f"embedding {name!r} must hold 1 to {CHUNK_LENGTH} vectors as [n, dim], got {tuple(vectors.shape)}"
            )
        if vectors.shape[1] != width:
            raise ValueError(
                f"embedding {name!r} has vectors of width {vectors.shape[1]}, but this model's text encoder "
                f"needs {width} (it was made for another model family)"
            )
        ids = tokenizer(name, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"embedding name {name!r} has no tokens")
        lookup.setdefault(ids[0], []).append((ids, name))
    for candidates in lookup.values():
        candidates.sort(key=lambda candidate: len(candidate[0]), reverse=True)
    return lookup


def _match_embedding(
    lookup: Mapping[int, list[tuple[list[int], str]]], tokens: Sequence[int], position: int
) -> tuple[list[int], str] | None:
    for ids, name in lookup.get(tokens[position], ()):
        if list(tokens[position : position + len(ids)]) == ids:
            return ids, name
    return None


def apply_emphasis(z: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """A1111's "Original" emphasis: scale each position by its weight, then restore the chunk's mean."""
    if all(w == 1.0 for w in weights):
        return z  # untouched, so unweighted prompts match diffusers bit for bit
    # in float32: the two means of a float16 chunk would lose most of the correction's precision
    scaled = z.float()
    original_mean = scaled.mean()
    scaled = scaled * torch.tensor(weights, dtype=torch.float32, device=z.device)[None, :, None]
    scaled = scaled * (original_mean / scaled.mean())
    return scaled.to(z.dtype)


def _inject_hook(fixes: list[tuple[int, int, torch.Tensor]]):
    """A forward hook for the token-embedding layer that puts embeddings' vectors at their (row, offset).
    Gradients flow into the vectors, so training uses the same hook as generation."""
    # the model may be shared by several UI threads: only touch this thread's forward pass
    owner = threading.get_ident()

    def hook(module, args, output):
        if threading.get_ident() != owner:
            return None
        output = output.clone()
        for row, offset, vectors in fixes:
            output[row, offset : offset + len(vectors)] = vectors.to(device=output.device, dtype=output.dtype)
        return output

    return hook


def token_id(tokenizer, token: str) -> int | None:
    """The id of one vocabulary entry (e.g. ",</w>"), or None when the vocabulary lacks it. Not through
    tokenizer.get_vocab(), which copies the whole vocabulary (21 ms for CLIP's 49,408 entries)."""
    found = tokenizer.convert_tokens_to_ids(token)
    if found is None or (found == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return int(found)


def _final_layer_norm(text_encoder) -> torch.nn.Module:
    # transformers 5 CLIPTextModel holds it directly; older versions under .text_model
    owner = getattr(text_encoder, "text_model", text_encoder)
    return owner.final_layer_norm


class PromptEncoder:
    """Encodes A1111-syntax prompts with a CLIPTokenizer + CLIPTextModel pair, one 77-token chunk at a time."""

    def __init__(
        self,
        tokenizer,
        text_encoder,
        embeddings: Mapping[str, TextualInversion] | None = None,
        clip_skip: int = 1,
        runner=None,
        final_norm: bool = True,
    ):
        layers = text_encoder.config.num_hidden_layers
        if not 1 <= clip_skip <= layers:
            raise ValueError(f"clip skip must be 1 to {layers} for this text encoder, got {clip_skip}")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.clip_skip = clip_skip
        # A1111's clip skip on SD 1.x/2.x applies the final layer norm to the earlier layer; SDXL takes it raw
        self.final_norm = final_norm
        self._pooled = None  # the projected embedding of the last batch encoded, for text encoders that have one
        # what the forward pass calls: the text encoder itself, or a wrapper of it (DDP when training a text-encoder
        # LoRA on several GPUs, so its gradients are synchronised)
        self.runner = runner or text_encoder
        self.embeddings = dict(embeddings or {})
        width = text_encoder.get_input_embeddings().embedding_dim
        self._lookup = _embedding_lookup(tokenizer, self.embeddings, width)
        self._comma_id = token_id(tokenizer, COMMA_TOKEN)

    def set_embedding(self, embedding: TextualInversion) -> None:
        """Add or replace one embedding (training swaps in new vectors every step; the name's tokens stay)."""
        known = embedding.name in self.embeddings
        self.embeddings[embedding.name] = embedding
        if not known:
            width = self.text_encoder.get_input_embeddings().embedding_dim
            self._lookup = _embedding_lookup(self.tokenizer, self.embeddings, width)

    def _pack(self, text: str) -> tuple[list[_Chunk], list[str]]:
        segments = parse_attention(text)
        token_lists = self.tokenizer(
            [t for t, _ in segments], add_special_tokens=False, verbose=False
        ).input_ids
        packer = _Packer(self._comma_id)
        used: list[str] = []
        for (segment, weight), tokens in zip(segments, token_lists, strict=True):
            if (segment, weight) == BREAK:
                packer.close()
                continue
            position = 0
            while position < len(tokens):
                match = _match_embedding(self._lookup, tokens, position)
                if match is None:
                    packer.add_token(tokens[position], weight)
                    position += 1
                    continue
                ids, name = match
                packer.add_embedding(tokens[position], self.embeddings[name].vectors, weight)
                if name not in used:
                    used.append(name)
                position += len(ids)
        return packer.finish(), used

    def count_chunks(self, text: str) -> int:
        """How many 75-token chunks `text` takes (BREAKs and embeddings included): the tokenizer only."""
        return len(self._pack(text)[0])

    def _chunk_ids(self, chunk: _Chunk) -> list[int]:
        pad = [self.tokenizer.pad_token_id] * (CHUNK_LENGTH - len(chunk.tokens))
        return [self.tokenizer.bos_token_id, *chunk.tokens, self.tokenizer.eos_token_id, *pad]

    def _encode_chunks(self, chunks: Sequence[_Chunk]) -> torch.Tensor:
        """[len(chunks), 77, dim]: the chunks as one batch through the text encoder."""
        ids = torch.tensor([self._chunk_ids(chunk) for chunk in chunks], device=self.text_encoder.device)
        # BOS sits before the chunk's tokens: shift each embedding's offset by one
        fixes = [(row, offset + 1, vectors) for row, chunk in enumerate(chunks) for offset, vectors in chunk.fixes]
        hook = None
        if fixes:
            hook = self.text_encoder.get_input_embeddings().register_forward_hook(_inject_hook(fixes))
        try:
            if self.clip_skip == 1 and self.final_norm:
                out = self.runner(ids)
                z = out.last_hidden_state
            else:
                out = self.runner(ids, output_hidden_states=True)
                z = out.hidden_states[-self.clip_skip]
                if self.final_norm:
                    z = _final_layer_norm(self.text_encoder)(z)
            self._pooled = getattr(out, "text_embeds", None)
        finally:
            if hook is not None:
                hook.remove()
        rows = []
        for row, chunk in enumerate(chunks):
            weights = [1.0, *chunk.weights, 1.0] + [1.0] * (CHUNK_LENGTH - len(chunk.weights))
            rows.append(apply_emphasis(z[row : row + 1], weights))
        return torch.cat(rows)

    def _encode_chunk(self, chunk: _Chunk) -> torch.Tensor:
        return self._encode_chunks([chunk])

    def encode_batch(self, texts: Sequence[str]) -> torch.Tensor:
        """[B, 77, dim] for prompts of one chunk each, with gradients (training prompts: the embedding being
        trained is one of `embeddings`, and its vectors may require grad)."""
        chunks = []
        for text in texts:
            packed, _ = self._pack(text)
            if len(packed) != 1:
                raise ValueError(f"a training prompt must fit in 75 tokens (one chunk), got {len(packed)} chunks: "
                                 f"{text[:80]!r}")
            chunks.append(packed[0])
        return self._encode_chunks(chunks)

    @torch.no_grad()
    def encode(self, text: str) -> EncodedPrompt:
        chunks, used = self._pack(text)
        parts, pooled = [], None
        for i, chunk in enumerate(chunks):
            parts.append(self._encode_chunk(chunk))
            if i == 0:
                pooled = self._pooled  # A1111 and diffusers take the pooled vector of the first chunk
        return EncodedPrompt(embeds=torch.cat(parts, dim=1), used_embeddings=used, pooled=pooled)

    def encode_pair(self, prompt: str, negative: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Prompt and negative conditioning of one length: the shorter gets empty-prompt chunks appended."""
        cond, uncond, used = encode_pair(self, prompt, negative)
        return cond.embeds, uncond.embeds, used


class XLPromptEncoder:
    """SDXL prompts the A1111 way on both text encoders: each chunk through CLIP ViT-L and OpenCLIP bigG (the
    penultimate layer, raw), emphasis per encoder, concatenated along the width; the pooled vector from bigG's first
    chunk. Clip skip leaves SDXL alone, as in A1111 and ComfyUI (an SDXL image's "Clip skip: 2" is the default
    layer), unless `clip_l_skip` (A1111's "apply to CLIP-L"): then CLIP-L takes hidden_states[-clip_skip]."""

    def __init__(self, pipe, clip_skip: int = 1, embeddings: Mapping[str, TextualInversion] | None = None,
                 embeddings_g: Mapping[str, TextualInversion] | None = None, clip_l_skip: bool = False):
        """`embeddings`: SDXL embeddings' clip_l vectors (first encoder), `embeddings_g` their clip_g vectors, by
        the same names."""
        embeddings, embeddings_g = dict(embeddings or {}), dict(embeddings_g or {})
        if set(embeddings) != set(embeddings_g):
            missing = sorted(set(embeddings) ^ set(embeddings_g))
            raise ValueError(f"SDXL embeddings need vectors for both text encoders (clip_l and clip_g): {missing}")
        layers = pipe.text_encoder.config.num_hidden_layers
        if not 1 <= clip_skip <= layers:
            raise ValueError(f"clip skip must be 1 to {layers} for this text encoder, got {clip_skip}")
        self.clip_skip = clip_skip
        skips = (clip_skip if clip_l_skip else 2, 2)
        self.parts = [PromptEncoder(tokenizer, text_encoder, found, clip_skip=skip, final_norm=False)
                      for tokenizer, text_encoder, found, skip in (
                          (pipe.tokenizer, pipe.text_encoder, embeddings, skips[0]),
                          (pipe.tokenizer_2, pipe.text_encoder_2, embeddings_g, skips[1]))]

    def count_chunks(self, text: str) -> int:
        return self.parts[0].count_chunks(text)  # both tokenizers share one vocabulary: the same chunks

    @torch.no_grad()
    def encode(self, text: str) -> EncodedPrompt:
        first, second = (part.encode(text) for part in self.parts)
        return EncodedPrompt(torch.cat([first.embeds, second.embeds], dim=-1), first.used_embeddings, second.pooled)

    def encode_pair(self, prompt: str, negative: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        cond, uncond, used = encode_pair(self, prompt, negative)
        return cond.embeds, uncond.embeds, used

    # --- training (studio.train): embeddings swapped in every step, batches with gradients ---

    def set_embedding(self, name: str, vectors_l: torch.Tensor, vectors_g: torch.Tensor) -> None:
        """Add or replace one SDXL embedding: its clip_l vectors for the first encoder, clip_g for the second."""
        self.parts[0].set_embedding(TextualInversion(name, vectors_l))
        self.parts[1].set_embedding(TextualInversion(name, vectors_g))

    def set_runners(self, runner_l, runner_g) -> None:
        """What each encoder's forward pass calls (training: the encoders wrapped for several GPUs); None: itself."""
        for part, runner in zip(self.parts, (runner_l, runner_g), strict=True):
            part.runner = runner or part.text_encoder

    def encode_batch(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, 77, width_l + width_g], [B, projection]) for prompts of one chunk each, with gradients: both
        encoders' conditioning concatenated, and the second encoder's pooled (projected) embedding."""
        first = self.parts[0].encode_batch(texts)
        second = self.parts[1].encode_batch(texts)
        return torch.cat([first, second], dim=-1), self.parts[1]._pooled


def encode_pair(encoder, prompt: str, negative: str) -> tuple[EncodedPrompt, EncodedPrompt, list[str]]:
    """Prompt and negative EncodedPrompts of one length (the shorter gets empty-prompt chunks appended), and the
    embeddings used."""
    cond, uncond = encoder.encode(prompt), encoder.encode(negative)
    length = max(cond.embeds.shape[1], uncond.embeds.shape[1])
    empty = encoder.encode("").embeds if cond.embeds.shape[1] != uncond.embeds.shape[1] else None
    cond.embeds, uncond.embeds = (_pad_with(e.embeds, empty, length) for e in (cond, uncond))
    used = cond.used_embeddings + [n for n in uncond.used_embeddings if n not in cond.used_embeddings]
    return cond, uncond, used


def encode_spans(encoder, spans: Sequence[tuple[int, str, str]]) -> tuple[tuple, list[str]]:
    """(last step, cond, uncond, pooled, uncond pooled) per span of a prompt-editing schedule (pooled: None but for
    SDXL), every tensor as long as the longest (empty-prompt chunks appended), each distinct text encoded once; and
    the embeddings used."""
    texts = list(dict.fromkeys(text for _, cond, uncond in spans for text in (cond, uncond)))
    encoded = {text: encoder.encode(text) for text in texts}
    length = max(e.embeds.shape[1] for e in encoded.values())
    empty = encoder.encode("").embeds if any(e.embeds.shape[1] != length for e in encoded.values()) else None
    padded = {text: _pad_with(e.embeds, empty, length) for text, e in encoded.items()}
    used = list(dict.fromkeys(name for e in encoded.values() for name in e.used_embeddings))
    return tuple((end, padded[c], padded[u], encoded[c].pooled, encoded[u].pooled) for end, c, u in spans), used


def _pad_with(embeds: torch.Tensor, empty: torch.Tensor | None, length: int) -> torch.Tensor:
    """`embeds` lengthened to `length` positions with copies of the empty prompt's chunk."""
    if embeds.shape[1] == length:
        return embeds
    return torch.cat([embeds, empty.repeat(1, (length - embeds.shape[1]) // empty.shape[1], 1)], dim=1)
