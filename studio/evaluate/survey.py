"""Seed 004's blind A/B survey: pairs of images (baseline vs. fine-tuned, same prompt and seed) shown to each
respondent in a random order and a random A/B placement, three questions each (answers A, B or neither), answers
kept per respondent, and a report in percentages per question and per category.

On disk, `outputs/surveys/NAME/`: survey.json (the pairs), images/ (pixel-only copies under opaque names, so the
page never tells which side is which), answers/RESPONDENT.json (one per respondent, written from the first answer).

The server issues respondents (a random id; its token `ID.SECRET`, the only way back in) and draws their order and
placement; nothing under the survey folder is for the browser, the page gets pixels (`Survey.picture`)."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import random
import re
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from studio.files.atomic import atomic_dir, write_text

QUESTIONS = (
    ("like", "Which picture do you like most?"),
    ("style", "Which picture is closer to the shot type or style ({category})?"),
    ("prompt", "Which picture is closer to the prompt?"),
)
# the questions as the report names them (seed 004's table 5.5)
REPORT_LABELS = {"like": "Which picture do you like most?",
                 "style": "Which picture is closer to the associated shot type or style?",
                 "prompt": "Which picture is closer to the associated prompt?"}
ANSWERS = ("A", "B", "neither")
OUTCOMES = ("baseline", "candidate", "neither")
RESPONDENT_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")  # a file name under answers/ (older surveys: hex ids)
TOKEN_RE = re.compile(r"^([A-Za-z0-9_-]{16,64})\.([A-Za-z0-9_-]{32,128})$")  # ID.SECRET
# defaults of a survey's limits (survey.json's max_respondents / max_new_per_client_hour override them)
MAX_RESPONDENTS = 500
MAX_NEW_PER_CLIENT_HOUR = 20
PENDING_TTL_S = 3600  # an issued respondent without an answer is forgotten after this long
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()
# issued respondents without an answer yet (survey folder -> id -> (record, expiry)) and issue times per client
_pending: dict[str, dict[str, tuple[dict, float]]] = {}
_issued: dict[tuple[str, str], deque] = {}
_registry_guard = threading.Lock()
_clock = time.monotonic  # tests move time through this


def _lock(path: Path) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(str(path), threading.Lock())


# --- building ------------------------------------------------------------------------------------


@dataclass
class PairSource:
    baseline: Path
    candidate: Path
    prompt: str
    category: str
    seed: int | None = None


def _image_files(folder: Path) -> list[Path]:
    from studio.evaluate.folders import IMAGE_EXTS

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ValueError(f"folder {folder} does not exist")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


def _params(path: Path) -> tuple[str, int | None]:
    """(prompt without <lora:...> tags, seed) from an image's generation parameters."""
    from studio.generation.infotext import parse_infotext, read_image_infotext, to_fields
    from studio.generation.prompt_syntax import extract_network_tags

    text = read_image_infotext(path)
    if not text:
        return "", None
    fields = to_fields(parse_infotext(text))
    prompt, _ = extract_network_tags(fields.get("prompt", ""))
    return " ".join(prompt.split()), fields.get("seed")


def match_pairs(baseline_dir: Path, candidate_dir: Path, category: str = "") -> tuple[list[PairSource], list[str]]:
    """Pairs of a baseline and a candidate image: the same file name, else the same seed and prompt (without
    LoRA tags) in their generation parameters. Returns the pairs and the names left without a partner."""
    base, cand = _image_files(baseline_dir), _image_files(candidate_dir)
    by_name = {p.name: p for p in cand}
    pairs, unmatched, rest = [], [], []
    for b in base:
        if b.name in by_name:
            prompt, seed = _params(b)
            pairs.append(PairSource(b, by_name.pop(b.name), prompt, category, seed))
        else:
            rest.append(b)
    by_params = {}
    for c in by_name.values():
        prompt, seed = _params(c)
        if seed is not None:
            by_params.setdefault((prompt, seed), c)
    for b in rest:
        prompt, seed = _params(b)
        c = by_params.pop((prompt, seed), None) if seed is not None else None
        if c is None:
            unmatched.append(b.name)
        else:
            pairs.append(PairSource(b, c, prompt, category, seed))
    used = {p.candidate for p in pairs}
    unmatched += [c.name for c in cand if c not in used]
    return pairs, unmatched


def experiment_pairs(exp_dir: Path, baseline: str, candidate: str) -> list[PairSource]:
    """Pairs from an experiment's cells: for each style, the baseline method's image and the candidate method's
    image of the same prompt and seed; the category is the style and the prompt the content prompt."""
    exp_dir = Path(exp_dir)
    pairs = []
    for style_dir in sorted((exp_dir / "cells").glob("*")):
        base, cand = style_dir / baseline, style_dir / candidate
        result = _read_json(cand / "result.json") or _read_json(base / "result.json")
        if not (base / "images").is_dir() or not (cand / "images").is_dir() or result is None:
            continue
        texts = {f: row["text"] for row in result.get("per_prompt", []) for f in row.get("files", [])}
        for b in sorted((base / "images").glob("*.png")):
            c = cand / "images" / b.name
            if c.is_file():
                seed = int(b.stem.rsplit("-", 1)[-1]) if b.stem.rsplit("-", 1)[-1].isdigit() else None
                pairs.append(PairSource(b, c, texts.get(b.name) or _params(b)[0], result["style"], seed))
    if not pairs:
        raise ValueError(f"no pairs: {exp_dir} has no finished cells of both {baseline!r} and {candidate!r}")
    return pairs


class SurveyExistsError(ValueError):
    """Building a survey would replace an earlier one of the same name (and its answers), and the caller did not
    ask to replace it."""


def create_survey(surveys_dir: Path, name: str, pairs: list[PairSource], title: str = "",
                  per_respondent: int = 0, replace: bool = False, max_respondents: int | None = None,
                  max_new_per_client_hour: int | None = None) -> Path:
    """Write the survey folder (pixel-only image copies under opaque names). `per_respondent` > 0 shows each
    respondent a random subset of that many pairs (seed 004: 36); 0 shows every pair. A survey of the same name
    raises SurveyExistsError unless `replace` (which loses its answers)."""
    from studio.files.names import check_name

    check_name(name, "survey")
    if not pairs:
        raise ValueError("a survey needs at least one pair of images")
    if isinstance(per_respondent, bool) or not isinstance(per_respondent, int) or per_respondent < 0:
        raise ValueError(f"pairs per respondent must be 0 (all) or more, got {per_respondent!r}")
    max_respondents = MAX_RESPONDENTS if max_respondents is None else max_respondents
    max_new_per_client_hour = MAX_NEW_PER_CLIENT_HOUR if max_new_per_client_hour is None else max_new_per_client_hour
    for label, value in (("max respondents", max_respondents),
                         ("max new respondents per client per hour", max_new_per_client_hour)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a whole number of at least 1, got {value!r}")
    folder = Path(surveys_dir) / name
    if folder.exists() and not replace:
        raise SurveyExistsError(f"a survey named {name!r} already exists; choose another name, or ask to replace it "
                                "(its answers are lost)")
    entries = []
    with atomic_dir(folder) as tmp:
        (tmp / "images").mkdir()
        (tmp / "answers").mkdir()
        for n, p in enumerate(pairs, 1):
            pair_id = f"p{n:03d}"
            entry = {"id": pair_id, "prompt": p.prompt, "category": p.category, "seed": p.seed}
            for role, src in (("baseline", p.baseline), ("candidate", p.candidate)):
                dest = f"images/{secrets.token_hex(8)}.png"
                _pixels_only(src).save(tmp / dest, format="PNG")
                entry[role] = dest
                entry[f"{role}_source"] = str(src)
            entries.append(entry)
        survey = {"studio_survey": 1, "name": name, "title": title or name,
                  "created": dt.datetime.now().isoformat(timespec="seconds"),
                  "questions": [{"id": q, "text": t} for q, t in QUESTIONS], "answers": list(ANSWERS),
                  "per_respondent": per_respondent, "max_respondents": max_respondents,
                  "max_new_per_client_hour": max_new_per_client_hour, "pairs": entries}
        write_text(tmp / "survey.json", json.dumps(survey, indent=2, ensure_ascii=False) + "\n")
    return folder


def _pixels_only(path: Path):
    """The image's pixels as a new PIL image: no generation parameters, EXIF or other metadata (they would tell
    a LoRA image from the baseline)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)  # keeps what the EXIF orientation showed, then drops the EXIF
            mode = im.mode if im.mode in ("RGB", "RGBA", "L") else ("RGBA" if "transparency" in im.info
                                                                     or im.mode in ("LA", "PA") else "RGB")
            im = im.convert(mode)
            return Image.frombytes(mode, im.size, im.tobytes())
    except OSError as e:
        raise ValueError(f"cannot read the image {Path(path).name} ({e}); replace or remove it") from None


# --- answering ------------------------------------------------------------------------------------


class Survey:
    """One survey folder: its pairs, each respondent's order and answers, the report."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        data = _read_json(self.folder / "survey.json")
        if not data or "pairs" not in data:
            raise ValueError(f"survey {self.folder.name!r} cannot be read (its survey.json is missing or broken); "
                             "rebuild it")
        self.data = data
        self.pairs = {p["id"]: p for p in data["pairs"]}

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def title(self) -> str:
        return self.data.get("title") or self.name

    @property
    def max_respondents(self) -> int:
        return int(self.data.get("max_respondents") or MAX_RESPONDENTS)

    @property
    def max_new_per_client_hour(self) -> int:
        return int(self.data.get("max_new_per_client_hour") or MAX_NEW_PER_CLIENT_HOUR)

    def image(self, pair_id: str, side: str, respondent: dict) -> Path:
        """The file shown as `side` ("A" or "B") of a pair to this respondent (on the server; never a URL)."""
        role = respondent["placement"][pair_id] if side == "A" else _other(respondent["placement"][pair_id])
        return self.folder / self.pairs[pair_id][role]

    def picture(self, pair_id: str, side: str, respondent: dict):
        """The image shown as `side` as a PIL image with its pixels only, for the page to hand to gr.Image."""
        return _pixels_only(self.image(pair_id, side, respondent))

    def question_text(self, pair_id: str) -> list[tuple[str, str]]:
        category = self.pairs[pair_id].get("category") or "the style"
        return [(q, t.format(category=category)) for q, t in QUESTIONS]

    # respondents

    def _path(self, respondent_id: str) -> Path:
        if not isinstance(respondent_id, str) or not RESPONDENT_RE.match(respondent_id):
            raise ValueError("not a respondent id")
        return self.folder / "answers" / f"{respondent_id}.json"

    @property
    def _key(self) -> str:
        return str(self.folder.resolve())

    def start(self, token: str | None = None, client: str = "") -> tuple[dict, str]:
        """(record, token): the respondent `token` resumes, else a new one issued to `client` (its address) within
        the survey's limits. Nothing is written until the first answer."""
        found = self._find(token)
        if found is not None:
            return found, token
        return self._issue(client)

    def _issue(self, client: str) -> tuple[dict, str]:
        now, key, who = _clock(), self._key, client_key(client)
        with _registry_guard:
            pending = _pending.setdefault(key, {})
            for rid in [r for r, (_, expires) in pending.items() if expires <= now]:
                del pending[rid]
            taken = len(pending) + sum(1 for _ in (self.folder / "answers").glob("*.json"))
            if taken >= self.max_respondents:
                raise ValueError(f"this survey has all the respondents it takes ({self.max_respondents}); "
                                 "thank you for your interest")
            times = _issued.setdefault((key, who), deque())
            while times and times[0] <= now - 3600:
                times.popleft()
            if len(times) >= self.max_new_per_client_hour:
                raise ValueError(f"too many new respondents from your address in the last hour "
                                 f"({self.max_new_per_client_hour}); try again later, or continue in the browser "
                                 "where you started")
            rng = random.SystemRandom()
            rid = secrets.token_urlsafe(12)
            while rid in pending or self._path(rid).exists():
                rid = secrets.token_urlsafe(12)
            secret = secrets.token_urlsafe(32)
            order = list(self.pairs)
            rng.shuffle(order)
            if self.data.get("per_respondent"):
                order = order[: self.data["per_respondent"]]
            record = {"respondent": rid, "survey": self.name,
                      "started": dt.datetime.now().isoformat(timespec="seconds"), "order": order,
                      # which of the two is shown as A: "baseline" or "candidate"
                      "placement": {p: rng.choice(("baseline", "candidate")) for p in order}, "answers": {},
                      "token_sha256": _digest(secret)}
            pending[rid] = (record, now + PENDING_TTL_S)
            times.append(now)
        return json.loads(json.dumps(record)), f"{rid}.{secret}"

    def _find(self, token) -> dict | None:
        """The record this token opens (answered ones on disk, else issued ones in memory), or None."""
        m = TOKEN_RE.match(token) if isinstance(token, str) else None
        if m is None:
            return None
        rid, secret = m.groups()
        record = _read_json(self._path(rid))
        if record is None:
            with _registry_guard:
                held = _pending.get(self._key, {}).get(rid)
            record = json.loads(json.dumps(held[0])) if held and held[1] > _clock() else None
        stored = record.get("token_sha256") if isinstance(record, dict) else None
        if not isinstance(stored, str) or not hmac.compare_digest(stored, _digest(secret)):
            return None
        return record

    def respondent(self, respondent_id: str) -> dict | None:
        """A respondent's record on disk, by id (for the studio user; respondents resume only by token)."""
        try:
            return _read_json(self._path(respondent_id))
        except ValueError:
            return None

    def next_pair(self, record: dict) -> str | None:
        return next((p for p in record["order"] if p not in record["answers"]), None)

    def answer(self, token: str, pair_id: str, answers: dict[str, str]) -> dict:
        """Store one pair's three answers ("A", "B" or "neither") for the respondent `token` opens; the first answer
        writes the respondent's file. Returns the updated record."""
        missing = [q for q, _ in QUESTIONS if answers.get(q) not in ANSWERS]
        if missing:
            raise ValueError(f"answer every question with A, B or neither (missing: {', '.join(missing)})")
        m = TOKEN_RE.match(token) if isinstance(token, str) else None
        if m is None:
            raise ValueError("unknown respondent: reload the survey page to start")
        path = self._path(m.group(1))
        with _lock(path):
            record = self._find(token)
            if record is None:
                raise ValueError("unknown or expired respondent: reload the survey page to start")
            if pair_id not in record["order"]:
                raise ValueError(f"pair {pair_id!r} is not one of this respondent's pairs")
            a_role = record["placement"][pair_id]
            record["answers"][pair_id] = {
                **{q: answers[q] for q, _ in QUESTIONS},
                "a": a_role,  # what A was, so each answer reads back as baseline / candidate / neither
                "at": dt.datetime.now().isoformat(timespec="seconds")}
            record["updated"] = record["answers"][pair_id]["at"]
            write_text(path, json.dumps(record, indent=1, ensure_ascii=False) + "\n")
        with _registry_guard:
            _pending.get(self._key, {}).pop(record["respondent"], None)
        return record

    def records(self) -> list[dict]:
        out = []
        for path in sorted((self.folder / "answers").glob("*.json")):
            record = _read_json(path)
            if record and isinstance(record.get("answers"), dict):
                out.append(record)
        return out

    # the report

    def report(self) -> dict:
        """Counts and percentages of baseline / candidate / neither per question, overall and per category."""
        counts: dict[str, dict[str, dict[str, int]]] = {}
        respondents = 0
        for record in self.records():
            if record["answers"]:
                respondents += 1
            for pair_id, ans in record["answers"].items():
                if pair_id not in self.pairs:
                    continue
                category = self.pairs[pair_id].get("category") or ""
                for q, _ in QUESTIONS:
                    outcome = outcome_of(ans[q], ans["a"])
                    for group in ("all", f"category:{category}"):
                        counts.setdefault(group, {}).setdefault(q, dict.fromkeys(OUTCOMES, 0))[outcome] += 1
        def table(group: dict) -> dict:
            out = {}
            for q, _ in QUESTIONS:
                c = group.get(q, dict.fromkeys(OUTCOMES, 0))
                total = sum(c.values())
                out[q] = {"answers": total, **{o: c[o] for o in OUTCOMES},
                          **{f"{o}_pct": (100.0 * c[o] / total if total else None) for o in OUTCOMES}}
            return out

        categories = sorted(k.split(":", 1)[1] for k in counts if k.startswith("category:"))
        return {"survey": self.name, "respondents": respondents, "pairs": len(self.pairs),
                "questions": dict(REPORT_LABELS), "overall": table(counts.get("all", {})),
                "per_category": {c: table(counts[f"category:{c}"]) for c in categories}}


def outcome_of(answer: str, a_role: str) -> str:
    """An answer as what it chose: "A" is the image shown as A (a_role), "B" the other one."""
    if answer == "neither":
        return "neither"
    return a_role if answer == "A" else _other(a_role)


def _other(role: str) -> str:
    return "candidate" if role == "baseline" else "baseline"


def report_markdown(report: dict) -> str:
    """Seed 004's table 5.5 (per question) and figure 5.7 (per category), percentages of all answers."""
    def rows(table: dict) -> list[str]:
        out = []
        for q, text in report["questions"].items():
            r = table[q]
            pct = [("" if r[f"{o}_pct"] is None else f"{r[f'{o}_pct']:.2f}") for o in OUTCOMES]
            out.append(f"| {text} | {' | '.join(pct)} | {r['answers']} |")
        return out

    head = ["| Question | baseline % | fine-tuned % | neither/same % | answers |", "|---|---|---|---|---|"]
    lines = [f"**{report['survey']}**: {report['respondents']} respondent(s), {report['pairs']} pairs", "",
             *head, *rows(report["overall"])]
    for category, table in report["per_category"].items():
        if category:
            lines += ["", f"**{category}**", "", *head, *rows(table)]
    return "\n".join(lines) + "\n"


def list_surveys(surveys_dir: Path) -> list[str]:
    folder = Path(surveys_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if (p / "survey.json").is_file()]
    return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]


def open_survey(surveys_dir: Path, name: str) -> Survey:
    from studio.files.names import UnsafeNameError, safe_child

    try:
        folder = safe_child(Path(surveys_dir), name)
    except (UnsafeNameError, ValueError) as e:
        raise ValueError(f"no survey named {name!r}") from e
    if not (folder / "survey.json").is_file():
        raise ValueError(f"no survey named {name!r}")
    return Survey(folder)


def client_key(host) -> str:
    """The rate-limit bucket of a client address: the IPv4 address, an IPv6 address's /64, else the text itself."""
    text = str(host or "").strip()[:100] or "unknown"
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return text
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False)) if ip.version == 6 else str(ip)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
