"""Caption options as kohya's sd-scripts has them (train_util's `process_caption`): the whole caption dropped at a
rate (`caption_dropout_rate`, the unconditional case), comma-separated tags shuffled after the first `keep_tokens`
(`shuffle_caption`), each of those tags dropped at a rate (`caption_tag_dropout_rate`), and a prefix and suffix
(`caption_prefix`, `caption_suffix`). Pure: every random choice comes from the `random.Random` given, which the
training loop seeds per micro-batch and image, so a resumed run sees the captions an uninterrupted one saw.

Two choices differ from kohya on purpose: the prefix and suffix are tags of their own that always stay in place
(kohya glues them to the first and last tag with a space and shuffles them with the rest), and empty tags
("a,,b") are dropped."""

from __future__ import annotations

import random
from dataclasses import dataclass

# after studio.train.data's STREAM_ORDER .. STREAM_BUCKETS (1..6): the caption draws of one image of a micro-batch
STREAM_CAPTIONS = 7


def split_tags(text: str) -> list[str]:
    """The comma-separated tags of `text`, stripped; empty ones left out."""
    return [tag.strip() for tag in text.split(",") if tag.strip()]


def caption_dropped(rng: random.Random, rate: float) -> bool:
    """Whether this draw drops the whole caption (kohya's caption dropout); no draw at all when the rate is 0."""
    return rate > 0 and rng.random() < rate


def frame_caption(caption: str, prefix: str = "", suffix: str = "") -> str:
    """The caption with the prefix before and the suffix after it, each joined as a tag (", ")."""
    parts = (prefix.strip(" ,"), caption.strip(), suffix.strip(" ,"))
    if not parts[0] and not parts[2]:
        return caption
    return ", ".join(part for part in parts if part)


def arrange_tags(caption: str, rng: random.Random, *, shuffle: bool = False, keep_tokens: int = 0,
                 tag_dropout: float = 0.0, keep_separator: str = "") -> str:
    """The tags after the first `keep_tokens` (or after the head before `keep_separator`, up to a second one)
    shuffled, then each dropped at `tag_dropout`; the caption untouched when neither is on."""
    split_here = bool(keep_separator) and keep_separator in caption
    if not (shuffle or tag_dropout > 0 or split_here):
        return caption
    tail: list[str] = []
    if split_here:  # kohya's keep_tokens_separator: "fixed ||| shuffled ||| fixed at the end"
        head, rest = caption.split(keep_separator, 1)
        if keep_separator in rest:
            rest, end = rest.split(keep_separator, 1)
            tail = split_tags(end)
        fixed, flexible = split_tags(head), split_tags(rest)
    else:
        tags = split_tags(caption)
        fixed, flexible = tags[:keep_tokens], tags[keep_tokens:]
    if shuffle:
        rng.shuffle(flexible)
    if tag_dropout > 0:
        flexible = [tag for tag in flexible if rng.random() >= tag_dropout]
    return ", ".join(fixed + flexible + tail)


def shape_caption(caption: str, rng: random.Random, *, shuffle: bool = False, keep_tokens: int = 0,
                  tag_dropout: float = 0.0, caption_dropout: float = 0.0, prefix: str = "", suffix: str = "",
                  keep_separator: str = "") -> str:
    """One training caption as kohya shapes it: "" at `caption_dropout` (prefix and suffix included), else the
    tags arranged (arrange_tags) and framed by the prefix and suffix; all off returns `caption` unchanged."""
    if caption_dropped(rng, caption_dropout):
        return ""
    arranged = arrange_tags(caption, rng, shuffle=shuffle, keep_tokens=keep_tokens, tag_dropout=tag_dropout,
                            keep_separator=keep_separator)
    return frame_caption(arranged, prefix, suffix)


@dataclass(frozen=True)
class CaptionOptions:
    """A job's caption options (TrainJob's shuffle_tags, keep_tokens, tag_dropout, caption_dropout, prefix and
    suffix) in one place."""

    shuffle: bool = False
    keep_tokens: int = 0
    tag_dropout: float = 0.0
    caption_dropout: float = 0.0
    prefix: str = ""
    suffix: str = ""
    keep_separator: str = ""

    @classmethod
    def from_job(cls, job) -> CaptionOptions:
        """The options of a TrainJob (anything with its caption fields)."""
        return cls(bool(job.shuffle_tags), int(job.keep_tokens), float(job.tag_dropout), float(job.caption_dropout),
                   str(job.caption_prefix), str(job.caption_suffix))

    @property
    def random(self) -> bool:
        """Whether a caption changes from step to step (then its text embeddings cannot be cached per image)."""
        return self.shuffle or self.tag_dropout > 0 or self.caption_dropout > 0

    @property
    def active(self) -> bool:
        """Whether the options change captions at all."""
        return self.random or bool(self.prefix.strip(" ,") or self.suffix.strip(" ,") or self.keep_separator)

    def arrange(self, caption: str, rng: random.Random) -> str:
        """A caption that was not dropped: its tags arranged, then framed (shape_caption's second half)."""
        arranged = arrange_tags(caption, rng, shuffle=self.shuffle, keep_tokens=self.keep_tokens,
                                tag_dropout=self.tag_dropout, keep_separator=self.keep_separator)
        return frame_caption(arranged, self.prefix, self.suffix)

    def shape(self, caption: str, rng: random.Random) -> str:
        """shape_caption with these options."""
        return shape_caption(caption, rng, shuffle=self.shuffle, keep_tokens=self.keep_tokens,
                             tag_dropout=self.tag_dropout, caption_dropout=self.caption_dropout, prefix=self.prefix,
                             suffix=self.suffix, keep_separator=self.keep_separator)
