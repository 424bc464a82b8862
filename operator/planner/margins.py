"""Margins learned from served pods, per GPU product. Pure code.

What llama-server's log shows beyond the prediction on a GPU (a buffer the memory model misses, a
llama.cpp upgrade, a driver that reserves more) is kept per ``nvidia.com/gpu.product`` as the
largest excess ever seen, in a ConfigMap the operator owns (``kube.Kube.record_margin``), and the
planner adds it to its per-GPU overhead for that product from then on. Only the largest is kept:
a margin that shrank with the next measurement would plan the pod that then runs out of memory.

Keys are the product names as the label gives them (``NVIDIA-H100-80GB-HBM3``), with any
character a ConfigMap key may not hold replaced by ``_``; values are whole bytes. The learned
margin is capped (``MAX_LEARNED_BYTES``): a server log is data from a pod, and one forged log must
not make every later plan on that product refuse to fit.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from kquant.quantizer import units

MAX_LEARNED_BYTES = 4 * units.GiB
_NOT_A_KEY = re.compile(r"[^-._a-zA-Z0-9]")


@dataclasses.dataclass(frozen=True)
class Learned:
    """The margin one product gets, and where it came from (for status and ``kquant plan``)."""

    bytes: int = 0
    source: str = ""

    def describe(self, product: str | None) -> str:
        if not self.bytes:
            return f"no learned margin for {product or 'this GPU'}"
        return f"learned margin {units.gib(self.bytes)} for {product} from {self.source}"


def key(product: str) -> str:
    return _NOT_A_KEY.sub("_", product)[:253] or "_"


def parse(data: Mapping[str, str] | None) -> dict[str, int]:
    """The table from a ConfigMap's data; values that are not whole bytes are skipped, not fatal."""
    table: dict[str, int] = {}
    for name, value in (data or {}).items():
        try:
            table[name] = min(max(int(value), 0), MAX_LEARNED_BYTES)
        except ValueError:
            continue
    return table


def learned(data: Mapping[str, str] | None, product: str | None, source: str) -> Learned:
    if not product:
        return Learned()
    found = parse(data).get(key(product), 0)
    return Learned(found, source if found else "")


def merged(data: Mapping[str, str] | None, product: str, excess: int) -> dict[str, str] | None:
    """The data with ``excess`` recorded for ``product`` when it is larger than what is kept;
    None when nothing changes."""
    if excess <= 0:
        return None
    table = parse(data)
    wanted = min(excess, MAX_LEARNED_BYTES)
    if table.get(key(product), 0) >= wanted:
        return None
    return {**dict(data or {}), key(product): str(wanted)}
