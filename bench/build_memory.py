"""Peak memory of each build step against model size, on synthetic DeepSeek-V3 models.

For each of three sizes (16-bit size spanning more than 4x), a synthetic DeepSeek-V3 repository
(tests/fixtures/deepseek_v3.py: FP8 with 128x128 block scales, MLA, dense first layers, routed and
shared experts) is served by the local hub (tests/hub_server.py) and built by ``kquant-quantize
run`` as a child process: fetch -> convert -> calibrate -> reference -> quantize (dynamic Q4_K_M)
-> evaluate -> publish. The process tree's memory is sampled every 50 ms from /proc and each
sample is charged to the step the build's progress log last named ("referencing" counts as
evaluate). Printed per step:

* peak anonymous memory (RssAnon summed over the tree: what a memory limit cannot reclaim) and
  peak resident memory (VmRSS: also memory-mapped model files, which are reclaimable page cache);
* the slope of peak anonymous memory against the model's 16-bit bytes (least squares over the
  sizes); the goal is <= 0.1 for every step.

Then the largest model is built again inside a memory cgroup limited to 0.3 x its 16-bit size
+ 1 GiB (tests/fixtures/memory_limit.py; root and a cgroup memory controller needed), and the
bench prints whether it completed.

    .venv/bin/python -P bench/build_memory.py [--layers 5,10,25] [--skip-limit]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fixtures import deepseek_v3, memory_limit
from hub_server import FakeHub

GiB = 2**30
MiB = 2**20
STEPS = ("fetch", "convert", "calibrate", "quantize", "evaluate", "publish")
PHASE_TO_STEP = {
    "fetching": "fetch",
    "converting": "convert",
    "calibrating": "calibrate",
    "referencing": "evaluate",
    "quantizing": "quantize",
    "evaluating": "evaluate",
    "publishing": "publish",
}
_PHASE = re.compile(r"progress: (?:\S+ \d+/\d+ )?(?P<phase>[a-z]+) \d+%")
BASE = deepseek_v3.SCALING


def tag_of(line: str) -> str | None:
    m = _PHASE.search(line)
    return None if m is None else PHASE_TO_STEP.get(m["phase"])


def spec(source: dict[str, object], storage: Path) -> dict[str, object]:
    return {
        "source": source,
        "convertType": "bf16",
        "calibration": {"chunks": 3, "contextSize": 128},
        "evaluation": {"chunks": 2, "contextSize": 128},
        "variants": [{"name": "dyn", "type": "Q4_K_M", "recipe": "dynamic"}],
        "storageRoot": str(storage),
        "threads": 2,
    }


def build(spec_data: dict[str, object], work: Path, limit: int | None = None) -> memory_limit.Usage:
    work.mkdir(parents=True, exist_ok=True)
    path = work / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_data))
    cmd = [sys.executable, "-P", "-m", "kquant.quantizer.cli", "run", "--spec", path, "--report", work / "report.json"]
    return memory_limit.run(cmd, limit_bytes=limit, env=os.environ, tag_of=tag_of)


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def print_table(sizes: list[int], peaks: dict[str, list[tuple[int, int]]], totals: list[memory_limit.Usage]) -> None:
    print("\n== peak memory per step (MiB): anonymous / resident incl. mapped files; slope of anonymous")
    head = " ".join(f"{s / GiB:>14.2f}G" for s in sizes)
    print(f"{'step':<10} {head}   slope(anon)  slope(rss)  goal<=0.1")
    for step in STEPS:
        cells = " ".join(f"{a / MiB:>7.0f}/{r / MiB:<7.0f}" for a, r in peaks[step])
        sa = slope([float(s) for s in sizes], [float(a) for a, _ in peaks[step]])
        sr = slope([float(s) for s in sizes], [float(r) for _, r in peaks[step]])
        print(f"{step:<10} {cells}   {sa:>10.3f}  {sr:>10.3f}  {'yes' if sa <= 0.1 else 'NO'}")
    whole = [(u.peak_anon_bytes, u.peak_rss_bytes) for u in totals]
    cells = " ".join(f"{a / MiB:>7.0f}/{r / MiB:<7.0f}" for a, r in whole)
    sa = slope([float(s) for s in sizes], [float(a) for a, _ in whole])
    print(f"{'build':<10} {cells}   {sa:>10.3f}")
    print("wall s     " + " ".join(f"{u.seconds:>15.0f}" for u in totals))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="4,8,18", help="num_hidden_layers of the three models")
    parser.add_argument("--skip-limit", action="store_true", help="skip the build under a memory limit")
    parser.add_argument("--keep", type=Path, help="build here and keep the files (default: a temporary folder)")
    args = parser.parse_args()
    layers = [int(n) for n in args.layers.split(",")]
    with tempfile.TemporaryDirectory(dir=args.keep) as tmp, FakeHub() as hub:
        root = Path(tmp)
        sizes: list[int] = []
        peaks: dict[str, list[tuple[int, int]]] = {step: [] for step in STEPS}
        totals: list[memory_limit.Usage] = []
        for n in layers:
            shape = dataclasses.replace(BASE, num_hidden_layers=n)
            hf = deepseek_v3.cached(shape)
            vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
            sixteen = shape.params_16bit_bytes(vocab)
            repo = f"synthetic/deepseek-v3-{n}l"
            hub.add_repo(repo, hf)
            source = {"huggingface": {"repo": repo, "endpoint": hub.url}}
            usage = build(spec(source, root / f"storage-{n}"), root / f"run-{n}")
            if usage.returncode != 0:
                raise SystemExit(f"build of {repo} failed:\n{usage.output[-3000:]}")
            sizes.append(sixteen)
            totals.append(usage)
            for step in STEPS:
                peaks[step].append(usage.by_tag.get(step, (0, 0)))
            print(f"built {repo}: 16-bit {sixteen / GiB:.2f} GiB in {usage.seconds:.0f} s", flush=True)

        print_table(sizes, peaks, totals)

        if args.skip_limit:
            return
        why = memory_limit.available()
        if why is not None:
            print(f"\nno build under a memory limit: {why}")
            return
        largest = sizes[-1]
        limit = int(0.3 * largest) + GiB
        n = layers[-1]
        source = {"huggingface": {"repo": f"synthetic/deepseek-v3-{n}l", "endpoint": hub.url}}
        usage = build(spec(source, root / f"limited-{n}"), root / f"limited-run-{n}", limit=limit)
        report = json.loads((root / f"limited-run-{n}" / "report.json").read_text()) if usage.returncode == 0 else {}
        done = usage.returncode == 0 and report.get("status") == "Succeeded"
        print(
            f"\n== build of the {largest / GiB:.2f} GiB model under a memory cgroup of 0.3 x 16-bit + 1 GiB = "
            f"{limit / GiB:.2f} GiB: {'completed' if done else 'FAILED'} in {usage.seconds:.0f} s "
            f"(peak anonymous {usage.peak_anon_bytes / MiB:.0f} MiB, cgroup high-water incl. page cache "
            f"{(usage.cgroup_peak_bytes or 0) / MiB:.0f} MiB, OOM kill: {usage.oom_killed})"
        )
        if not done:
            print(usage.output[-3000:])


if __name__ == "__main__":
    main()
