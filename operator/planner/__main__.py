"""``python -P -m kquant.operator.planner --dry-run MODEL.gguf --gpu 24GiB ...``: print a plan.

A dry run reads the GGUF header (or a ``ModelFacts`` JSON, as the quantizer's report holds it),
plans, and prints the explanation, the predicted bytes and the llama-server arguments. It writes
nothing and needs no cluster.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from kquant.operator.planner import memory, plan
from kquant.quantizer import constants, gguf_facts, units


def parse_size(text: str) -> int:
    """``24GiB``, ``24G``, ``81559MiB`` or a plain byte count (``units.parse_size``), with argparse's
    kind of error so that the usage line names the option."""
    try:
        return units.parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"GPU memory {text!r} is not a size such as 24GiB or 81559MiB") from None


def load_facts(path: Path) -> gguf_facts.ModelFacts:
    if path.suffix == ".json":
        return gguf_facts.ModelFacts.model_validate(json.loads(path.read_text()))
    return gguf_facts.read_facts(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kquant.operator.planner", description=__doc__)
    p.add_argument("model", type=Path, help="a GGUF file (first shard) or a ModelFacts JSON")
    p.add_argument("--dry-run", action="store_true", help="accepted for clarity; a dry run is all this does")
    p.add_argument("--gpu", type=parse_size, action="append", default=[],
                   help="memory of one GPU (repeat per GPU), e.g. 24GiB")  # fmt: skip
    p.add_argument("--gpus", type=int, default=None, help="number of GPUs of the --gpu size")
    p.add_argument("-c", "--ctx-size", type=int, default=4096)
    p.add_argument("-np", "--parallel", type=int, default=1)
    p.add_argument("--no-kv-unified", action="store_true")
    p.add_argument("-ctk", "--cache-type-k", type=constants.CacheType, default=constants.CacheType.F16)
    p.add_argument("-ctv", "--cache-type-v", type=constants.CacheType, default=constants.CacheType.F16)
    p.add_argument("-fa", "--flash-attn", choices=("on", "off"), default="on")
    p.add_argument("-ub", "--ubatch-size", type=int, default=512)
    p.add_argument("-ngl", "--gpu-layers", type=int, default=None, help="fixed -ngl (default: auto)")
    p.add_argument("--planner", type=plan.PlannerKind, default=plan.PlannerKind.AUTO)
    p.add_argument("--backend", type=memory.Backend, default=memory.Backend.CUDA)
    p.add_argument("--cuda-context", type=parse_size, default=plan.PlannerSettings.cuda_context_bytes)
    p.add_argument("--margin", type=parse_size, default=plan.PlannerSettings.margin_bytes)
    p.add_argument("--reduce-context", action="store_true")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def dry_run(argv: Sequence[str] | None = None) -> str:
    """Plan from command-line style arguments and return the printable result."""
    args = build_parser().parse_args(argv)
    gpus = list(args.gpu)
    if args.gpus is not None:
        if len(gpus) != 1:
            raise SystemExit("--gpus N needs exactly one --gpu SIZE")
        gpus = gpus * args.gpus
    facts = load_facts(args.model)
    ctx = memory.ContextSettings(
        context=args.ctx_size,
        cache_type_k=args.cache_type_k,
        cache_type_v=args.cache_type_v,
        parallel=args.parallel,
        kv_unified=not args.no_kv_unified,
        flash_attention=args.flash_attn == "on",
        ubatch=args.ubatch_size,
    )
    settings = plan.PlannerSettings(
        planner=args.planner,
        backend=args.backend,
        cuda_context_bytes=args.cuda_context,
        margin_bytes=args.margin,
        reduce_context=args.reduce_context,
    )
    result = plan.plan(plan.PlanRequest(facts, ctx, tuple(gpus), args.gpu_layers, settings=settings))
    if args.json:
        return json.dumps(plan.plan_to_dict(result), indent=2)
    lines = [
        f"model: {facts.name or args.model.name} ({facts.architecture}, {facts.block_count} blocks, "
        f"{units.gib(facts.total_bytes)} of weights)",
        result.explanation.replace("; ", "\n  "),
        "llama-server " + " ".join(result.server_args()),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    print(dry_run(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
