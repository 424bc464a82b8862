"""The quantizer end to end on a real model: SmolLM2-135M-Instruct, fetched through a fake hub.

Every step runs for real: huggingface_hub downloads from ``tests/hub_server.py`` (with a dropped
connection half-way through the weights), llama.cpp's converter writes the f16 GGUF, torch computes
the importance matrix, llama.cpp quantizes and evaluates, and the CLI is run as a subprocess so
exit codes and stderr are what a Job would see. The first run is shared by the tests of this
module; failures reuse its cached intermediates through ``workDir``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fit_params
import pytest
from fixtures import cluster_client, gguf_split, smollm2
from hub_server import FakeHub
from kquant.quantizer import fetch, settings, shards, space
from kquant.quantizer.report import ExitCode
from kubernetes import client

REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
TOKEN = "hf_test_token_never_printed"
PATTERNS = ["*.json", "*.safetensors", "*.jinja"]


@dataclasses.dataclass
class Run:
    rc: int
    out: str
    report: dict[str, Any]
    seconds: float


@dataclasses.dataclass
class Env:
    hub: FakeHub
    work: Path
    tmp: Path

    def spec(self, root: Path, **changes: Any) -> dict[str, Any]:
        base: dict[str, Any] = {
            "source": {
                "huggingface": {"repo": REPO, "revision": "main", "allowPatterns": PATTERNS, "endpoint": self.hub.url}
            },
            "calibration": {"chunks": 2, "contextSize": 256},
            "convertType": "f16",
            "variants": [{"name": "q4km", "type": "Q4_K_M"}],
            "evaluation": {"chunks": 2, "contextSize": 256, "maxKLDivergence": 1.0, "smokeTokens": 12},
            "storageRoot": str(root),
            "workDir": str(self.work),
            "threads": 2,
        }
        base.update(changes)
        return base

    def run(self, spec: dict[str, Any], *args: str, command: str = "run") -> Run:
        path = self.tmp / f"spec-{time.monotonic_ns()}.json"
        path.write_text(json.dumps(spec))
        report_path = path.with_suffix(".report.json")
        extra = ["--report", str(report_path)] if command == "run" else []
        env = {**os.environ, "HF_TOKEN": TOKEN, "PYTHONSAFEPATH": "1", "HF_HOME": str(self.tmp / "hf-home")}
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-P", "-m", "kquant.quantizer.cli", command, "--spec", str(path), *extra, *args],
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=900,
        )
        seconds = time.perf_counter() - start
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
        return Run(done.returncode, done.stdout + done.stderr, report, seconds)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("quantizer")
    with FakeHub() as hub:
        hub.add_repo(REPO, smollm2.hf_dir(), token=TOKEN)
        yield Env(hub, tmp / "work", tmp)


@pytest.fixture(scope="module")
def first(env: Env) -> tuple[Run, Path]:
    """One full build of two variants, with the weights' download cut off half-way once."""
    env.hub.fail("model.safetensors", after_bytes=100_000_000)
    root = env.tmp / "store"
    spec = env.spec(
        root, variants=[{"name": "q4km", "type": "Q4_K_M"}, {"name": "dyn", "type": "Q4_K_M", "recipe": "dynamic"}]
    )
    return env.run(spec), root


def assert_nothing_final(root: Path) -> None:
    """No model file and no report under a final name; staging folders cleaned up."""
    if not root.exists():
        return
    for d in root.iterdir():
        if d.name.startswith("."):
            continue
        names = [p.name for p in d.iterdir()]
        assert not any(n.endswith(".gguf") or n == "report.json" for n in names), (d, names)


def test_full_build(env: Env, first: tuple[Run, Path]) -> None:
    run, root = first
    assert run.rc == 0, run.out[-3000:]
    assert "Traceback" not in run.out
    assert TOKEN not in run.out and TOKEN not in json.dumps(run.report)
    report = run.report
    assert report["status"] == "Succeeded"
    assert report["sourceRevision"] == env.hub.repos[REPO].commit
    assert [s["step"] for s in report["steps"]] == [
        "fetch",
        "convert",
        "calibrate",
        "reference",
        "quantize-q4km",
        "evaluate-q4km",
        "publish-q4km",
        "quantize-dyn",
        "evaluate-dyn",
        "publish-dyn",
    ]
    # the download was cut at 100 MB and resumed with a Range request, with the token
    gets = [r for r in env.hub.requests if r.method == "GET" and r.path.endswith("/model.safetensors")]
    assert any(r.range and r.range.startswith("bytes=") and r.range != "bytes=0-" for r in gets)
    assert all(r.authorization == f"Bearer {TOKEN}" for r in env.hub.requests)
    for v in report["variants"]:
        folder = root / v["digest"]
        model = Path(v["path"])
        assert model.parent == folder and model.is_file()
        assert sorted(p.name for p in folder.iterdir()) == sorted([model.name, "report.json"])
        assert fetch.sha256_file(model) == v["sha256"] and model.stat().st_size == v["sizeBytes"]
        assert json.loads((folder / "report.json").read_text())["sha256"] == v["sha256"]
        assert 4.0 < v["bitsPerWeight"] < 8.0
        assert v["facts"]["block_count"] == 30 and v["facts"]["architecture"] == "llama"
        assert sum(v["tensorTypes"].values()) == 272
        m = v["metrics"]
        assert 0 < m["klDivergence"] < 1.0 and 0.5 < m["top1Agreement"] <= 1.0
        assert m["smoke"]["passed"] and m["smoke"]["bosCount"] <= 1 and m["smoke"]["text"].strip()
        assert v["gatePassed"]
    q4km, dyn = report["variants"]
    assert q4km["tensorTypes"] != dyn["tensorTypes"]


def test_second_run_skips_every_step(env: Env, first: tuple[Run, Path]) -> None:
    run0, root = first
    spec = env.spec(
        root, variants=[{"name": "q4km", "type": "Q4_K_M"}, {"name": "dyn", "type": "Q4_K_M", "recipe": "dynamic"}]
    )
    run = env.run(spec)
    assert run.rc == 0, run.out[-2000:]
    assert all(s["skipped"] for s in run.report["steps"]), run.report["steps"]
    assert [v["sha256"] for v in run.report["variants"]] == [v["sha256"] for v in run0.report["variants"]]


def test_new_threshold_regates_without_rebuilding(env: Env, first: tuple[Run, Path]) -> None:
    _, root = first
    evaluation = {"chunks": 2, "contextSize": 256, "maxKLDivergence": 1e-6, "smokeTokens": 12}
    spec = env.spec(root, evaluation=evaluation, variants=[{"name": "q4km", "type": "Q4_K_M"}])
    run = env.run(spec)
    assert run.rc == 0, run.out[-2000:]
    assert all(s["skipped"] for s in run.report["steps"]), run.report["steps"]
    v = run.report["variants"][0]
    assert not v["gatePassed"] and "> maxKLDivergence 1e-06" in v["gate"]["reasons"][0]
    on_disk = json.loads((root / v["digest"] / "report.json").read_text())
    assert on_disk["gatePassed"] is False and on_disk["sha256"] == v["sha256"]


def test_plan_is_a_dry_run(env: Env, first: tuple[Run, Path]) -> None:
    root = env.tmp / "plan-store"
    spec = env.spec(root, variants=[{"name": "dyn", "type": "Q4_K_M", "recipe": "dynamic"}])
    run = env.run(spec, "--variant", "dyn", command="plan")
    assert run.rc == 0, run.out[-2000:]
    assert "blk.0.ffn_down.weight" in run.out and "total" in run.out
    assert_nothing_final(root)
    unknown = env.run(spec, "--variant", "nope", command="plan")
    assert unknown.rc == 2 and "no entry named 'nope'" in unknown.out


def test_fetch_resumes_after_the_process_dies(env: Env, tmp_path: Path) -> None:
    """More failures than huggingface_hub retries: the run fails, the next one resumes the file."""
    src = settings.HuggingFaceSource(repo=REPO, endpoint=env.hub.url, allow_patterns=("model.safetensors",))
    dest = tmp_path / "dl"
    # cut after 30 MB, then the hub is down: huggingface_hub gives up, the pod "dies"
    env.hub.fail("model.safetensors", after_bytes=30_000_000)
    env.hub.outage("model.safetensors", times=1)
    with pytest.raises(fetch.FetchError, match="HTTP 503"):
        fetch.fetch(src, dest, env={"HF_TOKEN": TOKEN}, attempts=1)
    partial = fetch.partial_path(dest, "model.safetensors")
    assert partial.is_file() and partial.stat().st_size > 0
    mark = len(env.hub.requests)
    done = fetch.fetch(src, dest, env={"HF_TOKEN": TOKEN})
    resumed = [r for r in env.hub.requests[mark:] if r.method == "GET" and r.path.endswith("model.safetensors")]
    assert resumed and resumed[0].range is not None and resumed[0].range != "bytes=0-"
    assert (dest / "model.safetensors").stat().st_size == done.files[0].size


def test_corrupt_download_is_caught_by_sha256(env: Env, tmp_path: Path) -> None:
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    env.hub.add_repo("test/corrupt", folder)
    env.hub.corrupt("model.safetensors", True)
    try:
        src = settings.HuggingFaceSource(repo="test/corrupt", endpoint=env.hub.url)
        with pytest.raises(fetch.FetchError, match="sha256") as err:
            fetch.fetch(src, tmp_path / "dl", env={})
        assert "rerun" in str(err.value)
        assert not (tmp_path / "dl" / "model.safetensors").exists()
    finally:
        env.hub.corrupt("model.safetensors", False)


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ({"repo": "nobody/missing"}, "source.huggingface.repo 'nobody/missing' was not found"),
        ({"repo": REPO, "revision": "0" * 40}, f"source.huggingface.revision '{'0' * 40}' does not exist"),
        ({"repo": REPO, "allowPatterns": ["*.bin"]}, "match none of the"),
    ],
)
def test_bad_source(env: Env, source: dict[str, Any], reason: str) -> None:
    root = env.tmp / "bad-source"
    spec = env.spec(root, source={"huggingface": {"endpoint": env.hub.url, **source}})
    run = env.run(spec)
    assert run.rc == ExitCode.PERMANENT and "Traceback" not in run.out
    assert run.report["status"] == "Failed" and run.report["failedStep"] == "fetch"
    assert reason in run.report["reason"], run.report["reason"]
    assert reason in run.out
    assert_nothing_final(root)


def test_unknown_type_is_a_spec_error(env: Env) -> None:
    spec = env.spec(env.tmp / "x", variants=[{"name": "q", "type": "Q4_K_X"}])
    run = env.run(spec)
    assert run.rc == 2 and "Traceback" not in run.out
    assert "variants[0].type" in run.out and "Q4_K_X" in run.out


def test_budget_no_mix_can_meet(env: Env, first: tuple[Run, Path]) -> None:
    root = env.tmp / "budget"
    spec = env.spec(root, variants=[{"name": "tiny", "type": "Q4_K_M", "recipe": "dynamic", "targetSizeGiB": 0.01}])
    run = env.run(spec)
    assert run.rc == ExitCode.PERMANENT and "Traceback" not in run.out, run.out[-2000:]
    assert run.report["failedStep"] == "plan-tiny"
    assert "variants[0] (tiny)" in run.report["reason"] and "GiB" in run.report["reason"]
    assert_nothing_final(root)


@contextlib.contextmanager
def tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A real small file system: a tmpfs of ``size`` mounted at ``mount`` (needs root)."""
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True,
                          check=False)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "small", "40m") as mount:
        yield mount


def fill_when(trigger: Callable[[], bool], disk: Path) -> threading.Thread:
    """Fill ``disk`` to the last byte once ``trigger()`` holds: another writer taking the space
    after a step's free-space check passed, so the step meets ENOSPC half-way through its write."""

    def run() -> None:
        deadline = time.monotonic() + 300
        while not trigger() and time.monotonic() < deadline:
            time.sleep(0.01)
        with contextlib.suppress(OSError), (disk / "ballast").open("wb") as f:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_full_disk(env: Env, first: tuple[Run, Path], small_disk: Path) -> None:
    spec = env.spec(small_disk, variants=[{"name": "q8", "type": "Q8_0"}], storageClaim="m-storage")
    run = env.run(spec)
    assert run.rc == ExitCode.PERMANENT and "Traceback" not in run.out, run.out[-2000:]
    assert run.report["failedStep"] == "plan-q8" or run.report["failedStep"].startswith("quantize")
    reason = run.report["reason"]
    assert "storage claim m-storage" in reason and "GiB free, but variant q8 needs about 0.1" in reason, reason
    assert "grow spec.storage.pvc.size by at least" in reason
    assert_nothing_final(small_disk)


def test_claim_too_small_is_refused_before_the_download(env: Env, small_disk: Path) -> None:
    """The hub's listing and config.json size the whole build: a 40 MB claim is refused with the number
    it needs before a byte of the weights is fetched."""
    spec = env.spec(small_disk)
    del spec["workDir"]  # intermediates on the 40 MB disk too
    mark = len(env.hub.requests)
    run = env.run(spec)
    assert run.rc == ExitCode.PERMANENT and "Traceback" not in run.out, run.out[-2000:]
    assert run.report["failedStep"] == "fetch"
    reason = run.report["reason"]
    assert "but this build (download 0.25 GiB, 16-bit GGUF 0.25 GiB" in reason, reason
    assert re.search(r"needs about 0\.\d\d GiB: grow spec\.storage\.pvc\.size by at least 0\.\d\d GiB", reason), reason
    weights = [r for r in env.hub.requests[mark:] if r.method == "GET" and r.path.endswith(".safetensors")]
    assert not weights
    assert run.report["sizing"]["claimBytes"] > 500_000_000
    assert not list(small_disk.rglob("*.safetensors*")) and not list(small_disk.rglob("*.part"))


def test_full_disk_during_the_download_removes_the_partial_file(env: Env, tmp_path: Path) -> None:
    """The space check passes, then another writer fills the disk: the partial file is removed (it
    cannot complete) and the reason says how much the download needs."""
    src = settings.HuggingFaceSource(repo=REPO, endpoint=env.hub.url, allow_patterns=("model.safetensors",))
    with tmpfs(tmp_path / "disk", "300m") as disk:
        dest = disk / "dl"
        part = fetch.partial_path(dest, "model.safetensors")
        fill_when(lambda: part.is_file() and part.stat().st_size > 20_000_000, disk)
        with pytest.raises(space.NoSpaceError) as err:
            fetch.fetch(src, dest, env={"HF_TOKEN": TOKEN}, attempts=1)
        assert "is full while writing the download of" in str(err.value) and "it needs about 0.25 GiB" in str(err.value)
        assert not part.exists() and not (dest / "model.safetensors").exists()


def test_full_disk_during_conversion(env: Env, tmp_path: Path) -> None:
    """The converter meets ENOSPC after the check passed: its partial shards are removed and the
    reason says how much the 16-bit GGUF needs."""
    with tmpfs(tmp_path / "disk", "300m") as disk:
        spec = env.spec(tmp_path / "store", source={"local": {"path": str(smollm2.hf_dir())}}, workDir=str(disk))
        fill_when(lambda: any(disk.rglob(".base-f16.partial/*.gguf")), disk)
        run = env.run(spec)
        # the converter's own traceback is logged; kquant's report and last words have none
        assert run.rc == ExitCode.PERMANENT, run.out[-2000:]
        assert "Traceback" not in run.out.split("kquant-quantize: build failed")[-1], run.out[-2000:]
        assert run.report["failedStep"] == "convert"
        reason = run.report["reason"]
        assert "is full while writing the f16 GGUF" in reason and "it needs about 0.25 GiB" in reason, reason
        assert not list(disk.rglob("*.gguf"))


def test_conversion_that_cannot_fit_is_refused(env: Env, small_disk: Path, tmp_path: Path) -> None:
    spec = env.spec(tmp_path / "store", source={"local": {"path": str(smollm2.hf_dir())}}, workDir=str(small_disk))
    run = env.run(spec)
    assert run.rc == ExitCode.PERMANENT and "Traceback" not in run.out, run.out[-2000:]
    assert run.report["failedStep"] == "convert"
    # 0.25 GiB of f16 weights (read from the safetensors headers) and the 2% margin
    assert re.search(r"has 0\.0\d GiB free, but the f16 GGUF \(convert\) needs about 0\.2\d GiB", run.report["reason"])
    assert not list(small_disk.rglob("*.gguf"))


def test_gguf_source_is_published_as_it_is(env: Env, tmp_path: Path) -> None:
    root = tmp_path / "store"
    spec = env.spec(
        root, source={"local": {"path": str(smollm2.gguf_path())}}, variants=[{"name": "orig", "type": "Q4_1"}]
    )
    run = env.run(spec)
    assert run.rc == 0, run.out[-2000:]
    assert [s["step"] for s in run.report["steps"]] == ["evaluate-orig", "publish-orig"]
    v = run.report["variants"][0]
    assert v["recipe"] == "as-is" and v["type"] == "Q4_1"
    assert v["metrics"]["klDivergence"] is None and v["metrics"]["perplexity"] > 1
    assert not v["gatePassed"] and "no 16-bit reference" in v["gate"]["reasons"][0]
    assert fetch.sha256_file(Path(v["path"])) == fetch.sha256_file(smollm2.gguf_path())


def test_split_gguf_from_the_hub(env: Env, tmp_path: Path) -> None:
    folder = tmp_path / "split-repo"
    shards = gguf_split.split(smollm2.gguf_path(), folder, "SmolLM2-Q4_1", max_tensors=150)
    (folder / "README.md").write_text("split test repo")
    env.hub.add_repo("test/split", folder)
    root = tmp_path / "store"
    source = {"huggingface": {"repo": "test/split", "endpoint": env.hub.url, "allowPatterns": ["*Q4_1*"]}}
    run = env.run(
        env.spec(
            root,
            source=source,
            variants=[{"name": "orig", "type": "Q4_1"}],
            evaluation={"chunks": 1, "contextSize": 128},
        )
    )
    assert run.rc == 0, run.out[-2000:]
    v = run.report["variants"][0]
    assert [f["name"] for f in v["files"]] == [s.name for s in shards]
    assert v["facts"]["shards"] == 2 and Path(v["path"]).name == shards[0].name
    # a shard missing from the repository: a clear reason, nothing published
    shards[1].unlink()
    env.hub.add_repo("test/split-broken", folder)
    source["huggingface"]["repo"] = "test/split-broken"
    broken = env.run(env.spec(tmp_path / "store2", source=source, variants=[{"name": "orig", "type": "Q4_1"}]))
    assert broken.rc == ExitCode.PERMANENT
    assert "missing shard(s) SmolLM2-Q4_1-00002-of-00002.gguf" in broken.report["reason"]


def _ask_llama_server(model: Path, question: str) -> str:
    """Start llama-server on ``model`` (a first shard: it finds the others by name), ask one question."""
    binary = Path(os.environ.get("KQUANT_LLAMA_BIN", fit_params.DEFAULT_BIN)) / "llama-server"
    if not binary.is_file():
        pytest.skip(f"{binary} is missing (hack/build-llama.sh builds it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-c", "512", "-t", "2",
           "--no-webui"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        body = json.dumps({"messages": [{"role": "user", "content": question}], "max_tokens": 16,
                           "temperature": 0}).encode()  # fmt: skip
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=120) as response:
            answer: str = json.loads(response.read())["choices"][0]["message"]["content"]
        return answer
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_sharded_build(env: Env, tmp_path: Path) -> None:
    """With a 100 MB shard size the 16-bit GGUF (270 MB) is converted into shards, the variant keeps
    that split, every shard is published with its own sha256, the facts count all shards, and
    llama.cpp loads the first shard: the evaluation's smoke test and llama-server both answer."""
    root, work = tmp_path / "store", tmp_path / "work"
    spec = env.spec(
        root,
        source={"local": {"path": str(smollm2.hf_dir())}},
        variants=[{"name": "q4km", "type": "Q4_K_M"}],
        workDir=str(work),
        maxShardBytes=100_000_000,
    )
    run = env.run(spec)
    assert run.rc == 0, run.out[-3000:]
    base = sorted(work.rglob("model-f16-*-of-*.gguf"))
    count = len(base)
    assert count >= 3 and all(f.stat().st_size <= 100_000_000 for f in base), base
    assert [f.name for f in base] == shards.names_like("model-f16", count)
    v = run.report["variants"][0]
    names = [f["name"] for f in v["files"]]
    assert names == shards.names_like("q4km", count)
    folder = root / v["digest"]
    assert sorted(p.name for p in folder.iterdir()) == sorted([*names, "report.json"])
    for entry in v["files"]:
        path = folder / entry["name"]
        assert fetch.sha256_file(path) == entry["sha256"] and path.stat().st_size == entry["sizeBytes"]
    assert v["sizeBytes"] == sum(f["sizeBytes"] for f in v["files"]) and v["sha256"] == v["files"][0]["sha256"]
    assert Path(v["path"]) == folder / names[0]
    assert v["facts"]["shards"] == count and v["facts"]["block_count"] == 30
    assert sum(v["tensorTypes"].values()) == 272
    assert v["metrics"]["smoke"]["passed"] and v["metrics"]["klDivergence"] < 1.0
    assert _ask_llama_server(Path(v["path"]), "Name a colour.").strip()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_gguf_source(env: Env, tmp_path: Path, damage: str) -> None:
    bad = tmp_path / "bad.gguf"
    if damage == "truncated":
        with smollm2.gguf_path().open("rb") as f:
            bad.write_bytes(f.read(40_000_000))
    else:
        bad.write_bytes(b"GGUF" + os.urandom(4096))
    root = tmp_path / "store"
    run = env.run(env.spec(root, source={"local": {"path": str(bad)}}, variants=[{"name": "v", "type": "Q4_1"}]))
    assert run.rc == ExitCode.PERMANENT and "Traceback" not in run.out, run.out[-2000:]
    assert "bad.gguf is corrupt or truncated" in run.report["reason"]
    assert_nothing_final(root)


def test_report_lands_in_the_configmap(env: Env, cluster: cluster_client.Cluster, namespace: str) -> None:
    """With resultConfigMap set, progress and the final report are patched into the real API."""
    api = client.CoreV1Api(cluster.api_client())
    api.create_namespaced_config_map(namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="build")))
    spec = env.spec(
        env.tmp / "cm",
        source={"huggingface": {"repo": "nobody/missing", "endpoint": env.hub.url}},
        resultConfigMap={"name": "build", "namespace": namespace},
    )
    run = env.run(spec)
    assert run.rc == ExitCode.PERMANENT
    data = api.read_namespaced_config_map("build", namespace).data
    assert data["progress"].startswith("failed: source.huggingface.repo 'nobody/missing'")
    assert json.loads(data["report"])["status"] == "Failed"
    shutil.rmtree(env.tmp / "cm", ignore_errors=True)


def test_unsupported_architecture_fails_in_convert(env: Env, tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    shutil.copytree(smollm2.hf_dir(), folder, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["NopeForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    root = tmp_path / "store"
    run = env.run(env.spec(root, source={"local": {"path": str(folder)}}))
    assert run.rc == 1 and "Traceback" not in run.out.split("kquant-quantize: build failed")[-1]
    assert run.report["failedStep"] == "convert"
    assert "NopeForCausalLM is not supported" in run.report["reason"]
    assert not list((tmp_path / "store").rglob("*.gguf"))


def test_16_bit_gguf_source_is_quantized(env: Env, first: tuple[Run, Path], tmp_path: Path) -> None:
    """A GGUF that still has 16-bit weights is a reference and a quantization source (no imatrix).

    ``first`` has converted SmolLM2 into the shared work folder; its f16 GGUF is the source here."""
    f16 = next(env.work.rglob("model-f16.gguf"))
    store = tmp_path / "store"
    run = env.run(env.spec(store, source={"local": {"path": str(f16)}}, variants=[{"name": "q8", "type": "Q8_0"}]))
    assert run.rc == 0, run.out[-2000:]
    assert [s["step"] for s in run.report["steps"]] == ["reference", "quantize-q8", "evaluate-q8", "publish-q8"]
    v = run.report["variants"][0]
    assert v["tensorTypes"].get("Q8_0", 0) > 100 and 0 <= v["metrics"]["klDivergence"] < 0.05


def test_the_last_build_removes_the_intermediates_when_asked(env: Env, first: tuple[Run, Path], tmp_path: Path) -> None:
    """``removeIntermediates`` (the operator's ``spec.storage.keepIntermediates: false``) empties
    the work folder after a successful build; the published variant and the source stay."""
    f16 = next(env.work.rglob("model-f16.gguf"))
    store, work = tmp_path / "store", tmp_path / "work"
    spec = env.spec(store, source={"local": {"path": str(f16)}}, variants=[{"name": "q8", "type": "Q8_0"}],
                    workDir=str(work), removeIntermediates=True)
    run = env.run(spec)
    assert run.rc == 0, run.out[-2000:]
    assert "removed the intermediates" in run.out
    left = [p for p in work.rglob("*") if p.is_file()]
    assert left and all(p.name == ".lock" for p in left), left
    assert Path(run.report["variants"][0]["path"]).is_file() and f16.is_file()
