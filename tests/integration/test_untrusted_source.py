"""Attacks from a model repository and its hub on the build, through the real quantizer CLI.

Each test is an attack that worked before kquant treated repository content as data: the local
hub stand-in (``tests/hub_server.py``) serves the hostile repository, the CLI runs as the Job
runs it (a subprocess with ``HF_TOKEN`` in its environment), huggingface_hub fetches for real
and llama.cpp's own converter converts for real.

* a tokenizer whose ``auto_map`` names the repo's own ``tokenization_*.py``, on an architecture
  whose converter passes ``trust_remote_code=True`` (StableLM without ``tokenizer.json`` takes
  the Qwen vocab path): the file wrote a marker with the token it saw and raised;
* a hub that lists file names escaping the download folder;
* a repository whose only weights are pickles;
* a Secret whose value ends in a newline (``echo $T > f``), and a hub whose errors quote the
  request's ``Authorization`` header: the token reached the report and the result ConfigMap;
* a mirror serving other bytes for the same repo@revision: its download was reused by a build
  that named another hub.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from fixtures import cluster_client, fake_tokens, hf_models, smollm2
from hub_server import FakeHub
from kquant.quantizer.report import ExitCode
from kubernetes import client

TOKEN = fake_tokens.hub_token()
EVIL_REPO = "attacker/stablelm-tiny"
EVIL_CODE = '''
import os, pathlib
pathlib.Path({marker!r}).write_text("ran; HF_TOKEN=" + str(os.environ.get("HF_TOKEN")))
raise RuntimeError("the repository's own tokenizer code ran")
'''


@dataclasses.dataclass
class Run:
    rc: int
    out: str
    report: dict[str, Any]


def run_cli(tmp: Path, spec: dict[str, Any], token: str | None = TOKEN + "\n") -> Run:
    """The quantizer CLI as the Job runs it; the token as a newline Secret leaves it by default."""
    path = tmp / f"spec-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(spec))
    report_path = path.with_suffix(".report.json")
    env = {**os.environ, "PYTHONSAFEPATH": "1", "HF_HOME": str(tmp / "hf-home")}
    env.pop("HF_TOKEN", None)
    if token is not None:
        env["HF_TOKEN"] = token
    done = subprocess.run(
        [sys.executable, "-P", "-m", "kquant.quantizer.cli", "run", "--spec", str(path), "--report", str(report_path)],
        capture_output=True, text=True, env=env, check=False, timeout=900,
    )  # fmt: skip
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    return Run(done.returncode, done.stdout + done.stderr, report)


def spec_for(hub: FakeHub, repo: str, root: Path, **source: Any) -> dict[str, Any]:
    return {
        "source": {"huggingface": {"repo": repo, "revision": "main", "endpoint": hub.url, **source}},
        "calibration": {"chunks": 1, "contextSize": 64},
        "convertType": "f16",
        "variants": [{"name": "q8", "type": "Q8_0"}],
        "evaluation": {"chunks": 1, "contextSize": 64},
        "storageRoot": str(root / "store"),
        "workDir": str(root / "work"),
        "threads": 2,
    }


def assert_no_token(*texts: str) -> None:
    for text in texts:
        assert TOKEN not in text, text[-3000:]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer random llama with SmolLM2's tokenizer: small enough to convert in seconds."""
    return hf_models.write_random_hf_like(
        tmp_path_factory.mktemp("tiny") / "llama", smollm2.hf_dir(), num_hidden_layers=1
    )


def evil_folder(tiny: Path, folder: Path, marker: Path) -> Path:
    """``tiny`` dressed as StableLM whose tokenizer is the repository's own Python class."""
    shutil.copytree(tiny, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["StableLmForCausalLM"], partial_rotary_factor=1.0, layer_norm_eps=1e-5,
                  use_parallel_residual=False)  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").unlink()  # StableLM without tokenizer.json takes the Qwen vocab path
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.update(tokenizer_class="EvilTokenizer",
                            auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (folder / "tokenization_evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    return folder


@pytest.mark.parametrize("allow_code", [False, True], ids=["default", "allowCodeFiles"])
def test_repository_code_never_runs(tiny_llama: Path, tmp_path: Path, allow_code: bool) -> None:
    marker = tmp_path / "marker"
    folder = evil_folder(tiny_llama, tmp_path / "evil", marker)
    with FakeHub() as hub:
        hub.add_repo(EVIL_REPO, folder, token=TOKEN)
        switch = {"allowCodeFiles": True} if allow_code else {}
        run = run_cli(tmp_path, spec_for(hub, EVIL_REPO, tmp_path, **switch), token=TOKEN)
        fetched = {r.path.rsplit("/", 1)[-1] for r in hub.requests if "/resolve/" in r.path}
    assert not marker.exists(), f"the repository's code ran: {marker.read_text()}"
    assert run.rc == 1, run.out[-3000:]
    assert run.report["failedStep"] == "convert", run.report
    assert "never runs code from a model repository" in run.report["reason"]
    assert ("tokenization_evil.py" in fetched) is allow_code
    assert_no_token(run.out, json.dumps(run.report))


def test_hub_file_names_that_escape_the_folder_are_refused(tiny_llama: Path, tmp_path: Path) -> None:
    with FakeHub() as hub:
        hub.add_repo("attacker/names", tiny_llama, extra_names=("../../escaped.json",))
        run = run_cli(tmp_path, spec_for(hub, "attacker/names", tmp_path), token=None)
        downloads = [r.path for r in hub.requests if "/resolve/" in r.path]
    assert run.rc == ExitCode.PERMANENT and run.report["failedStep"] == "fetch", run.out[-3000:]
    assert "'../../escaped.json', which has '..'" in run.report["reason"]
    assert downloads == [], "nothing may be downloaded from a hub that lists such a name"
    assert not list(tmp_path.rglob("escaped.json"))


def test_pickled_weights_are_not_fetched_and_the_error_names_the_switch(tmp_path: Path) -> None:
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with FakeHub() as hub:
        hub.add_repo("old/pickles", folder)
        run = run_cli(tmp_path, spec_for(hub, "old/pickles", tmp_path), token=None)
        downloads = [r.path for r in hub.requests if "/resolve/" in r.path]
    assert run.rc == ExitCode.PERMANENT and run.report["failedStep"] == "fetch", run.out[-3000:]
    assert "only as pickles (pytorch_model.bin)" in run.report["reason"]
    assert "source.huggingface.allowPickles" in run.report["reason"]
    assert not any(p.endswith("pytorch_model.bin") for p in downloads)


def test_newline_token_fetches_a_private_repo(tiny_llama: Path, tmp_path: Path) -> None:
    """``echo $T > f; kubectl create secret --from-file``: the trailing newline is not the token's."""
    with FakeHub() as hub:
        hub.add_repo("team/private", tiny_llama, token=TOKEN)
        spec = spec_for(hub, "team/private", tmp_path, allowPatterns=["*.json"])
        run = run_cli(tmp_path, spec)
    # config.json without weights: the build stops after a fetch that succeeded
    assert [s["step"] for s in run.report["steps"]] == ["fetch"], run.out[-3000:]
    assert "no *.safetensors weights" in run.report["reason"]
    assert_no_token(run.out, json.dumps(run.report))


def test_token_never_reaches_what_a_user_reads(
    tiny_llama: Path, tmp_path: Path, cluster: cluster_client.Cluster, namespace: str
) -> None:
    """A private repo on a hub whose error quotes the Authorization header, and a newline Secret:
    neither the report, the result ConfigMap (status, conditions and Events are made from it)
    nor the log (the pod's termination message) carries the token."""
    api = client.CoreV1Api(cluster.api_client())
    api.create_namespaced_config_map(namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="build")))
    with FakeHub() as hub:
        hub.add_repo("team/echo", tiny_llama, token=TOKEN, echo_authorization=True)
        spec = spec_for(hub, "team/echo", tmp_path, allowPatterns=["*.json"])
        spec["resultConfigMap"] = {"name": "build", "namespace": namespace}
        run = run_cli(tmp_path, spec)
        sent = {r.authorization for r in hub.requests}
    assert f"Bearer {TOKEN}" in sent  # the stripped token did reach the hub, and nothing else did
    assert run.rc == ExitCode.FAILED and run.report["failedStep"] == "fetch", run.out[-3000:]
    data = api.read_namespaced_config_map("build", namespace).data
    assert data["progress"].startswith("failed: ")
    assert_no_token(run.out, json.dumps(run.report), json.dumps(data))


def test_a_mirror_download_is_not_reused_for_another_origin(tiny_llama: Path, tmp_path: Path) -> None:
    """Two hubs claim the same repo@revision (same commit id) with different bytes: the build that
    names the second one downloads from it, into its own work folder."""
    honest = tmp_path / "honest"
    shutil.copytree(tiny_llama, honest)
    poisoned = tmp_path / "poisoned"
    shutil.copytree(tiny_llama, poisoned)
    config = json.loads((poisoned / "config.json").read_text())
    (poisoned / "config.json").write_text(json.dumps({**config, "poisoned": True}))
    with FakeHub() as mirror, FakeHub() as hub:
        commit = hub.add_repo("org/model", honest).commit
        mirror.add_repo("org/model", poisoned).commit = commit
        patterns = {"allowPatterns": ["config.json"]}
        first = run_cli(tmp_path, spec_for(mirror, "org/model", tmp_path, **patterns), token=None)
        assert first.report["steps"][0]["step"] == "fetch" and not first.report["steps"][0]["skipped"]
        second = run_cli(tmp_path, spec_for(hub, "org/model", tmp_path, **patterns), token=None)
        hub_downloads = [r.path for r in hub.requests if "/resolve/" in r.path]
    fetch_step = second.report["steps"][0]
    assert fetch_step["step"] == "fetch" and not fetch_step["skipped"], second.report
    assert any(p.endswith("/config.json") for p in hub_downloads), "the build reused the mirror's download"
    configs = {json.loads(p.read_text()).get("poisoned", False) for p in (tmp_path / "work").rglob("config.json")}
    assert configs == {True, False}  # one work folder per origin


GUARDED_LOAD = """
import sys
from kquant.quantizer import untrusted
untrusted.forbid_remote_code()
import transformers
try:
    transformers.AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
except untrusted.RemoteCodeError as exc:
    print("refused:", exc)
"""


def test_guard_refuses_remote_code_even_when_the_caller_trusts_it(tiny_llama: Path, tmp_path: Path) -> None:
    """The in-process guard (the imatrix step's): transformers asked with trust_remote_code=True."""
    marker = tmp_path / "marker"
    folder = evil_folder(tiny_llama, tmp_path / "evil", marker)
    done = subprocess.run([sys.executable, "-P", "-c", GUARDED_LOAD, str(folder)], capture_output=True, text=True,
                          check=False, timeout=300)  # fmt: skip
    assert not marker.exists()
    assert "refused: the model at" in done.stdout, done.stdout + done.stderr


TRUSTING_LOAD = """
import sys
from kquant.quantizer import untrusted
untrusted.forbid_remote_code()
import transformers
tokenizer = transformers.AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
config = transformers.AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)
print("loaded", type(tokenizer).__name__, type(config).__name__)
"""


def test_auto_map_beside_a_known_class_is_ignored(tiny_llama: Path, tmp_path: Path) -> None:
    """Real repositories (DeepSeek-R1, for one) name their own code in ``auto_map`` for classes that
    transformers has: those load with transformers' class and no code is looked for."""
    folder = tmp_path / "repo"
    shutil.copytree(tiny_llama, folder)
    for name, key in (("config.json", "AutoConfig"), ("tokenizer_config.json", "AutoTokenizer")):
        data = json.loads((folder / name).read_text())
        target: Any = "configuration_x.XConfig" if key == "AutoConfig" else ["tokenization_x.XTokenizer", None]
        (folder / name).write_text(json.dumps({**data, "auto_map": {key: target}}))
    done = subprocess.run([sys.executable, "-P", "-c", TRUSTING_LOAD, str(folder)], capture_output=True, text=True,
                          check=False, timeout=300)  # fmt: skip
    assert "loaded" in done.stdout and "LlamaConfig" in done.stdout, done.stdout + done.stderr[-3000:]
