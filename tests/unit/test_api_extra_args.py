"""spec.serving.extraArgs: flags that change the weights, the memory or the placement are refused.

The API server's CEL rules are checked on the same cases through tests/integration/invalid_manifests.yaml;
tests/integration/test_server_flags_llamacpp.py checks every spelling against llama.cpp's own table."""

from __future__ import annotations

import pytest
from kquant.operator.api import v1alpha1 as api


def serving(*args: str) -> api.Serving:
    return api.Serving.model_validate({"variant": "q4km", "extraArgs": list(args)})


@pytest.mark.parametrize("flag", api.REFUSED_SERVER_FLAGS)
def test_every_refused_flag_is_refused(flag: str) -> None:
    with pytest.raises(ValueError, match="changes which weights load, the server's memory or where the weights go"):
        serving("--metrics", flag, "1")


@pytest.mark.parametrize(
    "arg", ["--hf_repo", "--n_cpu_moe", "--ubatch_size=512", "--override_tensor=exps=CPU", "-mu=https://x/m.gguf"]
)
def test_spellings_llama_cpp_reads_the_same_are_refused(arg: str) -> None:
    """llama.cpp reads ``--a_b`` as ``--a-b``, and a value glued on with ``=`` is still that flag."""
    with pytest.raises(ValueError, match="changes which weights load"):
        serving(arg)


def test_managed_flags_with_underscores_are_refused() -> None:
    with pytest.raises(ValueError, match="repeats a flag that kquant derives"):
        serving("--n_gpu_layers", "99")


def test_harmless_flags_pass() -> None:
    args = ["--metrics", "--jinja", "--no-webui", "--alias", "smollm2", "-to", "600", "--slots"]
    assert serving(*args).extra_args == args


def test_server_flag_normalises_like_llama_cpp() -> None:
    assert api.server_flag("--tensor_split=1,1") == "--tensor-split"
    assert api.server_flag("-ts") == "-ts"
    assert api.server_flag("-no_kvu") == "-no_kvu"  # single-dash flags are looked up as written
