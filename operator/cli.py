"""``kquant``: the operator and the command-line tools around it.

    kquant operator [-n NS] [--liveness URL] [--peering NAME]   run the operator (the chart's Deployment)
    kquant retry NAME [-n NS]                                    run a model's failed builds again
    kquant status NAME [-n NS]                                   variants, serving plan, conditions
    kquant plan MANIFEST --gpu 24GiB [--gpus N]                  offload plan beside the seed formula
    kquant promote FILE --variant X                              the Git edit that promotes a variant
    kquant quantize MANIFEST --variant X [--storage DIR]         build one variant on this machine

Each command lives in ``kquant.operator.commands``; this module only parses arguments and prints.
Errors a user can fix print one line and exit 1; a bad command line exits 2.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Annotated, TypeVar

import click
import typer
from kquant.operator.commands import common
from rich.console import Console

app = typer.Typer(name="kquant", help="kquant: quantized LLMs on Kubernetes.", add_completion=False,
                  no_args_is_help=True, pretty_exceptions_enable=False)  # fmt: skip
console = Console(highlight=False)
errors = Console(stderr=True, highlight=False)
R = TypeVar("R")


def _run(action: Callable[[], R]) -> R:
    """Call ``action``; a ``CommandError`` becomes one line on stderr and exit status 1."""
    try:
        return action()
    except common.CommandError as exc:
        errors.print(f"kquant: {exc}", markup=False, soft_wrap=True)
        raise typer.Exit(1) from None


@app.command("operator")
def operator_(
    namespace: Annotated[list[str] | None, typer.Option("-n", "--namespace",
                         help="watch only this namespace (repeatable); all namespaces when unset")] = None,
    liveness: Annotated[str | None, typer.Option(help="serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz")]
    = None,
    peering: Annotated[str | None, typer.Option(help="kopf peering object name; with several replicas one is active")]
    = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="debug logging")] = False,
) -> None:  # fmt: skip
    """Run the operator against the current kubeconfig or in-cluster."""
    import kopf
    from kquant.operator import handlers  # noqa: F401  (registers the handlers)

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    if not verbose:  # kopf logs every event handler's success: thousands of lines that say nothing
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    namespaces = namespace or []
    asyncio.run(kopf.operator(
        clusterwide=not namespaces, namespaces=namespaces,
        standalone=peering is None, peering_name=peering, liveness_endpoint=liveness,
    ))  # fmt: skip


@app.command()
def status(
    name: Annotated[str, typer.Argument(help="the QuantizedModel's name")],
    namespace: Annotated[str | None, typer.Option("-n", "--namespace",
                         help="its namespace; the kubeconfig context's when unset")] = None,
) -> None:  # fmt: skip
    """Show a QuantizedModel's variants, phase, serving plan and conditions."""
    from kquant.operator.commands import render
    from kquant.operator.commands import status as status_cmd

    qm = _run(lambda: status_cmd.fetch(name, namespace or status_cmd.current_namespace()))
    console.print(render.status_view(qm))


@app.command()
def retry(
    name: Annotated[str, typer.Argument(help="the QuantizedModel's name")],
    namespace: Annotated[str | None, typer.Option("-n", "--namespace",
                         help="its namespace; the kubeconfig context's when unset")] = None,
) -> None:  # fmt: skip
    """Run a QuantizedModel's failed builds again (sets its kquant.dev/retry annotation).

    A failed build stays failed until its spec changes or someone asks; a transient failure (an
    evicted pod, a lost node) is retried by itself. The same is done with
    kubectl annotate qm NAME kquant.dev/retry=<any new value> --overwrite.
    """
    import datetime

    from kquant.operator.commands import status as status_cmd

    ns = namespace or status_cmd.current_namespace()
    token = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    _run(lambda: status_cmd.retry(name, ns, token))
    typer.echo(f"QuantizedModel {ns}/{name}: failed builds will run again (kquant.dev/retry={token})")


@app.command()
def plan(
    manifest: Annotated[pathlib.Path, typer.Argument(help="a QuantizedModel manifest; - reads standard input")],
    gpu: Annotated[str, typer.Option(help="memory of one GPU, e.g. 24GiB or 81559MiB")],
    gpus: Annotated[int | None, typer.Option(help="GPUs per server pod; spec.serving.gpus when unset")] = None,
    variant: Annotated[str | None, typer.Option(help="the variant to plan; the served one when unset")] = None,
    gguf: Annotated[pathlib.Path | None, typer.Option(help="read the model's facts from this GGUF's header")] = None,
    facts: Annotated[pathlib.Path | None, typer.Option(help="a ModelFacts JSON or a quantizer report")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print both plans as JSON")] = False,
    hub_files: Annotated[pathlib.Path | None, typer.Option(
        help="the source repository's file list with sizes (the hub API's siblings JSON): print the build sizing")]
    = None,
    hub_config: Annotated[pathlib.Path | None, typer.Option(help="the source repository's config.json")] = None,
    verify: Annotated[pathlib.Path | None, typer.Option(
        help="a GGUF: run llama-fit-params on this machine with the plan's arguments and print its bytes per "
             "device beside the planner's")] = None,
    rpc: Annotated[str | None, typer.Option(
        help="with --verify: ggml-rpc-server endpoints (host:port,...) that stand in for the GPUs")] = None,
    llama_bin: Annotated[pathlib.Path | None, typer.Option(help="with --verify: the folder of llama-fit-params")]
    = None,
    margins: Annotated[pathlib.Path | None, typer.Option(
        help="the operator's learned margins ConfigMap (kubectl get configmap <release>-kquant-margins "
             "-n <namespace> -o yaml), with --gpu-product")] = None,
    gpu_product: Annotated[str | None, typer.Option(
        help="the GPU's nvidia.com/gpu.product label: which learned margin applies")] = None,
) -> None:  # fmt: skip
    """The offload plan for a manifest's variant on given GPUs, beside the seed formula's. No cluster needed.

    Without --gguf or --facts, the model's facts are estimated from a builtin table of well-known
    models (DeepSeek-R1, SmolLM2-135M, Llama-3.1-8B) and the variant's type and recipe. With
    --hub-files (and --hub-config for a safetensors source) the build's sizing is printed first:
    claim, memory and CPU requests, threads, deadline and estimated time. With --verify MODEL.gguf
    the plan for that file is checked against llama.cpp's own count on this machine's devices.
    """
    import dataclasses
    import json

    from kquant.operator import build_gpus, serving
    from kquant.operator.commands import plan as plan_cmd
    from kquant.operator.commands import render
    from kquant.operator.planner import margins as margin_table
    from kquant.operator.planner import plan as planner
    from kquant.quantizer import sizing

    endpoints = [e for e in (rpc or "").split(",") if e]
    if (endpoints or llama_bin) and verify is None:
        errors.print("kquant: --rpc and --llama-bin need --verify MODEL.gguf", markup=False, soft_wrap=True)
        raise typer.Exit(1)

    def compute() -> plan_cmd.Comparison:
        qm = common.load_model(manifest)
        chosen = plan_cmd.pick_variant(qm, variant)
        if verify is not None and (gguf is not None or facts is not None):
            raise common.CommandError("--verify reads the model's facts from its GGUF: drop --gguf and --facts")
        found, source = plan_cmd.load_facts(qm, chosen, verify or gguf, facts)
        if (margins is None) != (gpu_product is None):
            raise common.CommandError("--margins and --gpu-product go together: the file holds a margin per product")
        learned = margin_table.Learned()
        if margins is not None:
            learned = margin_table.learned(plan_cmd.load_margins(margins), gpu_product, str(margins))
        settings = serving.planner_settings(learned, gpu_product)
        return plan_cmd.compare(qm, chosen, found, source, common.parse_size(gpu),
                                len(endpoints) if endpoints and gpus is None else gpus, settings)

    def sized() -> tuple[sizing.Sizing, build_gpus.BuildGPUs] | None:
        if hub_files is None:
            if hub_config is not None:
                raise common.CommandError("--hub-config needs --hub-files (the listing gives the sizes)")
            return None
        return plan_cmd.build_sizing(common.load_model(manifest), hub_files, hub_config, common.parse_size(gpu))

    build = _run(sized)
    result = _run(compute)
    if as_json:
        console.print_json(json.dumps({"variant": result.variant, "facts": result.facts_source,
                                       "kquant": planner.plan_to_dict(result.auto),
                                       "seed": planner.plan_to_dict(result.seed),
                                       "fewestGPUs": planner.plan_to_dict(result.fewest) if result.fewest else None,
                                       "margin": result.margin,
                                       "build": sizing.to_dict(build[0]) | {
                                           "buildGPUs": dataclasses.asdict(build[1])} if build else None,
                                       }))  # fmt: skip
        return
    if build is not None:
        lines = [*build[0].lines(), f"build GPUs          {build[1].line()}"]
        console.print("build (estimated from the hub listing):\n  " + "\n  ".join(lines) + "\n",
                      markup=False, soft_wrap=True)  # fmt: skip
    console.print(render.plan_view(result))
    if verify is not None:
        from kquant.operator.commands import verify as verify_cmd
        from kquant.operator.planner import memory

        backend = memory.Backend.RPC if endpoints else memory.Backend.CUDA
        checked = _run(lambda: verify_cmd.verify(verify_cmd.find_tool(llama_bin), verify, result.facts, result.auto,
                                                 backend, endpoints))
        console.print("\n".join(["", "llama.cpp's own count on this machine:", *verify_cmd.lines(checked)]),
                      markup=False, soft_wrap=True)


@app.command()
def promote(
    file: Annotated[pathlib.Path, typer.Argument(help="the manifest (or kustomize patch) in a Git working tree")],
    variant: Annotated[str, typer.Option(help="the variant to serve; must be in spec.variants")],
    base: Annotated[list[pathlib.Path] | None, typer.Option(
        help="manifest(s) that declare spec.variants, when FILE is a patch without them")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the diff, write nothing")] = False,
) -> None:  # fmt: skip
    """Set spec.serving.variant in FILE, keeping its comments and formatting, and print the diff."""
    from kquant.operator.commands import promote as promote_cmd

    def compute() -> promote_cmd.Promotion:
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise common.CommandError(f"cannot read {file}: {exc.strerror}") from None
        bases = [d for b in base or [] for d in common.read_documents(b)]
        return promote_cmd.promote(text, variant, bases, str(file))

    result = _run(compute)
    if not result.changed:
        typer.echo(f"{file}: already serves {variant}; nothing to change")
        return
    diff = promote_cmd.unified_diff(file.read_text(encoding="utf-8"), result.text, str(file))
    if not dry_run:
        file.write_text(result.text, encoding="utf-8")
    typer.echo(diff, nl=False)  # plain text: a diff is for pipes and patch tools
    if not dry_run:
        typer.echo(f'next: git commit -m "promote {variant}" -- {file} && git push', err=True)


@app.command()
def quantize(
    manifest: Annotated[pathlib.Path, typer.Argument(help="a QuantizedModel manifest")],
    variant: Annotated[str, typer.Option(help="the variant to build")],
    storage: Annotated[pathlib.Path, typer.Option(help="where downloads, intermediates and the variant go")]
    = pathlib.Path("kquant-models"),
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="debug logging")] = False,
) -> None:  # fmt: skip
    """Build one variant on this machine (a workstation with its own GPU), with progress bars."""
    from kquant.operator.commands import plan as plan_cmd
    from kquant.operator.commands import quantize as quantize_cmd
    from kquant.quantizer import report, settings

    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip

    def spec() -> settings.BuildSpec:
        qm = common.load_model(manifest)
        return quantize_cmd.local_spec(qm, plan_cmd.pick_variant(qm, variant), storage.resolve())

    result = quantize_cmd.run(_run(spec), console)
    if result.status is report.BuildStatus.FAILED:
        raise typer.Exit(1)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``kquant`` console script; returns the exit status instead of raising SystemExit."""
    command = typer.main.get_command(app)
    try:
        command.main(args=list(sys.argv[1:] if argv is None else argv), prog_name="kquant", standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except click.exceptions.Abort:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
