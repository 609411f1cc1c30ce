"""Storyboards (seed 004 §5.6): the shot list, shot types with prompt templates and LoRAs, a board-wide style and
settings, the cast (characters drawn the same in every shot through IP-Adapter reference pictures), kept as
`storyboards/<name>/project.json` with references and frames beside it; CSV import, presets, picking and seed
locking. Frames are made by runner.py, exported by export.py."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from studio.config import ROOT, Limits, number_from_text, real_number, text, whole_number
from studio.control.controlnet import DEFAULT_CONTROLNET, ControlSettings
from studio.control.preprocess import check_thresholds, read_reference
from studio.files.atomic import atomic_path, write_text
from studio.files.names import check_name, safe_child
from studio.generation import hires
from studio.generation.job import MAX_SEED, GenerateJob
from studio.generation.presets import scan_presets
from studio.generation.prompt_syntax import check_prompt_limits

ProgressFn = Callable[[int, int, str], None]


PROJECT_FILE = "project.json"


FORMAT = "studio-storyboard"


VERSION = 1


DEFAULT_TEMPLATE = "a high-quality [shot type] picture of [description]"  # seed 004, table 5.2


SHOT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,15}$")  # 1, 2, 12A, 3.1


BOARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$")


# candidates per shot and shots per board are bounded by Limits (max_storyboard_candidates, max_storyboard_shots)


PER_PASS = 8  # candidates denoised together (memory); lower on small GPUs


CSV_REQUIRED = ("shot", "type", "description")


CSV_COLUMNS = ("shot", "type", "description", "notes", "reference", "seed", "candidates", "canny_low", "canny_high",
               "control_scale", "control_start", "control_end", "cast")


MAX_CAST = 8  # characters per board


MAX_CHARACTER_PICTURES = 8  # reference pictures per character (ip_adapter.MAX_IMAGES: one IP-Adapter unit's)


CHARACTER_NAME = re.compile(r"[^\W_](?:[\w' .-]{0,38}[^\W_])?")  # Sarah, Old Tom, O'Brien, Jean-Luc


NOBODY = "-"  # a shot's cast cell that says: no character in this shot (whatever its text names)


def _from_dict(cls, values: dict, what: str):
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {what} field(s) {unknown}; known: {sorted(names)}")
    return cls(**values)


@dataclass
class ShotType:
    """A kind of shot: its prompt template and the LoRA that teaches it (seed 004's shot-type LoRAs)."""

    name: str  # "close shot"; what [shot type] becomes in the template
    template: str = DEFAULT_TEMPLATE  # [shot type], [description] and [notes] are filled in
    lora: str = ""  # a LoRA in loras/ ("" = none)
    lora_weight: float = 1.0

    def validate(self, limits: Limits | None = None) -> None:
        limits = limits or Limits.from_env()
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("a shot type needs a name (e.g. 'close shot')")
        where = f"shot type {self.name[:40]!r}"
        limits.check("max_prompt_chars", len(self.name), f"{where}: the name is {len(self.name):,} characters")
        template = text(f"{where}: the template", self.template)
        limits.check("max_prompt_chars", len(template), f"{where}: the template is {len(template):,} characters")
        if "[description]" not in template:
            raise ValueError(f"{where}: the template must contain [description], got {template!r}")
        if text(f"{where}: the LoRA name", self.lora) and not re.fullmatch(r"[^<>:]+", self.lora):
            raise ValueError(f"{where}: LoRA name {self.lora!r} may not contain '<', '>' or ':'")
        real_number(f"{where}: LoRA weight", self.lora_weight, -10, 10)


def default_shot_types() -> list[ShotType]:
    return [ShotType("close shot"), ShotType("medium shot"), ShotType("long shot")]


@dataclass
class Style:
    """A style for the whole board: an embedding (its name in every prompt) or a LoRA (a tag in every prompt)."""

    kind: str = "none"  # "none", "embedding" or "lora"
    name: str = ""
    weight: float = 1.0

    def validate(self) -> None:
        if self.kind not in ("none", "embedding", "lora"):
            raise ValueError(f"style kind must be none, embedding or lora, got {self.kind!r}")
        if self.kind != "none" and not text("style name", self.name).strip():
            raise ValueError(f"a {self.kind} style needs the {self.kind}'s name")
        if self.kind != "none" and not re.fullmatch(r"[^<>:()\[\]]+", self.name):
            raise ValueError(f"style name {self.name!r} may not contain < > : ( ) [ ]")
        real_number("style weight", self.weight, -10, 10)

    def prompt_part(self) -> str:
        if self.kind == "embedding":
            return self.name if self.weight == 1 else f"({self.name}:{self.weight:g})"
        if self.kind == "lora":
            return f"<lora:{self.name}:{self.weight:g}>"
        return ""


FRAME_ACTIONS = ("generate", "img2img", "inpaint", "outpaint")


@dataclass
class Frame:
    """One candidate of a shot: its seed and PNG (relative to the project folder), and where it came from: made
    from the prompt ("generate") or from another candidate (`source`, its file) by image to image, inpainting or
    outpainting (Refine frame, Outpaint to the board's aspect)."""

    seed: int
    file: str
    controlnet: bool = False  # made through the ControlNet (the shot had a reference)
    action: str = "generate"  # one of FRAME_ACTIONS
    source: str = ""  # the candidate's file it was made from ("" for "generate")


@dataclass
class Refinement:
    """One entry of a shot's history: a candidate made from another one (which file, from which, with which mask,
    and the new frame's infotext). Kept when the shot is generated again (its files then go with the folder)."""

    action: str  # "img2img", "inpaint" or "outpaint"
    source: str  # the candidate's file it was made from
    file: str  # the new candidate's file
    seed: int
    infotext: str
    mask: str = ""  # the mask used (a file beside the frames), "" for none


@dataclass
class Character:
    """A member of the board's cast: a shot whose description or notes name them (find_characters) gets their
    reference pictures as an IP-Adapter image prompt and their prompt words added to its prompt."""

    name: str  # as the shots name them: "Sarah", "Old Tom"
    pictures: list[str] = field(default_factory=list)  # files under the project folder (references/cast/...)
    ip_adapter: str = ""  # a file in ipadapter/ (without its extension); "" = the only one there
    scale: float = 0.6  # how strongly the pictures steer (IP-Adapter scale, 0-2)
    prompt: str = ""  # words added to the prompt of each shot they are in: "red coat, short grey hair"

    def validate(self, limits: Limits | None = None) -> None:
        limits = limits or Limits.from_env()
        if not isinstance(self.name, str) or not CHARACTER_NAME.fullmatch(self.name):
            shown = self.name if not isinstance(self.name, str) or len(self.name) <= 60 else self.name[:57] + "..."
            raise ValueError(f"a character's name must be 1-40 letters, digits, spaces, ', - or . starting and "
                             f"ending with a letter or digit (as the shots name them, e.g. Sarah), got {shown!r}")
        where = f"character {self.name!r}"
        try:
            if not isinstance(self.pictures, list) or not all(isinstance(p, str) and p for p in self.pictures):
                raise ValueError(f"pictures must be a list of files in the project, got {self.pictures!r}")
            if len(self.pictures) > MAX_CHARACTER_PICTURES:
                raise ValueError(f"at most {MAX_CHARACTER_PICTURES} reference pictures, got {len(self.pictures)}")
            name = text("the IP-Adapter", self.ip_adapter).strip()
            if name and (name.startswith(("/", "\\")) or ":" in name or ".." in re.split(r"[/\\]", name)):
                raise ValueError(f"the IP-Adapter must be a file name in ipadapter/, got {self.ip_adapter!r}")
            self.scale = real_number("scale", self.scale, 0, 2)
            length = len(text("the prompt words", self.prompt))
            limits.check("max_prompt_chars", length, f"the prompt words are {length:,} characters")
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def _name_pattern(name: str) -> re.Pattern:
    body = r"\s+".join(re.escape(word) for word in name.replace("\u2019", "'").split())
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


def find_characters(names: Iterable[str], *texts: str) -> list[str]:
    """The names (as given) that `texts` mention, in the order of their first mention (the texts read in order:
    a shot's notes, then its description). A name counts as a whole word in any case: "sarah", "Sarah's" and
    "Sarah-Jane" name Sarah, "Sarahs" and "Sarahville" do not; the words of a longer name may be split by any
    space. Where names overlap ("Sarah" and "Sarah Jane"), the longer one takes the words it covers."""
    joined = "\n".join(t for t in texts if t).replace("\u2019", "'")
    taken: list[tuple[int, int]] = []
    first: dict[str, int] = {}
    for name in sorted(dict.fromkeys(names), key=len, reverse=True):
        for match in _name_pattern(name).finditer(joined):
            if any(match.start() < end and start < match.end() for start, end in taken):
                continue
            taken.append(match.span())
            first.setdefault(name, match.start())
    return sorted(first, key=first.__getitem__)


def cast_cell(cast: list[str] | None) -> str:
    """A shot's cast as a table or CSV cell: "" (found in its text), "-" (nobody) or "Sarah, Callum"."""
    if cast is None:
        return ""
    return ", ".join(cast) if cast else NOBODY


def cast_from_cell(value: str) -> list[str] | None:
    """cast_cell read back: "" -> None, "-" -> [], "Sarah, Callum" (or ;) -> the names."""
    raw = text("cast", value).strip()
    if not raw:
        return None
    if raw == NOBODY:
        return []
    return [name.strip() for name in re.split(r"[,;]", raw) if name.strip()]


@dataclass
class Shot:
    shot: str  # the shot's number as the script writes it: 1, 2, 12A
    type: str  # a ShotType name
    description: str
    notes: str = ""  # characters, action, dialogue: in the caption; in the prompt only where a template has [notes]
    reference: str = ""  # picture or sketch under the project folder (references/...); "" = no ControlNet
    seed: int = -1  # -1: new random seeds at each generation; else locked: the first candidate's seed
    candidates: int = 0  # candidates to make; 0 = the board's default
    canny_low: int = 100
    canny_high: int = 200
    control_scale: float = 1.0
    control_start: float = 0.0
    control_end: float = 1.0
    frames: list[Frame] = field(default_factory=list)  # the last generation's candidates and those made from them
    picked: int = 0  # index into frames
    history: list[Refinement] = field(default_factory=list)  # refinements and outpaintings, oldest first
    # the characters in it: None = the cast's names found in its notes and description; [] = nobody; else these
    cast: list[str] | None = None

    def control(self) -> ControlSettings:
        return ControlSettings(self.control_scale, self.control_start, self.control_end)

    def validate(self, limits: Limits | None = None) -> None:
        limits = limits or Limits.from_env()
        if not isinstance(self.shot, str) or not SHOT_ID.fullmatch(self.shot):
            raise ValueError(f"shot number must be 1-16 letters, digits, '.', '-' or '_' (e.g. 12A), got "
                             f"{self.shot!r}")
        where = f"shot {self.shot}"
        if not text(f"{where}: the description", self.description).strip():
            raise ValueError(f"{where}: the description is empty")
        text(f"{where}: the shot type", self.type)
        for name in ("description", "notes"):
            length = len(text(f"{where}: the {name}", getattr(self, name)))
            limits.check("max_prompt_chars", length, f"{where}: the {name} is {length:,} characters")
        text(f"{where}: the reference", self.reference)
        self.seed = whole_number(f"{where}: seed", self.seed, -1, MAX_SEED)
        self.candidates = whole_number(f"{where}: candidates", self.candidates)
        if self.candidates < 0:
            raise ValueError(f"{where}: candidates must be 0 (the board's default) or more, got {self.candidates}")
        limits.check("max_storyboard_candidates", self.candidates, f"{where} asks for {self.candidates:,} candidates")
        try:
            low = whole_number("canny low threshold", self.canny_low)
            high = whole_number("canny high threshold", self.canny_high)
            self.canny_low, self.canny_high = check_thresholds(low, high)
            real_number("ControlNet conditioning scale", self.control_scale, 0, 2)
            real_number("ControlNet guidance start", self.control_start, 0, 1)
            real_number("ControlNet guidance end", self.control_end, 0, 1)
            self.control().validate()
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        self.picked = whole_number(f"{where}: picked candidate", self.picked)
        if self.frames and not 0 <= self.picked < len(self.frames):
            raise ValueError(f"{where}: picked candidate {self.picked} does not exist (it has {len(self.frames)})")
        for frame in self.frames:
            if frame.action not in FRAME_ACTIONS:
                raise ValueError(f"{where}: frame {frame.file!r}: action must be one of {', '.join(FRAME_ACTIONS)}, "
                                 f"got {frame.action!r}")
        for entry in self.history:
            if entry.action not in FRAME_ACTIONS[1:]:
                raise ValueError(f"{where}: history entry {entry.file!r}: action must be one of "
                                 f"{', '.join(FRAME_ACTIONS[1:])}, got {entry.action!r}")
        if self.cast is not None and (not isinstance(self.cast, list)
                                      or not all(isinstance(n, str) and n.strip() for n in self.cast)):
            raise ValueError(f"{where}: cast must be a list of character names (or null: found in its text), got "
                             f"{self.cast!r}")

    @property
    def picked_frame(self) -> Frame | None:
        return self.frames[self.picked] if self.frames and 0 <= self.picked < len(self.frames) else None


@dataclass
class BoardSettings:
    """What every frame shares: Generate's settings (the prompt comes from each shot), the default number of
    candidates and the ControlNet for shots with a reference."""

    negative_prompt: str = ""
    sampler: str = "DPM++ 2M"
    schedule: str = "Karras"
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    clip_skip: int = 1
    candidates: int = 4
    # a name in controlnet/, micro-canny (built in), a hub id (or a path, from the command line); new boards start with
    # the loaded model's default (studio.control.controlnet.default_controlnet: micro-canny for micro)
    controlnet: str = DEFAULT_CONTROLNET
    # the board's aspect for "Outpaint to the board's aspect": "" = width:height, else "16:9", "2.39:1" or 1.85
    aspect: str = ""
    # hires fix of generated frames (export quality): a second pass at hires_scale x the size, from the first
    # upscaled by hires_upscaler (a latent upscaler, Lanczos, Nearest or a file in upscalers/), redrawn at
    # hires_denoising with hires_steps (0: steps)
    hires_fix: bool = False
    hires_scale: float = 2.0
    hires_upscaler: str = hires.DEFAULT_UPSCALER
    hires_steps: int = 0
    hires_denoising: float = 0.7

    def job(self, prompt: str, seed: int, hires_fix: bool = True) -> GenerateJob:
        """Generate's job for a frame; with `hires_fix` False the board's hires fix is left out (image to image and
        inpainting of a frame run at the frame's own size)."""
        return GenerateJob(prompt=prompt, negative_prompt=self.negative_prompt, sampler=self.sampler,
                           schedule=self.schedule, steps=self.steps, cfg_scale=self.cfg_scale, seed=seed,
                           width=self.width, height=self.height, batch_size=1, batch_count=1,
                           clip_skip=self.clip_skip, hires_fix=self.hires_fix and hires_fix,
                           hires_scale=self.hires_scale, hires_upscaler=self.hires_upscaler,
                           hires_steps=self.hires_steps, hires_denoising=self.hires_denoising)

    def aspect_ratio(self) -> float:
        """The board's aspect (width / height): `aspect` read as W:H or a number, else width / height."""
        return parse_aspect(self.aspect) if self.aspect.strip() else self.width / self.height

    def validate(self, limits: Limits | None = None) -> None:
        limits = limits or Limits.from_env()
        self.candidates = whole_number("candidates per shot", self.candidates, 1)
        limits.check("max_storyboard_candidates", self.candidates,
                     f"{self.candidates:,} candidates per shot were asked for")
        text("ControlNet", self.controlnet)
        if text("aspect", self.aspect).strip():
            parse_aspect(self.aspect)
        if not isinstance(self.hires_fix, bool):
            raise ValueError(f"hires fix must be true or false, got {self.hires_fix!r}")
        # Generate's own checks (steps, size, sampler, CFG, clip skip, the negative prompt); the job validated is a
        # copy, so the settings take its whole numbers (20.0 is 20)
        # the hires values are checked with the fix off too (they are kept in the file); with it on, by the job
        real_number("hires scale", self.hires_scale, 1, 4)
        self.hires_steps = whole_number("hires steps", self.hires_steps, 0, 150)
        real_number("hires denoising strength", self.hires_denoising, 0, 1)
        if not text("hires upscaler", self.hires_upscaler).strip():
            raise ValueError("hires upscaler is empty; e.g. Latent or Lanczos")
        job = self.job("", 0)
        job.validate(limits)
        self.steps, self.width, self.height, self.clip_skip = job.steps, job.width, job.height, job.clip_skip


@dataclass
class Storyboard:
    name: str
    shots: list[Shot] = field(default_factory=list)
    shot_types: list[ShotType] = field(default_factory=default_shot_types)
    style: Style = field(default_factory=Style)
    settings: BoardSettings = field(default_factory=BoardSettings)
    model: str = ""  # the model its frames were last made with (information)
    cast: list[Character] = field(default_factory=list)  # characters who look the same in every shot

    # 1. checks

    def validate(self, limits: Limits | None = None) -> None:
        """Raise ValueError naming the bad value; `limits` (default: Limits.from_env()) bounds the shots, their
        candidates and their prompts."""
        limits = limits or Limits.from_env()
        check_board_name(self.name)
        self.settings.validate(limits)
        self.style.validate()
        if not self.shot_types:
            raise ValueError("a storyboard needs at least one shot type")
        names = set()
        for st in self.shot_types:
            st.validate(limits)
            if st.name.lower() in names:
                raise ValueError(f"two shot types are called {st.name!r}")
            names.add(st.name.lower())
        if not isinstance(self.cast, list):
            raise ValueError(f"the cast must be a list of characters, got {type(self.cast).__name__}")
        if len(self.cast) > MAX_CAST:
            raise ValueError(f"the cast has {len(self.cast)} characters; at most {MAX_CAST}")
        known = {}
        for character in self.cast:
            character.validate(limits)
            if character.name.lower() in known:
                raise ValueError(f"character {character.name!r}: two characters are called "
                                 f"{known[character.name.lower()]!r} (names are matched in any case)")
            known[character.name.lower()] = character.name
        limits.check("max_storyboard_shots", len(self.shots), f"the storyboard has {len(self.shots):,} shots")
        seen = set()
        for shot in self.shots:
            shot.validate(limits)
            if shot.shot in seen:
                raise ValueError(f"shot number {shot.shot!r} appears twice")
            seen.add(shot.shot)
            self.shot_cast(shot)  # a name in its cast column that is not in the cast
            # each piece is within the character limit, so the filled-in template stays small enough to check
            check_prompt_limits(self.prompt(shot), f"shot {shot.shot}'s prompt", limits)

    def shot_type(self, name: str, shot: str = "") -> ShotType:
        """The shot type called `name` (any case); an unknown one lists the known ones."""
        for st in self.shot_types:
            if st.name.lower() == (name or "").strip().lower():
                return st
        where = f"shot {shot}: " if shot else ""
        raise ValueError(f"{where}unknown shot type {name!r}; known: {', '.join(s.name for s in self.shot_types)} "
                         "(add it under Shot types)")

    def shot(self, number: str) -> Shot:
        for shot in self.shots:
            if shot.shot == str(number):
                return shot
        raise ValueError(f"no shot {number!r} in storyboard {self.name!r}; shots: "
                         f"{', '.join(s.shot for s in self.shots) or 'none'}")

    def character(self, name: str, shot: str = "") -> Character:
        """The cast member called `name` (any case); an unknown one lists the cast."""
        for character in self.cast:
            if character.name.lower() == (name or "").strip().lower():
                return character
        where = f"shot {shot}: " if shot else ""
        raise ValueError(f"{where}character {name!r} is not in the cast (cast: "
                         f"{', '.join(c.name for c in self.cast) or 'none'}; add them under Cast)")

    def shot_cast(self, shot: Shot) -> list[Character]:
        """The characters in `shot`: its `cast` when set, else those its notes and description name (find_characters),
        in the order they are named."""
        if shot.cast is not None:
            return list({id(c): c for c in (self.character(n, shot.shot) for n in shot.cast)}.values())
        by_name = {c.name: c for c in self.cast}
        return [by_name[n] for n in find_characters(by_name, shot.notes, shot.description)]

    def remove_character(self, name: str) -> Character:
        """Take `name` out of the cast and out of the shots' cast lists (its picture files stay on disk)."""
        character = self.character(name)
        self.cast.remove(character)
        for shot in self.shots:
            if shot.cast is not None:
                shot.cast = [n for n in shot.cast if n.strip().lower() != character.name.lower()]
        return character

    # 2. prompts

    def prompt(self, shot: Shot, characters: list[Character] | None = None) -> str:
        """The shot's studio prompt: its type's template filled in, the prompt words of its characters (`characters`,
        default: shot_cast), plus the type's LoRA and the board's style. A shot without characters gets the prompt
        it had before the board had a cast."""
        st = self.shot_type(shot.type, shot.shot)
        filled = (st.template.replace("[shot type]", st.name).replace("[description]", shot.description.strip())
                  .replace("[notes]", shot.notes.strip()))
        parts = [filled.strip()]
        cast = self.shot_cast(shot) if characters is None else characters
        words = [c.prompt.strip() for c in cast if c.prompt.strip()]
        if words:
            parts[0] = ", ".join([parts[0], *words])
        style = self.style.prompt_part()
        if style and self.style.kind == "embedding":
            parts[0] = f"{parts[0]}, {style}"
        if st.lora:
            parts.append(f"<lora:{st.lora}:{st.lora_weight:g}>")
        if style and self.style.kind == "lora":
            parts.append(style)
        return " ".join(parts)

    def candidates_of(self, shot: Shot) -> int:
        return shot.candidates or self.settings.candidates

    # 3. files

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> Storyboard:
        data = dict(data)
        if data.pop("format", FORMAT) != FORMAT:
            raise ValueError("not a studio storyboard (format is not 'studio-storyboard')")
        version = data.pop("version", VERSION)
        if version != VERSION:
            raise ValueError(f"storyboard format version {version} is not supported (this studio reads {VERSION})")
        try:
            shots = []
            for s in data.pop("shots", []):
                s = dict(s)
                frames = [_from_dict(Frame, f, "frame") for f in s.pop("frames", [])]
                history = [_from_dict(Refinement, h, "history entry") for h in s.pop("history", [])]
                shots.append(_from_dict(Shot, {**s, "frames": frames, "history": history}, "shot"))
            types = [_from_dict(ShotType, t, "shot type") for t in data.pop("shot_types", [])] or default_shot_types()
            style = _from_dict(Style, data.pop("style", {}), "style")
            settings = _from_dict(BoardSettings, data.pop("settings", {}), "settings")
            cast = data.pop("cast", None) or []  # a board written before the cast existed has none
            if not isinstance(cast, list) or not all(isinstance(c, dict) for c in cast):
                raise ValueError(f"the cast must be a list of characters, got {cast!r}")
            cast = [_from_dict(Character, c, "character") for c in cast]
            return _from_dict(cls, {**data, "shots": shots, "shot_types": types, "style": style,
                                    "settings": settings, "cast": cast}, "storyboard")
        except TypeError as e:
            raise ValueError(f"storyboard is not valid: {e}") from None


def parse_aspect(value: str) -> float:
    """"16:9" -> 1.777..., "2.39:1" -> 2.39, "1.85" -> 1.85; between 1:4 and 4:1, else ValueError."""
    raw = text("aspect", value).strip()
    try:
        w, sep, h = raw.partition(":")
        ratio = float(w) / float(h) if sep else float(raw)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"aspect must be like 16:9, 2.39:1 or 1.85 (width:height), got {value!r}") from None
    if not 0.25 <= ratio <= 4:
        raise ValueError(f"aspect must be between 1:4 and 4:1, got {value!r}")
    return ratio


def check_board_name(name: str) -> str:
    """`name` if it can be a storyboard folder (BOARD_NAME and files.names.check_name); else ValueError."""
    if not isinstance(name, str) or not BOARD_NAME.fullmatch(name.strip()) or name != name.strip():
        shown = name if not isinstance(name, str) or len(name) <= 60 else name[:57] + "..."
        raise ValueError(f"storyboard name must be 1-64 letters, digits, spaces, '.', '-' or '_' and start with a "
                         f"letter or digit, got {shown!r}")
    return check_name(name, "storyboard")  # Windows device names (CON, aux, lpt1), a trailing dot


def _usable(name: str) -> bool:
    try:
        check_board_name(name)
        return True
    except ValueError:
        return False


SHIPPED_PRESETS = ROOT / "presets" / "storyboard"


@dataclass(frozen=True)
class BoardPreset:
    name: str
    description: str
    shot_types: list[ShotType]
    settings: dict  # BoardSettings fields it sets
    path: Path


def load_board_preset(path: Path) -> BoardPreset:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        types = [_from_dict(ShotType, dict(t), "shot type") for t in data.get("shot_types", [])]
        settings = dict(data.get("settings", {}))
        for st in types:
            st.validate()
        values = asdict(BoardSettings())
        values.update(settings)
        _from_dict(BoardSettings, values, "storyboard preset setting").validate()
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"storyboard preset {Path(path).name} is not valid: {e}") from None
    if not types and not settings:
        raise ValueError(f"storyboard preset {Path(path).name} sets neither shot types nor settings")
    return BoardPreset(str(data.get("name") or Path(path).stem), str(data.get("description", "")), types, settings,
                       Path(path))


def list_board_presets(presets_dir: Path | None = None) -> dict[str, BoardPreset]:
    """Name -> preset from the shipped presets/storyboard/ and the user's; a broken file is skipped."""
    folders = [SHIPPED_PRESETS]
    if presets_dir is not None and (Path(presets_dir) / "storyboard").resolve() != SHIPPED_PRESETS.resolve():
        folders.append(Path(presets_dir) / "storyboard")
    return scan_presets(folders, load_board_preset)


def apply_board_preset(board: Storyboard, preset: BoardPreset) -> None:
    """The preset's shot types replace the board's (a type the shots still use is kept) and its settings are set."""
    if preset.shot_types:
        names = {t.name.lower() for t in preset.shot_types}
        kept = [t for t in board.shot_types if t.name.lower() not in names
                and any(s.type.strip().lower() == t.name.lower() for s in board.shots)]
        board.shot_types = [ShotType(**asdict(t)) for t in preset.shot_types] + kept
    for key, value in preset.settings.items():
        setattr(board.settings, key, value)


def shots_from_csv(content: str, source: str = "CSV", limits: Limits | None = None) -> list[Shot]:
    """Shots from CSV text with columns shot,type,description[,notes,reference,seed,candidates,canny_low,canny_high,
    control_scale,control_start,control_end,cast] (header row required, any order; cast: "" = the characters its
    text names, "-" = nobody, else "Sarah, Callum"). Errors name the row and value."""
    limits = limits or Limits.from_env()
    reader = csv.DictReader(io.StringIO(content.lstrip("\ufeff")))
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    missing = [c for c in CSV_REQUIRED if c not in header]
    if missing:
        raise ValueError(f"{source}: the header must have the columns {', '.join(CSV_REQUIRED)} (missing "
                         f"{', '.join(missing)}); got {', '.join(header) or 'no header'}")
    unknown = [h for h in header if h not in CSV_COLUMNS]
    if unknown:
        raise ValueError(f"{source}: unknown column(s) {', '.join(unknown)}; known: {', '.join(CSV_COLUMNS)}")
    reader.fieldnames = header
    shots = []
    for row_number, row in enumerate(reader, start=2):
        if None in row:
            raise ValueError(f"{source} line {row_number}: more values than columns")
        values = {k: (v or "").strip() for k, v in row.items()}
        if not any(values.values()):
            continue  # an empty line
        shot = Shot(shot=values["shot"], type=values["type"], description=values["description"],
                    notes=values.get("notes", ""), reference=values.get("reference", ""),
                    cast=cast_from_cell(values.get("cast", "")))
        try:
            for name, default in (("seed", -1), ("candidates", 0), ("canny_low", 100), ("canny_high", 200),
                                  ("control_scale", 1.0), ("control_start", 0.0), ("control_end", 1.0)):
                raw = values.get(name, "")
                if raw == "":
                    continue
                setattr(shot, name, number_from_text(name, raw, whole=isinstance(default, int)))
            shot.validate(limits)
        except ValueError as e:
            raise ValueError(f"{source} line {row_number}: {e}") from None
        shots.append(shot)
    if not shots:
        raise ValueError(f"{source}: no shots (the file has a header but no rows)")
    return shots


def shots_to_csv(shots: list[Shot]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for shot in shots:
        writer.writerow({c: cast_cell(shot.cast) if c == "cast" else getattr(shot, c) for c in CSV_COLUMNS})
    return out.getvalue()


class StoryboardExistsError(ValueError):
    """Creating a storyboard would replace an earlier one of the same name, and the caller did not ask to replace
    it."""


class StoryboardStore:
    """storyboards/<name>/: project.json, references/, shots/<shot>/ (candidates), export/."""

    def __init__(self, folder: Path, limits: Limits | None = None):
        self.folder = Path(folder)
        self.limits = limits  # None: Limits.from_env()

    def names(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted(p.name for p in self.folder.iterdir() if (p / PROJECT_FILE).is_file() and _usable(p.name))

    def path(self, name: str) -> Path:
        check_board_name(name)
        return safe_child(self.folder, name)

    def exists(self, name: str) -> bool:
        return (self.path(name) / PROJECT_FILE).is_file()

    def load(self, name: str) -> Storyboard:
        file = self.path(name) / PROJECT_FILE
        if not file.is_file():
            raise ValueError(f"no storyboard {name!r} in {self.folder}; there are: {', '.join(self.names()) or 'none'}")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{file} is not readable JSON: {e}") from e
        board = Storyboard.from_dict(data)
        if board.name != name:
            board.name = name  # the folder was renamed: the folder's name wins
        return board

    def create(self, board: Storyboard, replace: bool = False) -> Path:
        """Save `board` as a new project; a storyboard of that name (any case) raises StoryboardExistsError unless
        `replace`, which writes the new shot list and settings over the old project (its pictures stay on disk,
        unreferenced). `save` is for the open board, whose name is its own."""
        self.check_new(board.name, replace)
        return self.save(board)

    def check_new(self, name: str, replace: bool = False) -> None:
        """Raise StoryboardExistsError when a storyboard called `name` (any case) exists and `replace` is not
        set (before any work: the command line checks this before it loads a model)."""
        check_board_name(name)
        if replace:
            return
        clash = [n for n in self.names() if n.lower() == name.lower()]
        if clash or self.exists(name):
            raise StoryboardExistsError(f"a storyboard named {(clash or [name])[0]!r} already exists in "
                                        f"{self.folder.name}/; choose another name, or ask to replace it")

    def save(self, board: Storyboard) -> Path:
        board.validate(self.limits)
        folder = self.path(board.name)
        for shot in board.shots:
            if shot.reference:
                self.reference_path(board, shot)  # a reference must be a file inside the project
        for character in board.cast:
            self.character_pictures(board, character)  # and so must a character's pictures
        write_text(folder / PROJECT_FILE, json.dumps(board.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return folder / PROJECT_FILE

    def reference_path(self, board: Storyboard, shot: Shot) -> Path:
        path = safe_child(self.path(board.name), shot.reference)
        if not path.is_file():
            raise ValueError(f"shot {shot.shot}: reference {shot.reference!r} is not in the project folder")
        return path

    def character_pictures(self, board: Storyboard, character: Character) -> list[Path]:
        """The character's reference pictures, each a file inside the project (else ValueError naming them)."""
        out = []
        for rel in character.pictures:
            try:
                path = safe_child(self.path(board.name), rel)
            except ValueError as e:
                raise ValueError(f"character {character.name!r}: picture {rel!r}: {e}") from None
            if not path.is_file():
                raise ValueError(f"character {character.name!r}: picture {rel!r} is not in the project folder")
            out.append(path)
        return out

    @staticmethod
    def _stem(source: Path, default: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(source).stem)[:40] or default

    def _copy_picture(self, board: Storyboard, picture, rel: str) -> None:
        """A checked picture (read_reference's) written into the project as an RGB PNG at `rel`."""
        with atomic_path(self.path(board.name) / rel) as tmp:
            picture.image.save(tmp, format="PNG")

    def add_reference(self, board: Storyboard, shot: Shot, source: Path) -> list[str]:
        """Copy a picture into references/ as an RGB PNG and point the shot at it. Returns what was converted
        (CMYK, palette, alpha); a file that is not a usable image raises ValueError naming it."""
        ref = read_reference(Path(source))
        rel = f"references/{shot.shot}-{self._stem(source, 'ref')}.png"
        self._copy_picture(board, ref, rel)
        shot.reference = rel
        return [f"shot {shot.shot} reference {Path(source).name}: {note}" for note in ref.notes]

    def add_character_pictures(self, board: Storyboard, character: Character, sources: list[Path]) -> list[str]:
        """Copy pictures into references/cast/ as RGB PNGs (as add_reference copies a shot's) and add them to the
        character's. Every picture is checked (its header before decoding) before any is copied; more than
        MAX_CHARACTER_PICTURES in all raises ValueError naming the character. Returns what was converted."""
        sources = [Path(s) for s in sources]
        total = len(character.pictures) + len(sources)
        if total > MAX_CHARACTER_PICTURES:
            raise ValueError(f"character {character.name!r}: at most {MAX_CHARACTER_PICTURES} reference pictures, "
                             f"got {total} ({len(character.pictures)} kept + {len(sources)} new)")
        refs = []
        for source in sources:
            try:
                refs.append(read_reference(source))
            except ValueError as e:
                raise ValueError(f"character {character.name!r}: {e}") from None
        project = self.path(board.name)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", character.name).strip("-.")[:40] or "character"
        notes = []
        for source, ref in zip(sources, refs, strict=True):
            stem = f"references/cast/{slug}-{self._stem(source, 'picture')}"
            rel = next(f"{stem}{'' if n == 1 else f'-{n}'}.png" for n in range(1, 10_000)
                       if not (project / f"{stem}{'' if n == 1 else f'-{n}'}.png").exists())
            self._copy_picture(board, ref, rel)
            character.pictures.append(rel)
            notes += [f"character {character.name} picture {source.name}: {note}" for note in ref.notes]
        return notes

    def import_csv(self, board: Storyboard, csv_path: Path, confine: bool = True,
                   reference_dir: Path | None = None) -> list[str]:
        """Replace the board's shots with a CSV's; references are read relative to `reference_dir` (default: the
        CSV's folder) and copied into the project. With `confine`, a reference must stay inside that folder
        (uploads, the UI)."""
        csv_path = Path(csv_path)
        base = Path(reference_dir) if reference_dir is not None else csv_path.parent
        try:
            text = csv_path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise ValueError(f"{csv_path.name} is not UTF-8 text: {e}") from None
        shots = shots_from_csv(text, csv_path.name, self.limits)
        notes = []
        project = self.path(board.name)
        for shot in shots:
            if not shot.reference:
                continue
            raw = shot.reference
            if confine:
                source = safe_child(base, raw)
            else:
                source = Path(raw).expanduser()
                source = source if source.is_absolute() else base / source
            if source.resolve().is_relative_to(project.resolve()) and source.is_file():
                shot.reference = source.resolve().relative_to(project.resolve()).as_posix()  # already in the project
                read_reference(source)  # still a usable image?
                continue
            if not source.is_file():
                raise ValueError(f"{csv_path.name}: shot {shot.shot}: reference {raw!r} does not exist "
                                 f"(looked for {source})")
            notes += self.add_reference(board, shot, source)
        board.shots = shots
        for st in {s.type.lower(): s.type for s in shots}.values():
            try:
                board.shot_type(st)
            except ValueError:
                board.shot_types.append(ShotType(st))  # a new type: the default template until edited
                notes.append(f"new shot type {st!r} added with the template {DEFAULT_TEMPLATE!r}")
        return notes

    def export_csv(self, board: Storyboard) -> Path:
        path = self.path(board.name) / "shots.csv"
        write_text(path, shots_to_csv(board.shots))
        return path


def pick(board: Storyboard, shot_number: str, index: int) -> Frame:
    shot = board.shot(shot_number)
    if not shot.frames:
        raise ValueError(f"shot {shot.shot} has no candidates yet; generate it first")
    index = whole_number(f"shot {shot.shot}: candidate", index, 0, len(shot.frames) - 1)
    shot.picked = index
    return shot.frames[index]


def lock_seed(board: Storyboard, shot_number: str) -> int:
    """Lock the shot's seed to its picked candidate's: regenerating it then starts from that image."""
    shot = board.shot(shot_number)
    frame = shot.picked_frame
    if frame is None:
        raise ValueError(f"shot {shot.shot} has no candidates yet; generate it first or type a seed")
    shot.seed = frame.seed
    return frame.seed


def unlock_seed(board: Storyboard, shot_number: str) -> None:
    board.shot(shot_number).seed = -1


def new_board(name: str, settings: BoardSettings | None = None) -> Storyboard:
    return Storyboard(check_board_name(name), settings=settings or BoardSettings())
