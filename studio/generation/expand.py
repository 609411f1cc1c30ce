"""Prompt expansion: a GPT-2 language model continues a short prompt into a detailed Stable Diffusion prompt.

`demo-tiny` is a tiny GPT-2 built and trained in code (offline, deterministic) for tests and demo mode.
"""

from __future__ import annotations

import gc
import pickle
import random
import re
import tempfile
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from studio.files.atomic import atomic_dir
from studio.files.pickles import folder_refusal
from studio.models.hub import offline, offline_reason

DEFAULT_EXPANDER = "Gustavosta/MagicPrompt-Stable-Diffusion"
TINY_EXPANDER = "demo-tiny"
TINY_VERSION = 1  # bump when TINY_CORPUS or build_tiny_expander changes
MAX_SEED = 2**32 - 1  # the range generate.py accepts, so one seed box serves both
MAX_NEW_TOKENS = 512
MAX_VARIANTS = 16
# an expansion that adds nothing is useless: the end-of-text token is blocked for the first few tokens
MIN_NEW_TOKENS = 8
EOT = "<|endoftext|>"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

ProgressFn = Callable[[int, int, str], None]


class ExpandError(RuntimeError):
    """The expander model cannot be loaded or run; the message says what to do."""


@dataclass
class ExpandJob:
    prompt: str
    model: str = DEFAULT_EXPANDER
    seed: int = -1  # -1: a random seed, reported back in ExpandResult.seed
    max_new_tokens: int = 60
    temperature: float = 0.9
    top_k: int = 50  # 0: no top-k filtering
    top_p: float = 0.95
    num_variants: int = 1  # variant i samples with seed + i, as A1111 numbers the images of a batch

    def validate(self) -> ExpandJob:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("the prompt to expand is empty: type a few words first")
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError("no expander model given: use a hub id, a local folder or 'demo-tiny'")
        if not -1 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be -1 (random) or between 0 and {MAX_SEED}, got {self.seed}")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(
                f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}, got {self.max_new_tokens}")
        if not 0 < self.temperature <= 5:
            raise ValueError(f"temperature must be above 0 and at most 5, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (off) or a positive number of tokens, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be above 0 and at most 1, got {self.top_p}")
        if not 1 <= self.num_variants <= MAX_VARIANTS:
            raise ValueError(f"num_variants must be between 1 and {MAX_VARIANTS}, got {self.num_variants}")
        return self


@dataclass
class ExpandResult:
    texts: list[str]
    seed: int  # the seed actually used (resolved when the job asked for -1); variant i used seed + i


def looks_like_path(spec: str) -> bool:
    """True for specs that can only be meant as a folder (hub ids are exactly `owner/name`)."""
    return (
        spec.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or "\\" in spec
        or bool(re.match(r"^[A-Za-z]:", spec))
        or spec.endswith("/")
        or spec.count("/") > 1
        or spec in (".", "..")
    )


def clean_expansion(prompt: str, continuation: str, hit_budget: bool) -> str:
    """The user's prompt followed by the first line of the model's continuation, tidied.

    Whitespace is collapsed to single spaces (the prompt's too, so no newline survives). When generation
    ran out of tokens, the text after the continuation's last comma is likely a cut-off phrase and is dropped;
    the user's own text is never cut. Trailing commas and spaces go; A1111 syntax characters are kept.
    """
    head = " ".join(prompt.split())
    lines = continuation.splitlines()
    tail = lines[0] if lines else ""
    if len(lines) > 1:
        hit_budget = False  # the model finished its line: nothing was cut off
    if continuation[:1].isspace() and tail and not tail[:1].isspace():
        tail = " " + tail  # keep the word break the model chose
    if hit_budget and "," in tail:
        tail = tail[: tail.rfind(",")]
    tail = re.sub(r"\s+", " ", tail).rstrip(" ,")
    return (head + tail).rstrip(" ,") or head


@contextmanager
def seeded_rng(seed: int, device: torch.device):
    """Seed the CPU generator (and `device`'s, if CUDA) for a block, restoring every global RNG after it.

    Not torch.manual_seed: it reseeds every CUDA device, a change fork_rng(devices=[]) would not undo.
    """
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def resolve_seed(seed: int) -> int:
    return random.randint(0, MAX_SEED) if seed == -1 else seed


class PromptExpander:
    """Owns one loaded expander model at a time: loaded on first use, kept until another is asked for."""

    def __init__(self, device: str | torch.device = "cpu", cache_dir: Path | str | None = None):
        self.device = torch.device(device)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.loaded_spec: str | None = None
        self.model = None
        self.tokenizer = None
        # Gradio runs events on worker threads: one load or generation at a time
        self.lock = threading.RLock()

    # loading

    def resolve(self, spec: str) -> tuple[str, Path | None]:
        """("demo" | "local" | "hub", folder or None); a path that does not exist is an error here."""
        spec = spec.strip()
        if spec == TINY_EXPANDER:
            return "demo", None
        path = Path(spec).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ExpandError(
                    f"{spec} is not a model folder (no config.json): an expander folder holds config.json, "
                    f"the weights and the tokenizer, as written by save_pretrained")
            return "local", path
        if path.exists():
            raise ExpandError(
                f"{spec} is a file; an expander is a folder holding config.json, the weights and the "
                f"tokenizer (as written by save_pretrained)")
        if looks_like_path(spec) or not HUB_ID.match(spec):
            what = "folder" if looks_like_path(spec) else "model"
            raise ExpandError(
                f"expander {what} {spec} not found: no such folder, and not a Hugging Face id (owner/name). "
                f"Give an existing folder with a GPT-2 model and its tokenizer, a hub id such as "
                f"{DEFAULT_EXPANDER}, or '{TINY_EXPANDER}'.")
        return "hub", None

    def load(self, spec: str, on_progress: ProgressFn | None = None):
        """The (tokenizer, model) for `spec`, loading it (and dropping the previous one) if needed."""
        spec = spec.strip()
        with self.lock:
            if self.loaded_spec == spec and self.model is not None:
                return self.tokenizer, self.model
            kind, path = self.resolve(spec)
            if self.device.type == "cuda" and not torch.cuda.is_available():
                raise ExpandError("the expander was asked to run on CUDA but no CUDA GPU is available")
            if on_progress:
                on_progress(0, 1, f"loading expander {spec}")
            self.unload()
            if kind == "demo":
                tokenizer, model = self._load_demo()
            elif kind == "local":
                tokenizer, model = self._from_pretrained(str(path), spec, local_only=True)
            else:
                tokenizer, model = self._from_pretrained(spec, spec, local_only=offline())
            if tokenizer.pad_token_id is None:
                # GPT-2 has no pad token; generate() wants one, and eos is the usual stand-in
                tokenizer.pad_token = tokenizer.eos_token
            model.to(self.device).eval()
            self.tokenizer, self.model, self.loaded_spec = tokenizer, model, spec
            if on_progress:
                on_progress(1, 1, f"loaded expander {spec}")
            return tokenizer, model

    def _from_pretrained(self, source: str, spec: str, local_only: bool):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(source, local_files_only=local_only,
                                                         trust_remote_code=False)
        except pickle.UnpicklingError as e:  # weights that would run code: refused by weights_only=True
            raise ExpandError(f"could not load the expander {spec}: {folder_refusal(source, e)}") from e
        except OSError as e:
            if local_only and not Path(source).is_dir():
                raise ExpandError(
                    f"expander {spec} is not available: {offline_reason()}, it is not in the Hugging "
                    f"Face cache and no local folder has that name. Run once online to download it, point "
                    f"to a local folder holding the model (save_pretrained layout), or use '{TINY_EXPANDER}'."
                ) from e
            if Path(source).is_dir():
                raise ExpandError(f"could not load the expander folder {spec}: {e}") from e
            raise ExpandError(f"could not download expander {spec} from the Hugging Face hub: {e}") from e
        except Exception as e:
            where = "the expander folder" if Path(source).is_dir() else "expander"
            raise ExpandError(f"could not load {where} {spec}: {type(e).__name__}: {e}") from e
        if not getattr(model, "can_generate", lambda: False)():
            raise ExpandError(f"{spec} is not a text-generation (causal LM) model")
        return tokenizer, model

    def _load_demo(self):
        if self.cache_dir is None:
            with tempfile.TemporaryDirectory(prefix="studio-expander-") as tmp:
                folder = build_tiny_expander(Path(tmp) / TINY_EXPANDER)
                return self._from_pretrained(str(folder), TINY_EXPANDER, local_only=True)
        # versioned: a folder built from an older corpus or recipe is not reused
        folder = self.cache_dir / f"expander-{TINY_EXPANDER}-v{TINY_VERSION}"
        if not _is_saved_model(folder):
            build_tiny_expander(folder)
        return self._from_pretrained(str(folder), TINY_EXPANDER, local_only=True)

    def unload(self) -> None:
        with self.lock:
            if self.model is None:
                return
            self.model = self.tokenizer = self.loaded_spec = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # expanding

    def expand(self, job: ExpandJob, on_progress: ProgressFn | None = None) -> ExpandResult:
        job.validate()
        with self.lock:
            tokenizer, model = self.load(job.model, on_progress)
            seed = resolve_seed(job.seed)
            prompt = " ".join(job.prompt.split())
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
            # fit the model's window: never more new tokens than it holds, and a prompt too long for the
            # rest is cut to its tail, which is enough context to continue from (the text keeps it all)
            config = model.config
            window = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 0)
            budget = min(job.max_new_tokens, window - 1) if window else job.max_new_tokens
            if window and ids.shape[1] + budget > window:
                ids = ids[:, -(window - budget):]
            ids = ids.to(self.device)
            eos = tokenizer.eos_token_id
            texts = []
            for i in range(job.num_variants):
                if on_progress:
                    on_progress(i, job.num_variants, f"expanding {i + 1}/{job.num_variants}")
                with seeded_rng(seed + i, self.device), torch.inference_mode():
                    out = model.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        do_sample=True,
                        temperature=job.temperature,
                        top_k=job.top_k,
                        top_p=job.top_p,
                        max_new_tokens=budget,
                        min_new_tokens=min(MIN_NEW_TOKENS, budget),
                        pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=eos,
                    )
                new = out[0, ids.shape[1]:].tolist()
                hit_budget = eos not in new
                continuation = tokenizer.decode(new, skip_special_tokens=True)
                texts.append(clean_expansion(prompt, continuation, hit_budget))
            if on_progress:
                on_progress(job.num_variants, job.num_variants, "expanded")
            return ExpandResult(texts, seed)


def _is_saved_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()


# demo-tiny: a tiny GPT-2 trained in code on a handful of SD-style prompts

TINY_CORPUS = [
    "a portrait of a woman, highly detailed, digital painting, artstation, concept art, sharp focus, "
    "illustration, art by greg rutkowski",
    "a cat sitting on a windowsill, golden hour, soft lighting, photorealistic, 8k, bokeh, "
    "by annie leibovitz",
    "a futuristic city at night, neon lights, cyberpunk, rain, reflections, octane render, "
    "trending on artstation",
    "an old wizard with a long beard, fantasy, intricate, elegant, highly detailed, digital painting, "
    "art by artgerm and alphonse mucha",
    "a mountain landscape at sunrise, epic composition, volumetric lighting, matte painting, "
    "by albert bierstadt",
    "a cute robot in a garden, pixar style, 3d render, soft colors, unreal engine, cinematic lighting",
    "a dragon flying over a castle, dramatic sky, fantasy art, highly detailed, by frank frazetta",
    "a bowl of fruit on a wooden table, still life, oil painting, chiaroscuro, by caravaggio",
    "a knight in shining armor, full body, heroic pose, concept art, sharp focus, art by craig mullins",
    "a cozy cabin in a snowy forest, warm light, winter, hyperrealistic, 4k, trending on artstation",
    "a portrait of a man with a beard, studio lighting, 85mm lens, sharp focus, photorealistic, 8k",
    "an astronaut riding a horse on mars, surreal, digital art, vibrant colors, by simon stalenhag",
    "a steampunk airship above the clouds, brass and copper, intricate details, illustration, "
    "by james gurney",
    "a girl with red hair in a field of flowers, anime style, studio ghibli, soft pastel colors",
    "a haunted house on a hill, moonlight, fog, dark fantasy, eerie atmosphere, by zdzislaw beksinski",
    "a close up of a tiger face, wildlife photography, national geographic, highly detailed fur, 8k",
    "a samurai standing in the rain, cinematic, moody lighting, digital painting, art by wlop",
    "an underwater city with glowing jellyfish, bioluminescent, fantasy, concept art, trending on artstation",
    "a beautiful elf princess, elegant, intricate, highly detailed, digital painting, art by artgerm",
    "a medieval village market, busy street, detailed, oil on canvas, by thomas kinkade",
    "a portrait of an old woman, wrinkles, soft light, black and white photography, by richard avedon",
    "a spaceship landing in a desert, sci fi, matte painting, epic scale, volumetric light, by syd mead",
    "a fox in an autumn forest, golden leaves, storybook illustration, watercolor, by beatrix potter",
    "a lighthouse on a rocky coast, stormy sea, crashing waves, dramatic lighting, oil painting",
    "a cyborg woman, biomechanical, intricate, highly detailed, sharp focus, art by hr giger",
    "a japanese garden with cherry blossoms, peaceful, soft morning light, highly detailed, 4k",
    "a viking warrior, portrait, fierce expression, war paint, concept art, art by greg rutkowski",
    "a magical library with floating books, warm candle light, fantasy, intricate, digital painting",
    "a city street in paris, rainy evening, impressionism, oil painting, by claude monet",
    "a portrait of a young man, cinematic lighting, hyperrealistic, octane render, unreal engine 5, 8k",
]


def build_tiny_expander(folder: Path | str, seed: int = 0, train_steps: int = 80) -> Path:
    """Build, train briefly and save (save_pretrained layout) a tiny GPT-2 prompt expander; deterministic.

    Its byte-level BPE tokenizer is trained on TINY_CORPUS in-process, then the model learns the corpus for
    `train_steps` full-batch steps, enough for comma-separated, prompt-like continuations. Offline, about
    2 s on two CPU cores.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = Path(folder)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, min_frequency=2, special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(TINY_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=EOT,
        model_max_length=128)

    eot = tokenizer.convert_tokens_to_ids(EOT)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    # each example ends in end-of-text, so the model learns where a prompt stops
    rows = [tokenizer(text, add_special_tokens=False).input_ids + [eot] for text in TINY_CORPUS]
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [eot] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = input_ids.masked_fill(mask == 0, -100)

    with seeded_rng(seed, torch.device("cpu")):
        model = GPT2LMHeadModel(config)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.0)
        for _ in range(train_steps):
            # the loss by hand: next-token cross-entropy, padding ignored
            logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder
