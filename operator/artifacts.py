"""What a finished build left behind: its report, and the variant's file as the server sees it. Pure code.

The quantizer writes its report into the build's ConfigMap; the pass parses it here. The report
names the file as the quantizer's pod saw it; every pod mounts the claim at the same place, so the
path is rewritten under that mount, in the digest's folder. The server Deployment is rendered from
an ``Artifact`` (the variant, its digest and that path), and its hash covers exactly those.
"""

from __future__ import annotations

import dataclasses
import json

from kquant.operator import builds
from kquant.quantizer import report as quantizer_report


@dataclasses.dataclass(frozen=True)
class Artifact:
    """One built variant's file on the storage claim."""

    variant: str
    digest: str
    path: str
    """The GGUF (first shard) as server pods see it, under ``builds.STORAGE_MOUNT``."""
    size_bytes: int


def parse_report(data: str | None, variant: str) -> tuple[quantizer_report.BuildReport | None,
                                                           quantizer_report.VariantReport | None]:
    """The build's report from its ConfigMap and the part about ``variant``; (None, None) while
    there is none, or when the text is not a report (a quantizer of another version)."""
    if not data:
        return None, None
    try:
        parsed = quantizer_report.BuildReport.model_validate(json.loads(data))
    except ValueError:
        return None, None
    return parsed, next((v for v in parsed.variants if v.name == variant), None)


def volume_path(path: str, digest: str) -> str:
    """The model file as every pod sees it: under the storage mount, in the digest's folder."""
    marker = f"/{digest}/"
    if marker not in path:
        return path
    return builds.STORAGE_MOUNT + marker + path.split(marker, 1)[1]


def from_report(build: builds.Build, report: quantizer_report.VariantReport) -> Artifact:
    """The artifact of ``build``, from its report."""
    return Artifact(variant=build.variant, digest=build.digest, path=volume_path(report.path, build.digest),
                    size_bytes=report.size_bytes)
