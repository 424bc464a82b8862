"""Tensor-name patterns in the dialect that runs them. Pure.

A tensor-override pattern is read by three engines: llama.cpp matches it with C++
``std::regex`` (ECMAScript grammar) while it quantizes, kquant's planner searches it with
Python's ``re`` to predict the result, and the API server's CEL ``matches()`` (RE2) checks it
at admission. A pattern that one of them reads differently, or refuses, either fails hours into
a build (``(?i)`` and ``(?P<n>...)`` compile in Python and RE2, and throw in ``std::regex``) or
makes the plan lie about the file (``\\z`` is end of text to RE2, an error to Python and the
letter ``z`` to ``std::regex``).

``ecmascript_error`` therefore accepts the subset that the three read alike and refuses the
rest with the reason: literals, ``.``, ``^``, ``$``, ``|``, groups ``(...)`` and ``(?:...)``,
classes ``[...]`` with ranges, the escapes ``\\d \\D \\w \\W \\s \\S \\b \\B \\t \\n \\r \\f \\v``,
``\\xHH`` and escaped punctuation, and the quantifiers ``* + ? {n} {n,} {n,m}`` with an optional
lazy ``?``. Refused: every other ``(?`` form (inline flags, named groups, look-arounds, atomic
groups), backreferences, possessive quantifiers, letter escapes outside that list (``\\A \\z
\\Q \\p{..} \\u..``), POSIX and nested classes, a ``{`` or ``}`` or ``]`` that is not part of
its construct, and non-ASCII characters (``std::regex`` reads bytes). The unit tests compile
every accepted and refused pattern with the real ``std::regex`` and Python's ``re``.
"""

from __future__ import annotations

import dataclasses
import re

MAX_REPEAT = 1000
"""RE2's limit on a counted repetition."""

_CLASS_ESCAPES = set("dDwWsS")
_CHAR_ESCAPES = set("tnrfv")
_ASSERTION_ESCAPES = set("bB")
_PUNCTUATION = set("\\^$.|?*+()[]{}/-")
_COUNT = re.compile(r"\{(\d+)(,(\d*))?\}")
_HEX = re.compile(r"x[0-9A-Fa-f]{2}")


class _RefusedError(Exception):
    pass


def _escape(pattern: str, i: int, *, in_class: bool) -> tuple[int, str]:
    """Read the escape at ``pattern[i] == '\\'``; return the next index and its kind:
    ``class`` (\\d ...), ``assert`` (\\b \\B) or ``char``."""
    if i + 1 >= len(pattern):
        raise _RefusedError("it ends with a lone backslash")
    c = pattern[i + 1]
    if c in _CLASS_ESCAPES:
        return i + 2, "class"
    if c in _ASSERTION_ESCAPES and not in_class:
        return i + 2, "assert"
    if c in _CHAR_ESCAPES or c in _PUNCTUATION:
        return i + 2, "char"
    if _HEX.match(pattern, i + 1):
        return i + 4, "char"
    if c.isdigit():
        raise _RefusedError(
            f"\\{c} is a backreference or octal escape, which std::regex, RE2 and Python read differently"
        )
    raise _RefusedError(
        f"\\{c} is not an escape that llama.cpp's std::regex (ECMAScript) reads like Python and RE2; "
        "use \\d \\w \\s \\b, \\xHH or a backslash before punctuation"
    )


def _class(pattern: str, i: int) -> int:
    """Read the class starting at ``pattern[i] == '['``; return the index after its ``]``."""
    i += 1
    if i < len(pattern) and pattern[i] == "^":
        i += 1
    if i < len(pattern) and pattern[i] == "]":
        raise _RefusedError("a class may not start with ']' (std::regex reads '[]' as an empty class): write '\\]'")
    previous: str | None = None  # the last single character, for a range
    previous_kind = ""
    while i < len(pattern):
        c = pattern[i]
        if c == "]":
            return i + 1
        if c == "[":
            raise _RefusedError(
                "'[' inside a class (POSIX [:alpha:] or a nested set) differs between engines: write '\\['"
            )
        if c in "&~|-" and pattern.startswith(c * 2, i):
            raise _RefusedError(f"{c * 2!r} inside a class is a set operation in Python: escape one of them")
        if c == "\\":
            start = i
            i, kind = _escape(pattern, i, in_class=True)
            previous, previous_kind = (pattern[start:i], kind)
            continue
        if c == "-" and previous is not None and i + 1 < len(pattern) and pattern[i + 1] != "]":
            low = previous
            i += 1
            if pattern[i] == "\\":
                start = i
                i, kind = _escape(pattern, i, in_class=True)
                high, high_kind = pattern[start:i], kind
            else:
                high, high_kind = pattern[i], "char"
                i += 1
            if previous_kind == "class" or high_kind == "class":
                raise _RefusedError(f"the range {low}-{high} has a class escape at one end")
            if _code(low) > _code(high):
                raise _RefusedError(f"the range {low}-{high} runs backwards")
            previous = None
            continue
        previous, previous_kind = c, "char"
        i += 1
    raise _RefusedError("a '[' is never closed")


def _code(char: str) -> int:
    """The character a class member stands for: ``a``, ``\\.`` or ``\\x41``."""
    if char.startswith("\\x"):
        return int(char[2:], 16)
    if char.startswith("\\"):
        return ord({"t": "\t", "n": "\n", "r": "\r", "f": "\f", "v": "\v"}.get(char[1], char[1]))
    return ord(char)


def ecmascript_error(pattern: str) -> str | None:
    """Why ``pattern`` is outside the subset that std::regex, Python ``re`` and RE2 read alike, or None."""
    try:
        _check(pattern)
    except _RefusedError as exc:
        return str(exc)
    try:
        re.compile(pattern)
    except re.error as exc:  # anything the walk above let through by mistake
        return str(exc)
    return None


@dataclasses.dataclass
class _State:
    depth: int = 0
    """Open groups."""
    last: str = "start"
    """What came last: "atom" may take a quantifier, "quantified" a lazy '?'; "start" (the
    pattern, '(' or '|'), "assert" ('^', '$', \\b) and "lazy" take none."""


def _check(pattern: str) -> None:
    bad = [c for c in pattern if not (" " <= c <= "~")]
    if bad:
        raise _RefusedError(f"{bad[0]!r} is not a printable ASCII character (std::regex reads bytes, not characters)")
    state = _State()
    i = 0
    while i < len(pattern):
        i = _token(pattern, i, state)
    if state.depth:
        raise _RefusedError("a '(' is never closed")


def _token(pattern: str, i: int, state: _State) -> int:
    """Read one token at ``i``; return the index after it."""
    c = pattern[i]
    if c == "\\":
        i, kind = _escape(pattern, i, in_class=False)
        state.last = "assert" if kind == "assert" else "atom"
        return i
    if c == "[":
        state.last = "atom"
        return _class(pattern, i)
    if c in "()":
        return _paren(pattern, i, state)
    if c in "|^$":
        state.last = "start" if c == "|" else "assert"
        return i + 1
    if c in "*+?{":
        return _quantifier(pattern, i, state)
    if c in "}]":
        raise _RefusedError(f"a lone '{c}' is read differently by the engines: write '\\{c}'")
    state.last = "atom"
    return i + 1


def _paren(pattern: str, i: int, state: _State) -> int:
    if pattern[i] == ")":
        if state.depth == 0:
            raise _RefusedError("a ')' has no '('")
        state.depth -= 1
        state.last = "atom"
        return i + 1
    state.depth += 1
    state.last = "start"
    if not pattern.startswith("(?", i):
        return i + 1
    if not pattern.startswith("(?:", i):
        raise _RefusedError(
            f"{pattern[i : i + 4]!r}...: inline flags, named groups, look-arounds and atomic groups "
            "are not ECMAScript std::regex syntax (llama.cpp would fail at quantization); only '(?:' is"
        )
    return i + 3


def _quantifier(pattern: str, i: int, state: _State) -> int:
    c = pattern[i]
    if c == "?" and state.last == "quantified":
        state.last = "lazy"
        return i + 1
    if c == "+" and state.last == "quantified":
        raise _RefusedError("possessive quantifiers ('*+', '++', '?+') are not ECMAScript")
    end = i + 1
    if c == "{":
        m = _COUNT.match(pattern, i)
        if m is None:
            raise _RefusedError("a '{' that is not a count {n}, {n,} or {n,m}: write '\\{' for the character")
        low, high = int(m[1]), (int(m[3]) if m[3] else None)
        if max(low, high or 0) > MAX_REPEAT or (high is not None and high < low):
            raise _RefusedError(f"the count {m[0]} must have n <= m <= {MAX_REPEAT}")
        c, end = m[0], m.end()
    if state.last != "atom":
        raise _RefusedError(f"'{c}' at {i} has nothing to repeat")
    state.last = "quantified"
    return end
