"""Tensor-override patterns the dialect check accepts and refuses (with the reason), shared by
the unit test and the test against the real std::regex."""

from __future__ import annotations

ACCEPTED = [
    r"blk\.[0-2]\..*",
    r"blk\.[0-9]+\.attn_",
    r"blk\.[0-9]+\.ffn_.*_shexp\.",
    r"ffn_(up|down)_exps",
    r"^token_embd\.weight$",
    r"blk\.(?:1|2|3)\.ffn_down",
    r"blk\.\d{1,2}\.attn_[qkv]\.weight",
    r"a{2,3}?",
    r"[a-]",
    r"[-a]",
    r"[\x41-\x5a]_",
    r"\bblk\b",
    r"output\.weight",
    r"[^.]+_norm",
]
REFUSED = {
    r"(?i)BLK\.0\.": "inline flags",
    r"blk\.(?P<layer>[0-9]+)\.": "named groups",
    r"(?<=blk\.)0": "look-arounds",
    r"blk(?=\.)": "look-arounds",
    r"(?>a)": "atomic",
    r"output\.weight\z": r"\z",
    r"\Ablk": r"\A",
    r"\p{L}": r"\p",
    r"blk\.(\d)\.\1": "backreference",
    r"a*+": "possessive",
    r"[]a]": "start with ']'",
    r"[[:digit:]]": "POSIX",
    r"blk.{": "'{'",
    r"blk.{,3}": "'{'",
    r"a}": "lone '}'",
    r"a]": "lone ']'",
    "blk\u00e9": "ASCII",
    r"*a": "nothing to repeat",
    r"a**": "nothing to repeat",
    r"[z-a]": "backwards",
    r"[\d-z]": "class escape",
    r"[a&&b]": "set operation",
    r"a{2000}": "<= 1000",
    r"(a": "never closed",
    r"a)": "no '('",
    "a\\": "lone backslash",
}
