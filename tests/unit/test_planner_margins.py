"""Margins learned per GPU product: only the largest excess is kept, capped, keyed safely."""

from __future__ import annotations

from kquant.operator.planner import margins

MiB = 1024 * 1024


def test_only_a_larger_excess_changes_the_table() -> None:
    data = margins.merged(None, "NVIDIA-H100-80GB-HBM3", 300 * MiB)
    assert data == {"NVIDIA-H100-80GB-HBM3": str(300 * MiB)}
    assert margins.merged(data, "NVIDIA-H100-80GB-HBM3", 200 * MiB) is None, "a smaller excess never shrinks it"
    assert margins.merged(data, "NVIDIA-H100-80GB-HBM3", 0) is None
    bigger = margins.merged(data, "NVIDIA-H100-80GB-HBM3", 400 * MiB)
    assert bigger is not None and margins.parse(bigger)["NVIDIA-H100-80GB-HBM3"] == 400 * MiB
    other = margins.merged(bigger, "Tesla T4", 10 * MiB)
    assert other is not None and set(other) == {"NVIDIA-H100-80GB-HBM3", "Tesla_T4"}


def test_a_forged_excess_is_capped_and_junk_is_skipped() -> None:
    data = margins.merged({"L4": "many"}, "L4", 10**15)
    assert data is not None and margins.parse(data) == {"L4": margins.MAX_LEARNED_BYTES}
    assert margins.parse({"A": "-5", "B": "x"}) == {"A": 0}


def test_learned_says_where_it_came_from() -> None:
    data = {"NVIDIA-L4": str(256 * MiB)}
    found = margins.learned(data, "NVIDIA-L4", "ConfigMap kquant-system/kquant-margins")
    assert found.bytes == 256 * MiB
    assert found.describe("NVIDIA-L4") == \
        "learned margin 0.25 GiB for NVIDIA-L4 from ConfigMap kquant-system/kquant-margins"
    assert margins.learned(data, "Tesla-T4", "x") == margins.Learned()
    assert margins.learned(data, None, "x").describe(None) == "no learned margin for this GPU"
