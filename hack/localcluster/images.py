"""Map container images to local executables (see images.yaml)."""

from __future__ import annotations

import dataclasses
import os
import pathlib

import yaml

DEFAULT_TABLE = pathlib.Path(__file__).with_name("images.yaml")


class UnknownImageError(LookupError):
    pass


@dataclasses.dataclass(frozen=True)
class ImageEntry:
    prefix: str
    entrypoint: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ImageTable:
    entries: tuple[ImageEntry, ...]

    @classmethod
    def load(cls, path: pathlib.Path = DEFAULT_TABLE) -> ImageTable:
        rows = yaml.safe_load(path.read_text())
        return cls(tuple(ImageEntry(r["prefix"], tuple(r.get("entrypoint", []))) for r in rows))

    def entrypoint(self, image: str) -> list[str]:
        for entry in self.entries:
            if image.startswith(entry.prefix):
                return [os.path.expandvars(part) for part in entry.entrypoint]
        raise UnknownImageError(
            f"image {image!r} has no local executable; add it to {DEFAULT_TABLE.name}"
        )
