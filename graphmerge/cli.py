"""Command line: `graphmerge merge CONFIG.yaml -o OUT/` (your models and checkpoints, merged,
with a report), `graphmerge inspect` (space table, space graph, match graph) and
`graphmerge demo` (the Fashion-MNIST job)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from graphmerge.config import option_help
from graphmerge.errors import ConfigError, GraphmergeError, summarize


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


@contextlib.contextmanager
def _ranks(device: str | None) -> Iterator[tuple[int, str | None]]:
    """(this process's rank, its device). Launched by torchrun (WORLD_SIZE > 1), a process
    group for the run: gloo on CPU, NCCL with a device "cuda" made this rank's local GPU."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield 0, device
        return
    import torch.distributed as dist

    cuda = device is not None and device.startswith("cuda")
    if cuda and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield dist.get_rank(), device
    finally:
        if started:
            dist.destroy_process_group()


def cmd_merge(args: argparse.Namespace) -> int:
    """Validate the config, load the models and data, merge, write OUT/ atomically. Under
    torchrun every rank merges with its share of the calibration batches; rank 0 evaluates
    and writes."""
    from graphmerge.project import load_project

    project = load_project(args.config)
    device = project.merge.get("device")
    with _ranks(None if device is None else str(device)) as (rank, device):
        return _merge_command(args, project, rank, device)


def _merge_command(args: argparse.Namespace, project: Any, rank: int, device: str | None
                   ) -> int:
    import dataclasses
    import time

    from graphmerge.io.atomic import atomic_folder
    from graphmerge.io.report import LOAD_CALL, write_outputs
    from graphmerge.merge import merge
    from graphmerge.plan import plan_merge
    from graphmerge.project import accuracy, load

    out = Path(args.out)
    taken = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if taken and not args.force and not args.dry_run:
        raise ConfigError(f"{out} already exists; pass --force to replace it (only once the "
                          f"new run has succeeded), or choose another -o")
    loaded = load(project)
    cfg = dataclasses.replace(project.merge_config(progress=not args.quiet and rank == 0),
                              device=device)
    inputs = loaded.example_inputs()
    if rank != 0:  # the other ranks add their shares of the statistics, and stop
        if not args.dry_run:
            merge(loaded.models, loaded.calibration, inputs, config=cfg)
        return 0
    if args.dry_run:
        print(plan_merge(loaded.models, inputs, cfg).format())
        print(f"dry run: nothing written{f' ({out} exists: a run needs --force)' if taken else ''}")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out, overwrite=args.force) as build:
        result = merge(loaded.models, loaded.calibration, inputs, config=cfg)
        scores, timings = [], dict(loaded.seconds)
        if loaded.evaluation is not None:
            t0 = time.perf_counter()
            named = [(row["name"], m) for row, m in zip(loaded.rows, loaded.models)]
            for name, model in [*named, ("merged", result.module)]:
                scores.append({"model": name, "accuracy": accuracy(
                    model, loaded.evaluation, loaded.n_inputs, cfg.progress,
                    f"evaluate {name}")})
            timings["evaluate"] = time.perf_counter() - t0
        checks = {"permutation oracle on model 0": True} if cfg.check else {}
        write_outputs(build, result, inputs, title=project.title or f"graphmerge merge "
                      f"{Path(args.config).name}", onnx=project.output.onnx,
                      report=project.output.report, config={**project.model_dump(mode="json"),
                                              "merge": dataclasses.asdict(cfg)},
                      models=loaded.rows, scores=scores, checks=checks, timings=timings)
    print(result.summary)
    for row in scores:
        print(f"accuracy of {row['model']}: {row['accuracy']:.1%}")
    print(f"wrote {out}/: " + ", ".join(sorted(p.name + "/" * p.is_dir()
                                               for p in out.iterdir())))
    print(f"load the merged module with {LOAD_CALL.replace('merged', str(out / 'merged'))}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.match_graph:
        return _inspect_match_graph(args)
    from graphmerge import check_spaces, trace

    model, inputs = _inspected(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unsupported ops are listed below instead
        traced = trace(model, inputs, frontend=args.frontend)
        table = traced.space_table
    print(f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{len(traced.graph.nodes)} graph nodes (captured with {traced.frontend})")
    print(table.format())
    from graphmerge.match.coverage import coverage

    print(f"a merge of such models: {coverage(table, traced.graph_module).format()}")
    from graphmerge.graph.stages import find_stages

    stages = find_stages(traced)
    if stages:
        print("stages (units of depth): " + ", ".join(
            f"{s.name} ×{s.depth} {s.units[0].kind}" for s in stages))
    for op, nodes in table.unsupported.items():
        print(f"no axis rule for `{op}` at {', '.join(nodes)}: its axes were frozen")
    if args.draw:
        from graphmerge.io.plots import plot_space_graph

        print(f"wrote {plot_space_graph(traced, args.draw)}")
    if args.check:
        report = check_spaces(model, inputs, trials=args.trials, frontend=args.frontend)
        print(f"permutation oracle: {report.trials} trials passed, max output error "
              f"{report.max_output_error:.1e}, {report.changed_tensors} tensors changed")
    return 0


def _inspected(args: argparse.Namespace) -> tuple:
    """The model to inspect and its inputs: a built-in name, a 'module:callable' factory (with
    --config kwargs, --checkpoint, --input-shape), or model --index of a merge config file."""
    import torch

    if args.model.endswith((".yaml", ".yml")):
        from graphmerge.inputs import infer_input_count, split_batch
        from graphmerge.project import build_model, load_batches, load_project

        project = load_project(args.model)
        if not 0 <= args.index < len(project.models):
            raise ConfigError(f"--index {args.index}: {args.model} has models 0 to "
                              f"{len(project.models) - 1}")
        model = build_model(project.models[args.index], project.root,
                            f"models[{args.index}]")
        batch = load_batches(project.calibration, project.root, "calibration")[0]
        return model, split_batch(batch, project.calibration.inputs
                                  or infer_input_count(model, batch))
    if ":" in args.model:
        from graphmerge.project import build_model, model_spec

        spec = model_spec({"factory": args.model, "kwargs": _config(args.config),
                           "checkpoint": args.checkpoint}, Path.cwd(), "command line")
        if not args.input_shape:
            raise ConfigError(f"--input-shape is needed to trace {args.model}, e.g. "
                              f"--input-shape 8,16 (a random float batch)")
        return build_model(spec, Path.cwd(), args.model), (torch.randn(*args.input_shape),)
    from graphmerge.lab.zoo import builtin

    kwargs = _config(args.config)
    try:
        return builtin(args.model, **kwargs)
    except GraphmergeError:
        raise
    except Exception as e:  # the constructor refused its arguments
        raise ConfigError(f"--config {json.dumps(kwargs)}: building {args.model} raised "
                          f"{summarize(e)}; {_arguments(args.model)}") from e


def _arguments(name: str) -> str:
    """The constructor arguments of a built-in model, for an error message."""
    import inspect

    from graphmerge.lab.zoo import COMMUNITY, FAMILIES, PRETRAINED

    make = {**FAMILIES, **COMMUNITY, **{k: v[0] for k, v in PRETRAINED.items()}}.get(name)
    try:
        names = list(inspect.signature(make).parameters)
    except (TypeError, ValueError):
        names = []
    return f"its arguments: {', '.join(names)}" if names else "it takes no arguments"


def _model_arg(names: list[str]):
    def check(value: str) -> str:
        if value in names or ":" in value or value.endswith((".yaml", ".yml")):
            return value
        raise argparse.ArgumentTypeError(
            f"unknown model {value!r}; give a built-in ({', '.join(names)}), a factory "
            f"'module:callable', or a merge config .yaml")
    return check


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape; write e.g. 8,16 or "
                                         f"4,1,28,28")
    return shape


def _inspect_match_graph(args: argparse.Namespace) -> int:
    from graphmerge.io.match_graph import read_match_graph, write_match_graph
    from graphmerge.match.match_graph import describe_match_graph

    graph = read_match_graph(args.match_graph)
    print(describe_match_graph(graph))
    for path in args.write or ():
        if path.lower().endswith(".png"):
            from graphmerge.io.plots import plot_match_graph

            print(f"wrote {plot_match_graph(graph, path)}")
        else:
            print(f"wrote {write_match_graph(graph, path)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from graphmerge.lab.experiment import TaskPairConfig, run_demo

    cfg = TaskPairConfig(epochs=args.epochs)
    cfg.model["width"] = args.width
    print(run_demo(Path(args.out), cfg, Path(args.cache) if args.cache else None,
                   onnx=not args.no_onnx, progress=not args.quiet))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from graphmerge.lab.zoo import COMMUNITY, FAMILIES, PRETRAINED

    parser = argparse.ArgumentParser(prog="graphmerge", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)  # -v/-q before or after the command
    for p in (parser, common):
        default = False if p is parser else argparse.SUPPRESS
        p.add_argument("-v", "--verbose", action="store_true", default=default,
                       help="debug messages, and the traceback of an error")
        p.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("merge", parents=[common], help="merge your models as a YAML config "
                       "says; write the merged module and a report to OUT/",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="merge options (the `merge:` section of the config):\n"
                       + option_help(indent=2, width=78))
    p.add_argument("config", help="the YAML config (models, calibration, eval, merge, output)")
    p.add_argument("-o", "--out", required=True, help="output folder (written atomically)")
    p.add_argument("--force", action="store_true", help="replace OUT/ if it exists")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, trace, print the plan (spaces, stages, widths); no data "
                        "pass, nothing written")
    p.set_defaults(func=cmd_merge)
    names = sorted([*FAMILIES, *COMMUNITY, *PRETRAINED])
    p = sub.add_parser("inspect", parents=[common], help="print the space table of a model "
                       "(built-in, a factory, or one of a merge config's), or a match graph")
    p.add_argument("model", nargs="?", default="resnet", type=_model_arg(names),
                   help=f"a built-in ({', '.join(names)}; default resnet), a factory "
                        f"'module:callable', or a merge config .yaml (see --index)")
    p.add_argument("--config", help="JSON constructor arguments (a factory's kwargs), e.g. "
                                    "'{\"depths\": [1,1,1]}'")
    p.add_argument("--checkpoint", help="with a factory: weights to load (.safetensors, .pt)")
    p.add_argument("--input-shape", type=_shape, metavar="SHAPE",
                   help="with a factory: shape of a random input batch, e.g. 8,16")
    p.add_argument("--index", type=int, default=0,
                   help="with a config .yaml: which of its models (default 0)")
    p.add_argument("--draw", metavar="PNG", help="also draw the space graph to this PNG")
    p.add_argument("--check", action="store_true", help="also run the permutation oracle")
    p.add_argument("--trials", type=int, default=3, help="oracle trials (default 3)")
    p.add_argument("--frontend", default="auto", choices=["auto", "fx", "export"],
                   help="capture with torch.fx, torch.export, or fx then export (default)")
    p.add_argument("--match-graph", metavar="FILE",
                   help="instead of a model: print a saved match graph (.json or .graphml, "
                        "e.g. out/demo/match_graph.json)")
    p.add_argument("--write", metavar="OUT", action="append",
                   help="with --match-graph: also write it as .graphml, .json, .dot or .png "
                        "(repeatable)")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("demo", parents=[common],
                       help="train (or load) two ResNets on the Fashion-MNIST 5+5 tasks, "
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
    """Run one command; a user's mistake is one line on stderr and exit code 2, an unexpected
    error one line and exit code 1 (`-v` adds the traceback)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(message)s")
    if not args.verbose:  # our steps, not other libraries' chatter (ONNX export)
        logging.getLogger("graphmerge").setLevel(logging.WARNING if args.quiet else
                                                 logging.INFO)
        logging.getLogger("graphmerge.io").setLevel(logging.WARNING)  # names temporary files
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        return args.func(args)
    except GraphmergeError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"graphmerge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("graphmerge: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, or user code failing where we did not expect it
        if args.verbose:
            traceback.print_exc()
        print(f"graphmerge: error: unexpected {summarize(e)} (run with -v for the "
              f"traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
