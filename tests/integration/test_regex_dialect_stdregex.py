"""The tensor-pattern check against the real engines: C++ std::regex (what llama.cpp's quantizer
compiles, ECMAScript by default) and Python's re (what kquant's planner searches with).

A tiny C++ program, built here with the system compiler, compiles each pattern with std::regex
and searches tensor names with it. Every pattern kquant accepts must compile there and pick the
same tensors as Python; the refused ones are refused for a reason: std::regex rejects them, or
reads them differently from Python (``\\z``, ``a*+``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from kquant.quantizer import regex_dialect
from regex_cases import ACCEPTED, REFUSED

CHECKER = r"""
#include <iostream>
#include <regex>
#include <string>
// stdin: "pattern\tname" lines; stdout: "error" when std::regex refuses the pattern, else 1 or 0
// for std::regex_search(name, pattern), as llama.cpp's tensor-type overrides call it.
int main() {
    std::string line;
    while (std::getline(std::cin, line)) {
        auto tab = line.find('\t');
        std::string pattern = line.substr(0, tab), name = line.substr(tab + 1);
        try {
            std::regex re(pattern);
            std::cout << (std::regex_search(name, re) ? "1" : "0") << std::endl;
        } catch (const std::regex_error &) {
            std::cout << "error" << std::endl;
        }
    }
}
"""

NAMES = [
    "token_embd.weight",
    "output.weight",
    "output_norm.weight",
    "blk.0.attn_q.weight",
    "blk.1.attn_k.weight",
    "blk.12.ffn_down_exps.weight",
    "blk.3.ffn_up_shexp.weight",
    "blk.2.ffn_down.weight",
    "BLK.0.attn_v.weight",
    "blk.7.attn_norm.weight",
    "aa",
    "a-",
    "ABC_",
    "z",
    "blk.0.0",
]


@pytest.fixture(scope="module")
def std_regex(tmp_path_factory: pytest.TempPathFactory) -> Path:
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler to build the std::regex checker")
    folder = tmp_path_factory.mktemp("stdregex")
    (folder / "check.cpp").write_text(CHECKER)
    subprocess.run([compiler, "-O1", "-std=c++17", "-o", str(folder / "check"), str(folder / "check.cpp")],
                   check=True, timeout=300)
    return folder / "check"


def _std(checker: Path, pattern: str, names: list[str]) -> list[str]:
    lines = "".join(f"{pattern}\t{name}\n" for name in names)
    out = subprocess.run([str(checker)], input=lines, capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.split()


@pytest.mark.parametrize("pattern", ACCEPTED)
def test_accepted_patterns_pick_the_same_tensors_in_std_regex_and_python(std_regex: Path, pattern: str) -> None:
    std = _std(std_regex, pattern, NAMES)
    python = ["1" if re.search(pattern, name) else "0" for name in NAMES]
    assert std == python, dict(zip(NAMES, zip(std, python, strict=True), strict=True))


@pytest.mark.parametrize("pattern", list(REFUSED))
def test_refused_patterns_fail_or_differ_in_std_regex(std_regex: Path, pattern: str) -> None:
    assert regex_dialect.ecmascript_error(pattern) is not None
    if not pattern.isascii():
        return  # std::regex reads bytes: the difference is in what a byte is, not in a compile error
    std = _std(std_regex, pattern, NAMES)
    try:
        compiled = re.compile(pattern)
    except re.error:
        return  # Python refuses it: the planner could not run it
    python = ["1" if compiled.search(name) else "0" for name in NAMES]
    # Either llama.cpp would throw at quantization, or it would pick other tensors than the plan;
    # the rest agree on these names and are refused for another engine or another input.
    other_reason = {
        r"blk(?=\.)": "RE2 (the API server's CEL) has no look-arounds",
        r"blk\.(\d)\.\1": "RE2 has no backreferences",
        r"a{2000}": "RE2 counts at most 1000",
        r"a*+": "possessive in Python 3.11, (a*)+ in std::regex: they differ on 'a*+a'",
        r"a}": "a literal in Python and RE2, an error in strict ECMAScript",
        r"a]": "a literal in Python and RE2, an error in strict ECMAScript",
        r"[a&&b]": "Python warns it will become set intersection",
    }
    assert "error" in std or std != python or pattern in other_reason, pattern
