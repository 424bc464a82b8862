"""llama.cpp's names for the shards of a split GGUF: ``<stem>-0000N-of-0000M.gguf``.

One definition for the whole quantizer. llama.cpp (``llama_split_path``), its ``gguf-split`` tool,
gguf-py's writer and ``convert_hf_to_gguf.py --split-max-size`` all write this pattern: a 1-based
index and the shard count, both five digits. llama.cpp is given the first shard and finds the
others by name, so every part of kquant that lists, stages, publishes or reads a split model must
agree on it; four copies of the regular expression had drifted apart (one required a non-empty
stem, one was anchored only at the end).

Everything here is pure except :func:`siblings` and :func:`missing`, which only look at names in
one folder.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from pathlib import Path

SUFFIX = ".gguf"
PATTERN = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")
"""A shard's file name; ``stem`` is the model's name without the shard part."""
MAX_SHARDS = 99_999
"""Five digits: llama.cpp's ``%05d``."""


@dataclasses.dataclass(frozen=True, order=True)
class ShardName:
    """One shard's place in its split: ``stem``, 1-based ``index`` of ``count``."""

    stem: str
    index: int
    count: int

    def __post_init__(self) -> None:
        if not self.stem:
            raise ValueError("a shard name needs a non-empty stem")
        if not 1 <= self.index <= self.count <= MAX_SHARDS:
            raise ValueError(f"shard {self.index} of {self.count} is out of range (1 <= index <= count <= 99999)")

    @property
    def name(self) -> str:
        return format_name(self.stem, self.index, self.count)

    @property
    def is_first(self) -> bool:
        return self.index == 1

    def all_names(self) -> list[str]:
        """Every shard's file name of this split, in order."""
        return [format_name(self.stem, i, self.count) for i in range(1, self.count + 1)]


def format_name(stem: str, index: int, count: int) -> str:
    """``format_name("q4", 1, 3) == "q4-00001-of-00003.gguf"``."""
    return f"{stem}-{index:05d}-of-{count:05d}{SUFFIX}"


def parse(name: str) -> ShardName | None:
    """The shard a file name denotes, or None for a name that is not a shard (``model.gguf``)."""
    m = PATTERN.match(name)
    if m is None:
        return None
    index, count = int(m["index"]), int(m["count"])
    if not 1 <= index <= count:
        return None  # "x-00000-of-00002.gguf" or "x-00003-of-00002.gguf": not llama.cpp's
    return ShardName(m["stem"], index, count)


def is_shard(name: str) -> bool:
    return parse(name) is not None


def stem_of(name: str) -> str:
    """The model's name without the shard part and ``.gguf``: ``q4`` for ``q4-00002-of-00003.gguf``
    and for ``q4.gguf``. llama.cpp's ``keep_split`` appends the shard part to the name it is given."""
    shard = parse(name)
    return shard.stem if shard is not None else name.removesuffix(SUFFIX)


def first_name(name: str) -> str:
    """The name llama.cpp is given: the first shard of ``name``'s split, or ``name`` itself."""
    shard = parse(name)
    return name if shard is None else format_name(shard.stem, 1, shard.count)


def names_like(stem: str, count: int) -> list[str]:
    """The names of a ``count``-shard split of ``stem``; one plain ``<stem>.gguf`` when ``count`` is 1
    and the writer does not number a single shard (gguf-py's writer does not)."""
    if count <= 1:
        return [f"{stem}{SUFFIX}"]
    return [format_name(stem, i, count) for i in range(1, count + 1)]


def group(names: Iterable[str]) -> tuple[list[str], dict[tuple[str, int], dict[int, str]]]:
    """Split ``.gguf`` names into single files and splits keyed by (stem, count) -> {index: name}."""
    singles: list[str] = []
    splits: dict[tuple[str, int], dict[int, str]] = {}
    for name in sorted(names):
        if not name.endswith(SUFFIX):
            continue
        shard = parse(name)
        if shard is None:
            singles.append(name)
        else:
            splits.setdefault((shard.stem, shard.count), {})[shard.index] = name
    return singles, splits


def missing(path: Path) -> list[str]:
    """Names of the shards of ``path``'s split that do not exist next to it (empty for a single file)."""
    shard = parse(path.name)
    if shard is None:
        return []
    return [n for n in shard.all_names() if not (path.parent / n).exists()]


def siblings(path: Path) -> list[Path]:
    """Every shard of the split ``path`` belongs to, in order, given any one of them; ``[path]`` for
    a single file. Raises ``FileNotFoundError`` naming the shards that are missing."""
    shard = parse(path.name)
    if shard is None:
        return [path]
    gone = missing(path)
    if gone:
        raise FileNotFoundError(f"GGUF {path}: shard(s) {', '.join(gone)} of {shard.count} are missing")
    return [path.with_name(n) for n in shard.all_names()]


def first(paths: Iterable[Path]) -> Path:
    """The file llama.cpp loads among one model's files: the first shard, or the only file."""
    ordered = sorted(paths, key=lambda p: (parse(p.name) or ShardName(p.name, 1, 1)).index)
    if not ordered:
        raise ValueError("no GGUF file given")
    return ordered[0]
