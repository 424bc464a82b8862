"""``kquant promote``: a one-line edit that keeps comments and formatting, refusing undeclared variants."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest
import yaml
from kquant.operator import cli
from kquant.operator.commands import common, promote
from typer.testing import CliRunner

REPO = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples/04-promotion/quantizedmodel.yaml"
runner = CliRunner()


@pytest.fixture
def manifest(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "quantizedmodel.yaml"
    shutil.copy(EXAMPLE, path)
    return path


def test_promote_changes_one_line_and_keeps_comments(manifest: pathlib.Path) -> None:
    before = manifest.read_text()
    result = runner.invoke(cli.app, ["promote", str(manifest), "--variant", "q4km"])
    assert result.exit_code == 0, result.output
    after = manifest.read_text()
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b]
    comment = "# promote: change to q4km (or dyn) in Git and let it sync"
    assert changed == [(f"    variant: q8                       {comment}",
                        f"    variant: q4km                     {comment}")]
    assert "-    variant: q8 " in result.output and "+    variant: q4km " in result.output
    assert result.output.startswith(f"--- a/{manifest}")
    assert yaml.safe_load(after)["spec"]["serving"]["variant"] == "q4km"


def test_the_diff_is_what_git_sees(manifest: pathlib.Path) -> None:
    git = ["git", "-C", str(manifest.parent), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", manifest.name], check=True)
    subprocess.run([*git, "commit", "-qm", "base"], check=True)
    assert runner.invoke(cli.app, ["promote", str(manifest), "--variant", "dyn"]).exit_code == 0
    stat = subprocess.run([*git, "diff", "--numstat"], check=True, capture_output=True, text=True).stdout
    assert stat.split() == ["1", "1", manifest.name]


def test_unknown_variant_is_refused_and_nothing_is_written(manifest: pathlib.Path) -> None:
    before = manifest.read_text()
    result = runner.invoke(cli.app, ["promote", str(manifest), "--variant", "q2k"])
    assert result.exit_code == 1
    assert "spec.serving.variant cannot be 'q2k': spec.variants declares only q8, q6k, q4km, dyn" in result.output
    assert manifest.read_text() == before


def test_already_served_is_a_no_op(manifest: pathlib.Path) -> None:
    result = runner.invoke(cli.app, ["promote", str(manifest), "--variant", "q8"])
    assert result.exit_code == 0 and "already serves q8" in result.output


def test_dry_run_writes_nothing(manifest: pathlib.Path) -> None:
    before = manifest.read_text()
    result = runner.invoke(cli.app, ["promote", str(manifest), "--variant", "q6k", "--dry-run"])
    assert result.exit_code == 0 and "+    variant: q6k" in result.output
    assert manifest.read_text() == before


def test_kustomize_patch_checks_variants_against_the_base(tmp_path: pathlib.Path) -> None:
    patch = tmp_path / "serving.yaml"
    patch.write_text(
        "# prod serves the promoted variant\n"
        "apiVersion: kquant.dev/v1alpha1\nkind: QuantizedModel\nmetadata:\n  name: smollm2-promo\n"
        "spec:\n  serving:\n    variant: 'q8'   # promoted on 2026-11-25\n"
    )
    no_base = runner.invoke(cli.app, ["promote", str(patch), "--variant", "q4km"])
    assert no_base.exit_code == 1 and "--base" in no_base.output
    ok = runner.invoke(cli.app, ["promote", str(patch), "--variant", "q4km", "--base", str(EXAMPLE)])
    assert ok.exit_code == 0, ok.output
    assert "    variant: 'q4km' # promoted on 2026-11-25\n" in patch.read_text()
    bad = runner.invoke(cli.app, ["promote", str(patch), "--variant", "nope", "--base", str(EXAMPLE)])
    assert bad.exit_code == 1 and "declares only q8, q6k, q4km, dyn" in bad.output


def test_line_edit_ignores_lookalike_keys() -> None:
    text = (
        "apiVersion: kquant.dev/v1alpha1\nkind: QuantizedModel\nmetadata: {name: m}\n"
        "spec:\n"
        "  variants:\n"
        "    - name: a\n      type: Q8_0\n"
        "    - name: b\n      type: Q4_K_M\n"
        "  quantizer:\n    variant: not-this-one\n"
        "  serving:\n"
        "    # variant: a   (a comment that looks like the key)\n"
        "    replicas: 1\n"
        "    variant: a\n"
    )
    result = promote.promote(text, "b")
    assert result.old_variant == "a" and result.changed
    assert "    variant: not-this-one\n" in result.text
    assert "    # variant: a   (a comment that looks like the key)\n" in result.text
    assert result.text.endswith("    variant: b\n")


def test_flow_style_serving_and_multi_document_files() -> None:
    text = (
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: other}\ndata: {variant: a}\n---\n"
        "apiVersion: kquant.dev/v1alpha1\nkind: QuantizedModel\nmetadata: {name: m}\n"
        "spec:\n  variants: [{name: a, type: Q8_0}, {name: b, type: Q6_K}]\n"
        "  serving: {variant: a, replicas: 2}\n"
    )
    result = promote.promote(text, "b")
    assert "data: {variant: a}" in result.text
    assert "  serving: {variant: b, replicas: 2}\n" in result.text


def test_a_model_without_serving_is_refused() -> None:
    text = ("apiVersion: kquant.dev/v1alpha1\nkind: QuantizedModel\nmetadata: {name: m}\n"
            "spec:\n  variants: [{name: a}]\n")
    with pytest.raises(common.CommandError, match=r"no spec\.serving\.variant line"):
        promote.promote(text, "a")
