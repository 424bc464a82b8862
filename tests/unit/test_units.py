"""Sizes and quantities: the one parser and formatter every layer uses."""

import pytest
from kquant.quantizer import units


@pytest.mark.parametrize(
    ("text", "expected"),
    [("200Gi", 200 * 2**30), ("64G", 64e9), ("500m", 0.5), ("1e3", 1000.0), ("2", 2.0), (".5Ki", 512.0)],
)
def test_parse_quantity_reads_binary_decimal_and_exponent_suffixes(text: str, expected: float) -> None:
    assert units.parse_quantity(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["16GB", "1 Gi", "Gi", "", "1.2.3"])
def test_parse_quantity_refuses_what_the_api_server_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="is not a Kubernetes quantity"):
        units.parse_quantity(text)


def test_quantity_bytes_is_none_when_unset_and_whole_bytes_otherwise() -> None:
    assert units.quantity_bytes(None) is None
    assert units.quantity_bytes("128Gi") == 128 * 2**30
    assert units.quantity_bytes(1000) == 1000


def test_whole_quantity_counts_gpus_and_refuses_fractions() -> None:
    assert units.whole_quantity(None) == 0
    assert units.whole_quantity("") == 0
    assert units.whole_quantity("8") == 8
    assert units.whole_quantity(2) == 2
    with pytest.raises(ValueError, match="not a whole number"):
        units.whole_quantity("1.5")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("24GiB", 24 * 2**30), ("24G", 24 * 2**30), ("81559MiB", 81559 * 2**20), ("1024", 1024), ("0.5 TB", 2**39)],
)
def test_parse_size_reads_vendor_sizes_as_binary(text: str, expected: int) -> None:
    assert units.parse_size(text) == expected


def test_parse_size_names_the_bad_text() -> None:
    with pytest.raises(ValueError, match="'lots' is not a size such as 24GiB"):
        units.parse_size("lots")


def test_formatters() -> None:
    assert units.gib(int(23.5 * 2**30)) == "23.50 GiB"
    assert units.gib(2**30, digits=3) == "1.000 GiB"
    assert units.human_size(int(131.4 * 2**30)) == "131.4GiB"
    assert units.human_size(int(98.9 * 2**20)) == "98.9MiB"
    assert units.human_size(512) == "512"


def test_whole_quantity_names_the_value_it_refuses() -> None:
    with pytest.raises(ValueError, match=r"^GPU quantity 'abc' is not a Kubernetes quantity$"):
        units.whole_quantity("abc", "GPU quantity")
    with pytest.raises(ValueError, match=r"^GPU quantity '1\.5' is not a whole number$"):
        units.whole_quantity("1.5", "GPU quantity")
