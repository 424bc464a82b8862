"""The image references kquant defaults to are the ones `make images` builds, all from one version.

images/build.sh tags every image with the chart's appVersion; the chart's values, the operator's
defaults and the CRD's documented default must name exactly those tags, or a default install pulls
an image that no build produced.
"""

from __future__ import annotations

import pathlib
import subprocess

import yaml
from kquant.operator import config
from kquant.operator.api import v1alpha1 as api

REPO = pathlib.Path(__file__).resolve().parents[2]


def built_tags() -> list[str]:
    done = subprocess.run(["bash", str(REPO / "images/build.sh"), "tags"], check=True,
                          capture_output=True, text=True)
    return done.stdout.split()


def test_every_tag_carries_the_chart_app_version() -> None:
    app_version = yaml.safe_load((REPO / "charts/kquant/Chart.yaml").read_text())["appVersion"]
    tags = built_tags()
    assert len(tags) == 5, tags
    for tag in tags:
        assert tag.rsplit(":", 1)[1] in (app_version, f"{app_version}-cuda"), tag


def test_chart_and_operator_defaults_are_built_images() -> None:
    tags = set(built_tags())
    chart = yaml.safe_load((REPO / "charts/kquant/Chart.yaml").read_text())
    values = yaml.safe_load((REPO / "charts/kquant/values.yaml").read_text())
    operator_image = f"{values['image']['repository']}:{values['image']['tag'] or chart['appVersion']}"
    defaults = {
        "chart image": operator_image,
        "chart quantizerImage": values["quantizerImage"],
        "chart serverImage": values["serverImage"],
        "operator DEFAULT_QUANTIZER_IMAGE": config.DEFAULT_QUANTIZER_IMAGE,
        "operator DEFAULT_SERVER_IMAGE": api.DEFAULT_SERVER_IMAGE,
    }
    unbuilt = {what: ref for what, ref in defaults.items() if ref not in tags}
    assert not unbuilt, f"defaults that images/build.sh does not tag: {unbuilt}; it tags {sorted(tags)}"
