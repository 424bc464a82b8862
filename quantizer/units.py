"""Sizes and quantities: the one place kquant turns text into bytes and bytes into text.

Two notations meet here. Kubernetes quantities (``16Gi``, ``500m``, ``64G``, ``1e3``) are what
manifests, node allocatable and resource limits carry; sizes such as ``24GiB`` or ``81559MiB`` are
what people type for GPU memory, where vendors write GB but mean GiB, so both spellings are
binary. Everything is pure; the quantizer owns the module because it is the lowest layer, and the
operator imports it from there.
"""

from __future__ import annotations

import re

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

#: A Kubernetes quantity as the API server's ``resource.Quantity`` parses it (the CRD's pattern).
QUANTITY = r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|[numkMGTPE]|[KMGTPE]i)?$"

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}

_SIZE_RE = re.compile(r"^\s*(?P<n>\d+(\.\d+)?)\s*(?P<unit>[KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}


def parse_quantity(value: str | int) -> float:
    """The number a Kubernetes quantity stands for (``"200Gi"`` -> 214748364800.0).

    Raises ValueError for text the API server would refuse as a quantity.
    """
    if isinstance(value, int):
        return float(value)
    match = re.fullmatch(QUANTITY, value)
    if not match:
        raise ValueError(f"{value!r} is not a Kubernetes quantity")
    suffix = match.group(3) or ""
    if not suffix or suffix[0] in "eE":
        return float(value)
    number = float(value[: match.start(3)])
    return number * _BINARY.get(suffix, 1) * _DECIMAL.get(suffix, 1)


def quantity_bytes(value: str | int | None) -> int | None:
    """A memory quantity (``128Gi``, ``64G``, ``1000``) in whole bytes; None when unset."""
    if value is None:
        return None
    return int(parse_quantity(value if isinstance(value, int) else str(value).strip()))


def whole_quantity(value: object, what: str = "quantity") -> int:
    """An extended-resource quantity such as ``nvidia.com/gpu``: a whole number, 0 when unset.

    ``what`` names the value in the error (``GPU quantity '1.5' is not a whole number``).
    """
    if value is None:
        return 0
    text = str(value).strip()
    if not text:
        return 0
    try:
        number = parse_quantity(text)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a Kubernetes quantity") from None
    if not number.is_integer():
        raise ValueError(f"{what} {text!r} is not a whole number")
    return int(number)


def parse_size(text: str) -> int:
    """``24GiB``, ``24G``, ``81559MiB`` or a plain byte count, in bytes; units are binary either way.

    Raises ValueError whose text the caller wraps with the option or field it came from.
    """
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size such as 24GiB, 80G or 81559MiB")
    unit = (match["unit"] or "").upper().rstrip("B").rstrip("I")
    return int(float(match["n"]) * _SIZE_UNITS[unit])


def gib(n: int | float, digits: int = 2) -> str:
    """``23.50 GiB``: memory in a plan or a table, always in GiB so columns compare."""
    return f"{n / GiB:.{digits}f} GiB"


def human_size(n: int) -> str:
    """``131.4GiB``, ``98.9MiB``: the largest binary unit that keeps the number at 1 or more."""
    for unit, scale in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)
