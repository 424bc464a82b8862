"""``kquant quantize MANIFEST --variant X``: build one variant on this machine, with progress bars.

For a workstation with its own GPU: the same build spec the operator would hand the quantizer Job
(``builds.base_spec``), with the storage root moved to a local folder, run in-process by the
quantizer's pipeline. Progress arrives through the pipeline's ``Sink`` protocol; ``RichSink``
draws one bar per step. A ConfigMap is never involved, and a hub token comes from ``HF_TOKEN`` in
the environment (huggingface_hub reads it), or ``MODELSCOPE_API_TOKEN`` for a ModelScope source,
never from the manifest.
"""

from __future__ import annotations

import pathlib

import huggingface_hub.utils
from kquant.operator import builds
from kquant.operator.api import v1alpha1 as api
from kquant.operator.commands import common
from kquant.quantizer import progress, report, settings
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table


class RichSink:
    """A ``progress.Sink`` that shows one bar per (variant, step) and a table of the result."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.bars = Progress(TextColumn("{task.description:<28}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                             TimeElapsedColumn(), console=console)  # fmt: skip
        self._tasks: dict[tuple[str | None, str], TaskID] = {}

    def __enter__(self) -> RichSink:
        self.bars.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.bars.stop()

    def progress(self, line: progress.ProgressLine) -> None:
        key = (line.variant, line.phase)
        if key not in self._tasks:
            # Steps run one after another: a new step means the earlier ones are over (a skipped
            # or cached step may never report 100%), so their bars and clocks stop.
            for task in self._tasks.values():
                self.bars.update(task, completed=1.0)
            label = f"{line.variant} {line.phase}" if line.variant else line.phase
            self._tasks[key] = self.bars.add_task(label, total=1.0)
        self.bars.update(self._tasks[key], completed=min(max(line.fraction, 0.0), 1.0))

    def report(self, build: report.BuildReport) -> None:
        self.bars.stop()
        self.console.print(result_table(build))


def result_table(build: report.BuildReport) -> Table:
    table = Table(title=f"build {build.status.value}" + (f": {build.reason}" if build.reason else ""))
    for column in ("variant", "type", "size", "bits/weight", "KL", "perplexity", "gate", "file"):
        table.add_column(column)
    for v in build.variants:
        table.add_row(v.name, v.type, common.size(v.size_bytes), f"{v.bits_per_weight:.2f}",
                      "-" if v.kl_divergence is None else f"{v.kl_divergence:.4f}",
                      "-" if v.perplexity is None else f"{v.perplexity:.2f}",
                      "passed" if v.gate_passed else "failed: " + "; ".join(v.gate.reasons if v.gate else []),
                      v.path)  # fmt: skip
    return table


def local_spec(qm: api.QuantizedModel, variant: api.Variant, storage: pathlib.Path) -> settings.BuildSpec:
    """The operator's build spec for ``variant``, with storage under ``storage`` (pure)."""
    for field, ref in (("calibration", qm.spec.calibration), ("evaluation", qm.spec.evaluation)):
        if ref is not None and ref.config_map_ref is not None:
            raise common.CommandError(
                f"{qm.ref}: spec.{field}.configMapRef names a ConfigMap, which exists only in the cluster; "
                "remove it to use the quantizer's builtin text"
            )
    spec = builds.base_spec(qm, variant)
    return spec.model_copy(update={"storage_root": storage})


def run(spec: settings.BuildSpec, console: Console) -> report.BuildReport:
    """Run the build in this process; the quantizer's pipeline and its resumable steps do the work."""
    from kquant.quantizer import pipeline  # imports llama.cpp and torch: only when a build runs

    # The bars above replace the libraries' own tqdm bars, which would interleave with them;
    # transformers follows huggingface_hub's switch when it is imported afterwards.
    huggingface_hub.utils.disable_progress_bars()  # type: ignore[attr-defined]  # re-exported without "as"
    with RichSink(console) as sink:
        return pipeline.BuildRunner(spec, sink).run()
