"""Command line: `graphmerge inspect` (space table, match graph) and `graphmerge demo` (the main job)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence

from graphmerge.errors import ConfigError, GraphmergeError


def _config(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config must be a JSON object, e.g. '{{\"depths\": [1, 1, 1]}}': {e}")
    if not isinstance(value, dict):
        raise ConfigError("--config must be a JSON object of constructor arguments")
    return value


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.match_graph:
        return _inspect_match_graph(args)
    from graphmerge import check_spaces, trace
    from graphmerge.lab.zoo import builtin

    model, inputs = builtin(args.model, **_config(args.config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unsupported ops are listed below instead
        traced = trace(model, inputs, frontend=args.frontend)
        table = traced.space_table
    print(f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{len(traced.graph.nodes)} graph nodes (captured with {traced.frontend})")
    print(table.format())
    from graphmerge.graph.stages import find_stages

    stages = find_stages(traced)
    if stages:
        print("stages (units of depth): " + ", ".join(
            f"{s.name} ×{s.depth} {s.units[0].kind}" for s in stages))
    for op, nodes in table.unsupported.items():
        print(f"no axis rule for `{op}` at {', '.join(nodes)}: its axes were frozen")
    if args.check:
        report = check_spaces(model, inputs, trials=args.trials, frontend=args.frontend)
        print(f"permutation oracle: {report.trials} trials passed, max output error "
              f"{report.max_output_error:.1e}, {report.changed_tensors} tensors changed")
    return 0


def _inspect_match_graph(args: argparse.Namespace) -> int:
    from graphmerge.io.match_graph import read_match_graph, write_match_graph
    from graphmerge.match.match_graph import describe_match_graph

    graph = read_match_graph(args.match_graph)
    print(describe_match_graph(graph))
    for path in args.write or ():
        print(f"wrote {write_match_graph(graph, path)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from graphmerge.lab.experiment import TaskPairConfig, run_demo

    cfg = TaskPairConfig(epochs=args.epochs)
    cfg.model["width"] = args.width
    print(run_demo(Path(args.out), cfg, Path(args.cache) if args.cache else None,
                   onnx=not args.no_onnx))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from graphmerge.lab.zoo import COMMUNITY, FAMILIES, PRETRAINED

    parser = argparse.ArgumentParser(prog="graphmerge", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    names = sorted([*FAMILIES, *COMMUNITY, *PRETRAINED])
    p = sub.add_parser("inspect", help="print the space table of a built-in model")
    p.add_argument("model", nargs="?", default="resnet", choices=names,
                   help="built-in model (default: resnet)")
    p.add_argument("--config", help="JSON constructor arguments, e.g. '{\"depths\": [1,1,1]}'")
    p.add_argument("--check", action="store_true", help="also run the permutation oracle")
    p.add_argument("--trials", type=int, default=3, help="oracle trials (default 3)")
    p.add_argument("--frontend", default="auto", choices=["auto", "fx", "export"],
                   help="capture with torch.fx, torch.export, or fx then export (default)")
    p.add_argument("--match-graph", metavar="FILE",
                   help="instead of a model: print a saved match graph (.json or .graphml, "
                        "e.g. out/demo/match_graph.json)")
    p.add_argument("--write", metavar="OUT", action="append",
                   help="with --match-graph: also write it as .graphml, .json or .dot "
                        "(repeatable)")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("demo", help="train (or load) two ResNets on the Fashion-MNIST 5+5 tasks, "
                                    "merge them, print the accuracy table, write the outputs")
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs per model (default 3)")
    p.add_argument("--width", type=int, default=2, help="ResNet width multiplier (default 2)")
    p.add_argument("--cache", help="trained-model cache (default $GRAPHMERGE_CACHE or "
                                   "~/.cache/graphmerge)")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s")
    try:
        return args.func(args)
    except GraphmergeError as e:
        print(f"graphmerge: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
