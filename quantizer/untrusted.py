"""A model repository is data, never code: what keeps transformers from running a repo's Python.

transformers imports Python files that a model folder names in ``auto_map`` (``config.json``,
``tokenizer_config.json``) when the caller passes ``trust_remote_code=True``, and llama.cpp's
converter does so for a dozen architectures (Qwen's vocab, DeepSeek-V2, Kimi, GLM, MiniMax,
Hunyuan, Nemotron, ...); the importance-matrix step loads the model with transformers too. That
code would run in the build pod with write access to the claim and the build's ServiceAccount.

The fetch step does not download ``*.py`` files unless ``allowCodeFiles`` asks for them, which
already leaves nothing to import. This module is the second wall, for code that is in the folder
anyway (``allowCodeFiles``, a local source): every caller of transformers in the quantizer runs
after ``forbid_remote_code()``, which

* replaces transformers' ``resolve_trust_remote_code`` by one that never trusts: a folder whose
  class exists in transformers loads with that class and its ``auto_map`` is ignored; one that
  only names its own code fails with ``RemoteCodeError``;
* replaces ``get_class_from_dynamic_module``, the one function that imports a repo's file, by
  one that raises, so a caller passing ``trust_remote_code=True`` still gets no code run.

The converter is a separate process: ``python -m kquant.quantizer.untrusted SCRIPT ARGS...``
applies the same, then runs the script as ``__main__``; ``convert.converter_env`` starts it
without the hub token and with the hub client offline (``OFFLINE_ENV``), so no module can be
fetched from anywhere either.
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
"""Set for every step after the fetch: nothing after it needs the network."""

TOKEN_ENV_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN", "MODELSCOPE_API_TOKEN")
"""Names under which huggingface_hub (old and new) and the ModelScope client pick up a token; none
reaches a later step."""


class RemoteCodeError(RuntimeError):
    """A model folder asked transformers to import its own Python code."""


def _message(model: object) -> str:
    return (
        f"the model at {model} asks to run its own Python code (auto_map / trust_remote_code); "
        "kquant never runs code from a model repository: pick a repository whose architecture "
        "transformers and llama.cpp support natively"
    )


def _never_trust(*args: Any, **kwargs: Any) -> bool:
    """``resolve_trust_remote_code(trust_remote_code, model_name, has_local_code, has_remote_code, ...)``
    that answers "do not trust", and refuses when there is nothing else to load."""
    names = ("trust_remote_code", "model_name", "has_local_code", "has_remote_code")
    given = dict(zip(names, args, strict=False)) | {k: v for k, v in kwargs.items() if k in names}
    if given.get("has_remote_code") and not given.get("has_local_code"):
        raise RemoteCodeError(_message(given.get("model_name")))
    return False


def _no_dynamic_module(class_reference: object, model: object = None, *args: Any, **kwargs: Any) -> Any:
    raise RemoteCodeError(_message(model if model is not None else class_reference))


_PATCHES = {"resolve_trust_remote_code": _never_trust, "get_class_from_dynamic_module": _no_dynamic_module}


def forbid_remote_code() -> None:
    """Make this process's transformers unable to import code from a model folder or the hub."""
    import transformers.dynamic_module_utils as dynamic  # heavy, and only when asked

    originals = {name: getattr(dynamic, name) for name in _PATCHES if hasattr(dynamic, name)}
    for name, replacement in _PATCHES.items():
        setattr(dynamic, name, replacement)
    # Modules that imported the originals by name before this ran keep their own reference: swap
    # those too. Modules imported later read the patched attribute.
    for module in list(sys.modules.values()):
        if module is None or not getattr(module, "__name__", "").startswith("transformers"):
            continue
        for name, original in originals.items():
            if getattr(module, name, None) is original:
                setattr(module, name, _PATCHES[name])


def run_script(script: Path, args: Sequence[str]) -> None:
    """Run ``script`` as ``__main__`` with ``args``, after ``forbid_remote_code``."""
    forbid_remote_code()
    # The converter finds its ``conversion`` package and its ``models/`` folder through sys.path[0].
    sys.path.insert(0, str(script.parent))
    sys.argv = [str(script), *args]
    runpy.run_path(str(script), run_name="__main__")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        raise SystemExit("usage: python -m kquant.quantizer.untrusted SCRIPT [ARGS...]")
    run_script(Path(argv[0]).resolve(), argv[1:])


if __name__ == "__main__":
    main()
