"""The fetch step's wall time for each kind of hub source, on the same files and machine.

SmolLM2-135M-Instruct's Hugging Face folder (272.6 MB in 6 files) is served by the two local
stand-ins, ``tests/hub_server.py`` (the Hugging Face hub API) and ``tests/modelscope_server.py``
(ModelScope's ``/api/v1``), and fetched into a fresh folder by the real clients: ``fetch.fetch``
(huggingface_hub, kquant's resumable partial files, a sha256 pass after the download) and
``fetch_modelscope.fetch_source`` (modelscope_hub, which hashes while it streams). Loopback only:
the numbers compare the clients' own work, not a network.

    PYTHONSAFEPATH=1 .venv/bin/python -P bench/fetch_sources.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("TQDM_DISABLE", "1")  # the ModelScope client's progress bars

from fixtures import smollm2
from hub_server import FakeHub
from kquant.quantizer import fetch, fetch_modelscope, settings
from modelscope_server import FakeModelScope

REPO = "bench/smollm2"


def _times(run: Callable[[Path], fetch.FetchResult], repeats: int) -> tuple[list[float], fetch.FetchResult]:
    seconds, result = [], None
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="kquant-bench-fetch-") as tmp:
            start = time.perf_counter()
            result = run(Path(tmp) / "download")
            seconds.append(time.perf_counter() - start)
    assert result is not None
    return seconds, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    folder = smollm2.hf_dir()
    with FakeModelScope() as ms, FakeHub() as hub:
        ms.add_repo(REPO, folder)
        hub.add_repo(REPO, folder)
        modelscope = settings.ModelScopeSource(repo=REPO, endpoint=ms.url)
        huggingface = settings.HuggingFaceSource(repo=REPO, endpoint=hub.url)
        runs: dict[str, Callable[[Path], fetch.FetchResult]] = {
            "modelscope (modelscope_hub)": lambda dest: fetch_modelscope.fetch_source(modelscope, dest, env={}),
            "huggingface (huggingface_hub)": lambda dest: fetch.fetch(huggingface, dest, env={}),
        }
        for label, run in runs.items():
            seconds, result = _times(run, args.repeats)
            size = sum(f.size or 0 for f in result.files)
            print(f"{label}: {len(result.files)} files, {size / 1e6:.1f} MB, seconds "
                  + " / ".join(f"{s:.2f}" for s in seconds))


if __name__ == "__main__":
    main()
