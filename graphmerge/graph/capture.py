"""Capture a model as a `torch.fx` graph and record the concrete shape of every node.

`capture(model, example_inputs)` returns a `Traced` whose `.graph_module` is the fx graph (after
the rewrites of `graphmerge.graph.canonical`, which keep its function) and `.shapes` maps node
name to its concrete shape. Analyses built on a capture live in the modules that make them, in
types of their own.
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from graphmerge.errors import (
    ConfigError,
    DataError,
    GraphmergeError,
    TracingError,
    summarize,
)
from graphmerge.inputs import as_inputs
from graphmerge.graph.canonical import chain_concatenations
from graphmerge.graph.kinds import target_name
from graphmerge.graph.tensors import named_tensors

__all__ = ["Tracer", "Traced", "capture", "run_nodes", "eval_mode", "set_eval", "FRONTENDS",
           "check_materialized", "check_leaf_modules", "quiet_export"]

log = logging.getLogger(__name__)

_HOW_TO_FIX = (
    "To make the model traceable: remove Python control flow that depends on tensor values "
    "(if/for/while on a tensor), mark the offending submodule as a leaf "
    "(gm.trace(model, inputs, leaf_modules=[MyBlock]); its axes are then frozen), or fix "
    "non-tensor arguments with concrete_args={'flag': False}."
)


class Tracer(fx.Tracer):
    """An fx tracer whose leaf modules can be chosen by class or by qualified name."""

    def __init__(self, leaf_modules: Iterable[type[nn.Module] | str] = ()) -> None:
        super().__init__()
        leaves = list(leaf_modules)
        self.leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self.leaf_names = {x for x in leaves if isinstance(x, str)}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_types) or module_qualified_name in self.leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _shape_of(value: Any) -> Any:
    """torch.Size for a tensor, a tuple of shapes for a tuple/list of tensors, else None."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        return tuple(_shape_of(v) for v in value)
    return None


def run_nodes(gm: fx.GraphModule, inputs: Sequence[Any]) -> dict[str, Any]:
    """Run `gm` on `inputs` and return every node's value by node name (no_grad).

    Memory: keeps every intermediate value alive; use on small batches.
    """
    values: dict[str, Any] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            try:
                out = super().run_node(n)
            except Exception as e:  # name the node that failed, keep the cause
                op = target_name(n) or repr(n.target)
                raise TracingError(
                    f"running node `{n.name}` ({n.op} {op}) on the example inputs "
                    f"failed: {summarize(e)}. Check that example_inputs have the shapes "
                    f"and dtypes the model expects."
                ) from e
            values[n.name] = out
            return out

    recorder = _Recorder(gm)
    recorder.extra_traceback = False  # our message names the node; fx would append the graph
    with torch.no_grad():
        recorder.run(*inputs)
    return values


@dataclass
class Traced:
    """A traced model: its fx graph, the example inputs, and every node's concrete shape.

    `shapes[name]` is a tuple of ints for tensor-valued nodes, a tuple of such tuples for nodes
    returning several tensors (split, chunk), and None for non-tensor values. `consts[name]` holds
    the concrete non-tensor values (sizes, ints) seen on the example inputs.
    """

    graph_module: fx.GraphModule
    example_inputs: tuple[Any, ...]
    shapes: dict[str, Any] = field(default_factory=dict)
    consts: dict[str, Any] = field(default_factory=dict)
    frontend: str = "fx"  # "fx", "export" or "graph" (a GraphModule taken as given)
    constants: frozenset[str] = frozenset()  # get_attr targets the model does not own

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    def node(self, name: str) -> fx.Node:
        for n in self.graph.nodes:
            if n.name == name:
                return n
        raise GraphmergeError(f"no node named {name!r} in the traced graph")


FRONTENDS = ("auto", "fx", "export")


def set_eval(module: nn.Module) -> nn.Module:
    """Every submodule's training flag off. Unlike `Module.eval()` this also works on modules
    that `torch.export` unlifted (they refuse `eval()`; they were captured in eval mode)."""
    for m in module.modules():
        m.training = False
    return module


def check_materialized(model: nn.Module, what: str = "the model") -> None:
    """Refuse a model whose parameters or buffers have no values (the `meta` device).

    Raises:
        DataError: naming the first such tensor and how to give it values.
    """
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type == "meta":
            raise DataError(
                f"{what} has `{name}` on the meta device (a shape without values): "
                f"materialise it first, e.g. model.to_empty(device='cpu') then "
                f"model.load_state_dict(weights).")


def plain_weights(model: nn.Module) -> nn.Module:
    """`model` itself, or, when it has parametrized tensors (`torch.nn.utils.parametrizations`:
    weight_norm, spectral_norm, orthogonal, ...), a copy in which each is a plain parameter
    holding its current value (computed in eval mode). Graphs, rules and surgery then read it
    like any weight; a merged model has such plain weights."""
    if not any(parametrize.is_parametrized(m) for m in model.modules()):
        return model
    out = copy.deepcopy(model)
    with eval_mode(out), torch.no_grad():
        for m in [m for m in out.modules() if parametrize.is_parametrized(m)]:
            values = {name: getattr(m, name).detach().clone() for name in m.parametrizations}
            learned = {name: any(isinstance(t, nn.Parameter) for t in plist.parameters())
                       for name, plist in m.parametrizations.items()}
            # not parametrize.remove_parametrizations: a deep copy shares the injected
            # class with the caller's module, and removing deletes the property from it
            m.__class__ = m.__class__.__bases__[0]
            del m._modules["parametrizations"]
            for name, value in values.items():
                if learned[name]:
                    m.register_parameter(name, nn.Parameter(value))
                else:
                    m.register_buffer(name, value)
    return out


def check_leaf_modules(model: nn.Module, leaf_modules: Any) -> list[type[nn.Module] | str]:
    """`leaf_modules` as a list, each entry a module class of which `model` has an instance or
    the qualified name of one of its submodules (a GraphModule is captured as given: its
    entries are only checked to be classes and names).

    Raises:
        ConfigError: not a list of classes and names, or an entry that matches no module of
            the model (naming it and a few valid ones).
    """
    if isinstance(leaf_modules, (str, type)) or not isinstance(leaf_modules, Iterable):
        raise ConfigError(f"leaf_modules must be a list of module classes or qualified module "
                          f"names, got {leaf_modules!r}")
    leaves = list(leaf_modules)
    named = {} if isinstance(model, fx.GraphModule) else dict(model.named_modules())
    for leaf in leaves:
        if not isinstance(leaf, str) and not (isinstance(leaf, type)
                                              and issubclass(leaf, nn.Module)):
            raise ConfigError(f"leaf_modules entries must be module classes or qualified module "
                              f"names, got {leaf!r}")
        if not named:
            continue
        if isinstance(leaf, type):
            if not any(isinstance(m, leaf) for m in named.values()):
                classes = sorted({type(m).__name__ for m in named.values()})
                raise ConfigError(
                    f"leaf_modules: {type(model).__name__} has no {leaf.__name__} module; "
                    f"its module classes: {', '.join(classes[:8])}"
                    f"{', …' if len(classes) > 8 else ''}")
        elif leaf not in named or not leaf:
            names = [n for n in named if n]
            raise ConfigError(
                f"leaf_modules: {type(model).__name__} has no submodule named {leaf!r}; "
                f"its submodules: {', '.join(names[:8]) or 'none'}"
                f"{', …' if len(names) > 8 else ''}")
    return leaves


#: loggers that torch.export writes to when it fails (a warning and the graph, many lines);
#: our error says what failed instead
_EXPORT_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._dynamo", "torch.export",
                   "torch._export", "torch.onnx")


@contextmanager
def quiet_export() -> Iterator[None]:
    """torch.export's own logging at ERROR for the duration (levels restored after), and the
    partial graph it prints to stderr when it fails dropped."""
    loggers = [logging.getLogger(name) for name in _EXPORT_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.ERROR))
    try:
        with redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode for the duration; each one's own flag restored after."""
    flags = [(m, m.training) for m in module.modules()]
    set_eval(module)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def capture(
    model: nn.Module,
    example_inputs: Any,
    *,
    frontend: str = "auto",
    leaf_modules: Iterable[type[nn.Module] | str] = (),
    concrete_args: dict[str, Any] | None = None,
) -> Traced:
    """Capture `model` as an fx graph and record every node's shape on the example inputs.

    Front ends: "fx" (`torch.fx.symbolic_trace` with our leaf modules: module-level graphs and
    readable merged code), "export" (`torch.export.export(strict=False)`: an aten-level graph
    with `nn_module_stack` metadata; captures models fx cannot, e.g. every transformers model
    we tried), or "auto" (fx, falling back to export with one log line saying why). A
    `torch.fx.GraphModule` is taken as given: its graph and node metadata are used, not
    re-traced.

    Args:
        model: any nn.Module; it is not modified (the graph module shares its parameters;
            constants that tracing creates live in the graph module only).
        example_inputs: one tensor or a tuple of positional inputs (a small batch is enough).
        frontend: "auto", "fx" or "export".
        leaf_modules: module classes or qualified names the fx tracer keeps opaque (their axes
            are frozen unless a rule exists for them).
        concrete_args: passed to `torch.fx.Tracer.trace` to fix non-tensor arguments.

    Returns:
        Traced with `.graph_module`, `.shapes` and `.frontend` (not analysed further).

    Raises:
        TracingError: naming what failed and how to make the model capturable.
    """
    if not isinstance(model, nn.Module):
        raise TracingError(f"expected an nn.Module to trace, got {type(model).__name__}")
    if not isinstance(frontend, str) or frontend not in FRONTENDS:
        raise ConfigError(f"unknown frontend {frontend!r}; valid: {', '.join(FRONTENDS)}")
    check_materialized(model)
    model = plain_weights(model)
    leaf_modules = check_leaf_modules(model, leaf_modules)
    if concrete_args is not None and not isinstance(concrete_args, dict):
        raise ConfigError(f"concrete_args must be a dict of forward argument names to values, "
                          f"got {concrete_args!r}")
    inputs = as_inputs(example_inputs)
    with eval_mode(model), _containers_restored(model):
        if isinstance(model, fx.GraphModule):
            gm, used = model, "graph"
        elif frontend == "export":
            gm, used = _export(model, inputs), "export"
        else:
            try:
                gm, used = _symbolic_trace(model, leaf_modules, concrete_args), "fx"
            except TracingError as e:
                if frontend == "fx":
                    raise
                why = summarize(e)
                log.info("torch.fx could not trace %s (%s); capturing it with torch.export",
                         type(model).__name__, why)
                try:
                    gm, used = _export(model, inputs), "export"
                except TracingError as e2:
                    raise TracingError(
                        f"neither torch.fx nor torch.export could capture "
                        f"{type(model).__name__}. torch.fx: {why}. {e2} {_HOW_TO_FIX}") from e2
        if chain_concatenations(gm.graph, rewrite=False):
            if used == "graph":  # the caller's graph module is not modified
                gm = fx.GraphModule(gm, copy.deepcopy(gm.graph), type(gm).__name__)
            chain_concatenations(gm.graph)
            gm.recompile()
        _check_arity(gm, inputs, type(model).__name__)
        values = run_nodes(gm, inputs)
    shapes = {name: _shape_of(v) for name, v in values.items()}
    consts = {name: v for name, v in values.items() if _is_const(v)}
    owned = set(named_tensors(model))
    constants = frozenset(n.target for n in gm.graph.nodes
                          if n.op == "get_attr" and n.target not in owned)
    return Traced(graph_module=gm, example_inputs=inputs, shapes=shapes, consts=consts,
                  frontend=used, constants=constants)


@contextmanager
def _containers_restored(model: nn.Module) -> Iterator[None]:
    """Give every public dict or list attribute of `model`'s modules its contents back on exit.

    Forwards that cache values in a module attribute (timm's LeViT keeps
    `attention_bias_cache[str(device)]` in eval mode) would otherwise keep what tracing stored
    there: an fx Proxy of this trace's graph, which the next trace of the model reads back as a
    node of a graph it does not belong to ("Node add referenced nonexistent value getitem_7"),
    or a fake tensor that breaks the caller's next eager call.
    """
    saved = [(m, k, v, copy.copy(v)) for m in model.modules() for k, v in vars(m).items()
             if not k.startswith("_") and type(v) in (dict, list)]
    try:
        yield
    finally:
        for module, name, live, before in saved:
            live.clear()
            live.extend(before) if isinstance(live, list) else live.update(before)
            vars(module)[name] = live


def _symbolic_trace(model: nn.Module, leaf_modules: Iterable[type[nn.Module] | str],
                    concrete_args: dict[str, Any] | None) -> fx.GraphModule:
    # the tracer stores tensor constants (`_tensor_constant0`) on its root: give it a shallow
    # copy, so they land there and not on the caller's model
    root = copy.copy(model)
    tracer = Tracer(leaf_modules)
    try:
        graph = tracer.trace(root, concrete_args=concrete_args)
    except Exception as e:
        raise TracingError(
            f"torch.fx could not trace {type(model).__name__}: {summarize(e)}. {_HOW_TO_FIX}"
        ) from e
    return fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)


def _export(model: nn.Module, inputs: tuple[Any, ...]) -> fx.GraphModule:
    """torch.export (non-strict) with a dynamic batch axis when the inputs allow one."""
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    batch = {int(x.shape[0]) for x in tensors if x.dim() > 0}
    dynamic = None
    if len(batch) == 1 and len(tensors) == len(inputs) and batch.pop() > 1:
        dim = torch.export.Dim("batch")
        dynamic = tuple({0: dim} if x.dim() > 0 else None for x in inputs)
    errors = []
    for shapes in ([dynamic, None] if dynamic else [None]):
        try:
            # no_grad: code under torch.no_grad (rotary embeddings) stays in one flat graph
            with warnings.catch_warnings(), torch.no_grad(), quiet_export():
                warnings.simplefilter("ignore")
                program = torch.export.export(model, inputs, strict=False,
                                              dynamic_shapes=shapes)
            return program.module()
        except Exception as e:  # a dynamic batch can fail where a static one works
            errors.append(summarize(e))
    raise TracingError(
        f"torch.export could not capture {type(model).__name__}: {errors[-1]}. Check that the "
        f"model runs on the example inputs; data-dependent control flow needs torch.cond or "
        f"a fixed branch.")


def _check_arity(gm: fx.GraphModule, inputs: tuple[Any, ...], name: str) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [n for n in placeholders if not n.args]  # placeholders without defaults
    if not len(required) <= len(inputs) <= len(placeholders):
        raise TracingError(
            f"{name}.forward takes {len(required)}"
            f"{'' if len(required) == len(placeholders) else f' to {len(placeholders)}'} "
            f"inputs ({', '.join(n.target for n in placeholders)}) but {len(inputs)} example "
            f"inputs were given; pass a tuple with one tensor per argument."
        )


def _is_const(v: Any) -> bool:
    if isinstance(v, (bool, int, float, torch.Size)):
        return True
    return isinstance(v, (tuple, list)) and all(isinstance(x, (bool, int, float)) for x in v)
