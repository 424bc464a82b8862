"""Peak anonymous memory of the publish step against the size of the variant it publishes.

bench/build_memory.py charges a whole build's samples to steps by its progress lines; this
isolates publish (``publish.publish``: GGUF facts from the header, sha256 of every shard, the
report, the moves). For each GGUF, in a fresh child process: RssAnon before, and its peak while
publishing a hard-linked copy, optionally right after an evaluation (``evaluate.load``: the model
loaded with llama.cpp, one chunk scored, closed, its freed heap given back), as the pipeline runs
them. Printed: size, the peaks, and the slope of the peak against the file size (goal <= 0.1).

Default inputs: the SmolLM2 16-bit fixture and its Q8_0 and Q4_K_M (llama-quantize), 100-270 MB.

    .venv/bin/python -P bench/publish_memory.py [--after-eval] [GGUF ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import fit_params
from fixtures import hf_models, smollm2

MiB = 2**20
CHILD = r"""
import json, os, sys, threading, time
from pathlib import Path
from kquant.quantizer import evaluate, publish, report

def anon():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon"))

model, root, after_eval = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
if after_eval:
    scoring = evaluate.LlamaEvalSettings(context_size=128, chunks=1, threads=2)
    with evaluate.load(model, scoring) as llm:
        llm.eval(list(range(1, 120)))
base = report.VariantReport(name="v", digest="d" * 16, type="Q8_0", recipe="uniform")
stage = publish.staging_dir(root, base.digest)
stage.mkdir(parents=True)
os.link(model, stage / model.name)
peak, stop = [0], [False]
def sample():
    while not stop[0]:
        peak[0] = max(peak[0], anon())
        time.sleep(0.005)
before = anon()
t = threading.Thread(target=sample, daemon=True)
t.start()
publish.publish([stage / model.name], root, base, parameters=None)
stop[0] = True
t.join()
print(json.dumps({"before": before, "peak": max(peak[0], anon())}))
"""


def defaults(tmp: Path) -> list[Path]:
    f16 = hf_models.cached_f16_gguf(smollm2.hf_dir(), "smollm2")
    quantize = Path(os.environ.get("KQUANT_LLAMA_BIN", fit_params.DEFAULT_BIN)) / "llama-quantize"
    out = [f16]
    for kind in ("Q8_0", "Q4_K_M"):
        path = tmp / f"smollm2-{kind}.gguf"
        subprocess.run([str(quantize), str(f16), str(path), kind, "2"], check=True, capture_output=True)
        out.append(path)
    return sorted(out, key=lambda p: p.stat().st_size)


def measure(model: Path, tmp: Path, after_eval: bool) -> dict[str, int]:
    root = Path(tempfile.mkdtemp(dir=tmp))
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    done = subprocess.run([sys.executable, "-P", "-c", CHILD, str(model), str(root), "1" if after_eval else "0"],
                          env=env, capture_output=True, text=True, check=True)  # fmt: skip
    result: dict[str, int] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", nargs="*", type=Path, help="GGUF files (default: SmolLM2 F16, Q8_0, Q4_K_M)")
    parser.add_argument("--after-eval", action="store_true", help="evaluate with llama.cpp first, as the pipeline")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        models = args.gguf or defaults(tmp)
        sizes, peaks = [], []
        print(f"{'file':<40} {'MiB':>8} {'anon before':>12} {'anon peak':>10}")
        for model in models:
            found = measure(model, tmp, args.after_eval)
            sizes.append(float(model.stat().st_size))
            peaks.append(float(found["peak"]))
            print(f"{model.name:<40} {model.stat().st_size / MiB:>8.0f} {found['before'] / MiB:>12.0f} "
                  f"{found['peak'] / MiB:>10.0f}")
        if len(models) > 1:
            print(f"slope of the peak against the file size: {slope(sizes, peaks):.3f} (goal <= 0.1)")


if __name__ == "__main__":
    main()
