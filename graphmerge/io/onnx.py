"""ONNX export checked against onnxruntime.

:func:`export_onnx` writes one self-contained ``.onnx`` file with the torch 2.x (dynamo,
``torch.export``-based) exporter, with a dynamic batch axis on every input, and proves the file
right by running it in onnxruntime on the example inputs and on a batch of another size. The
file is written atomically (:mod:`graphmerge.io.atomic`).

Outputs are compared relative to their scale: output ``i`` passes when ``max|onnx - torch| <=
atol + rtol * max|torch|``, so random-init models whose logits reach 1e8 are not refused for
float32 rounding, while a wrong graph (relative error far above float32's) still is.

When torch.onnx cannot convert the module as traced, it is converted again from its core-ATen
decomposition (``ExportedProgram.run_decompositions()``): transformers' attention traced with
torch's fused CPU kernel records views that torch.onnx's own decomposition cannot replay (T5,
Swin: "Cannot view a tensor with shape ..."). When the dynamic batch axis cannot be exported at
all, the file is written with the example's batch size fixed, and a one-line ``UserWarning``
says so.
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from graphmerge.errors import ConfigError, DataError, GraphmergeError, summarize
from graphmerge.graph.capture import check_materialized, eval_mode, quiet_export
from graphmerge.inputs import tensor_inputs
from graphmerge.io.atomic import as_path, atomic_file, check_flag
from graphmerge.io.folder import cpu_copy

__all__ = ["ExportReport", "export_onnx"]

logger = logging.getLogger(__name__)

#: Name of the dynamic batch axis in exported ONNX files.
BATCH_AXIS = "batch"

#: Default relative tolerance: float32 rounding through a deep network stays far below it, a
#: wrong op (a missing bias, a swapped axis) is far above it.
RTOL = 1e-4


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and how well it matches torch.

    Attributes:
        path: the ONNX file written.
        max_abs_diff: the largest ``|onnxruntime - torch|`` over every output element of every
            batch checked.
        opset: the default-domain (``ai.onnx``) opset version of the file.
        input_names: the graph's input names, in the order of the example inputs.
        output_names: the graph's output names, in the order of the module's flattened outputs.
        batch_sizes: the batch sizes that were run in onnxruntime and compared with torch (the
            example batch first; a second, different one when the batch axis is dynamic).
        max_rel_diff: the largest relative error over outputs and batches: an output's
            ``max|onnxruntime - torch|`` divided by its scale ``max|torch|`` (0 when both are 0).
        dynamic_batch: whether the file's batch axis is dynamic (False when it was asked for but
            could not be exported and the example's batch size was fixed instead).
        notes: one line per fallback the export took (core-ATen decomposition, fixed batch).
    """

    path: Path
    max_abs_diff: float
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    batch_sizes: tuple[int, ...] = ()
    max_rel_diff: float = 0.0
    dynamic_batch: bool = False
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Tolerance:
    """Accepted difference for an output of scale ``max|torch|``: ``atol + rtol * scale``."""

    atol: float
    rtol: float

    def bound(self, scale: float) -> float:
        """The largest accepted ``max|onnx - torch|`` for an output of this scale."""
        return self.atol + self.rtol * scale


def _resize_batch(inputs: tuple[Tensor, ...], size: int) -> tuple[Tensor, ...]:
    """Build inputs of batch ``size`` from the examples by repeating and slicing them.

    Rows are taken from the examples in order, then in reverse order, and so on, so that a
    larger batch is not a mere tiling of the same pattern.

    Args:
        inputs: tensors [B, ...] sharing B.
        size: wanted batch size (>= 1).

    Returns:
        tensors [size, ...], same dtypes.
    """
    b = int(inputs[0].shape[0])
    order = torch.arange(b)
    index = torch.cat([order if i % 2 == 0 else order.flip(0) for i in range(-(-size // b))])
    index = index[:size]
    return tuple(t.index_select(0, index) for t in inputs)


def _input_names(module: nn.Module, count: int) -> tuple[str, ...]:
    """Graph input names: the forward's positional parameter names when they fit, else input_i."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = [
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if len(positional) >= count and len(set(positional[:count])) == count:
        return tuple(positional[:count])
    return tuple(f"input_{i}" for i in range(count))


def _flatten_outputs(output: Any) -> list[Tensor]:
    """The tensors of a module's output (a tensor, or nested tuples/lists/dicts of tensors)."""
    leaves, _ = torch.utils._pytree.tree_flatten(output)
    tensors = [leaf for leaf in leaves if isinstance(leaf, Tensor)]
    if not tensors:
        raise GraphmergeError(
            f"the module returned no tensor (got {type(output).__name__}); export_onnx needs a "
            f"module whose forward returns tensors."
        )
    return tensors


def _torch_outputs(module: nn.Module, inputs: tuple[Tensor, ...]) -> list[np.ndarray]:
    """Run ``module`` (already in eval mode) under no_grad; outputs as numpy arrays.

    Raises:
        DataError: the module does not run on these inputs (shapes, dtypes).
    """
    try:
        with torch.no_grad():
            out = module(*inputs)
    except Exception as exc:
        raise DataError(
            f"{type(module).__name__} does not run on inputs of shapes "
            f"{[tuple(t.shape) for t in inputs]} ({summarize(exc)}); pass example inputs the "
            f"module accepts."
        ) from exc
    return [t.detach().cpu().numpy() for t in _flatten_outputs(out)]


def _output_diffs(
    got: Sequence[np.ndarray], want: Sequence[np.ndarray], batch: int
) -> list[tuple[float, float]]:
    """Per output, (max absolute difference, scale ``max|torch|``), in float64 arithmetic.

    Equal infinities and NaNs count as no difference; a NaN or infinity on one side only is an
    infinite difference. The scale is taken over torch's finite values.

    Raises:
        GraphmergeError: different number of outputs or different shapes.
    """
    if len(got) != len(want):
        raise GraphmergeError(
            f"onnxruntime returned {len(got)} outputs for batch {batch} but torch returned "
            f"{len(want)}; the exported graph does not match the module."
        )
    diffs = []
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape:
            raise GraphmergeError(
                f"output {i} has shape {g.shape} in onnxruntime but {w.shape} in torch for batch "
                f"{batch}; the exported graph does not match the module."
            )
        if g.size == 0:
            diffs.append((0.0, 0.0))
            continue
        g64 = g.astype(np.float64)
        w64 = w.astype(np.float64)
        same = (g64 == w64) | (np.isnan(g64) & np.isnan(w64))  # equal infinities / NaNs count as 0
        diff = np.where(same, 0.0, np.abs(g64 - w64))
        finite = np.abs(w64[np.isfinite(w64)])
        diffs.append((float(np.nan_to_num(diff, nan=np.inf).max()),
                      float(finite.max()) if finite.size else 0.0))
    return diffs


def _relative(diff: float, scale: float) -> float:
    """``diff / scale``; 0 when both are 0, infinite for a difference on an all-zero output."""
    if diff == 0.0:
        return 0.0
    return diff / scale if scale > 0.0 else float("inf")


def export_onnx(
    module: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    path: str | os.PathLike[str],
    *,
    atol: float = 1e-4,
    rtol: float = RTOL,
    dynamic_batch: bool = True,
    opset: int | None = None,
) -> ExportReport:
    """Export ``module`` to a single ONNX file and check it against torch in onnxruntime.

    The module is exported in eval mode with ``torch.onnx.export(..., dynamo=True,
    external_data=False)``; with ``dynamic_batch`` every input's first axis is one shared
    dynamic dimension named ``"batch"`` (a ``torch.export.Dim``). An example batch of size 1 is
    repeated to size 2 for tracing, because ``torch.export`` specialises size-1 dimensions. If
    torch.onnx fails on the module as traced, its core-ATen decomposition is exported instead;
    if the dynamic batch axis cannot be exported either way, the example's batch size is fixed
    in the file and a one-line ``UserWarning`` says so (see the report's ``notes``).

    The file is checked before it is moved to ``path``: onnxruntime (CPUExecutionProvider) runs
    it on the example inputs and, when the batch axis is dynamic, on a batch of another size
    (``2 * B + 1`` rows built by repeating the examples) and compares every output with torch's
    (eval mode, no_grad): output ``i`` passes when ``max|onnx - torch| <= atol + rtol *
    max|torch|``. The module's train/eval flag is restored afterwards.

    Args:
        module: an ``nn.Module`` or ``torch.fx.GraphModule`` taking the example inputs
            positionally.
        example_inputs: one tensor [B, ...] or a tuple of tensors sharing B (float images,
            int64 token ids and masks, ...).
        path: the ``.onnx`` file to write; its directory must exist.
        atol: the absolute floor of the accepted difference (what outputs near zero may differ
            by).
        rtol: the accepted difference relative to each output's scale ``max|torch|``; 0 makes
            the check purely absolute.
        dynamic_batch: make the batch axis dynamic (and prove it with a second batch size).
        opset: ONNX opset version; None uses torch's default.

    Returns:
        an :class:`ExportReport` (absolute and relative differences, whether the batch axis is
        dynamic, the fallbacks taken).

    Raises:
        ConfigError: bad arguments (not a module, bad inputs, missing directory, bad atol/rtol).
        DataError: inputs without a common batch dimension.
        GraphmergeError: the export or onnxruntime failed, or an output differs by more than
            ``atol + rtol * max|torch|``. In every failure case no file is left at ``path`` by
            this call and an existing file there is unchanged.
    """
    if not isinstance(module, nn.Module):
        raise ConfigError(f"export_onnx needs a torch.nn.Module, got {type(module).__name__}.")
    for name, value in (("atol", atol), ("rtol", rtol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ConfigError(f"{name} must be a non-negative number, got {value!r}.")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int)):
        raise ConfigError(f"opset must be None or an int ONNX opset version, got {opset!r}.")
    check_materialized(module, f"the {type(module).__name__} to export")
    check_flag(dynamic_batch, "dynamic_batch")
    inputs = tensor_inputs(example_inputs, "example_inputs")
    target = as_path(path, "path")
    if not target.parent.is_dir():
        raise ConfigError(
            f"cannot write {target}: directory {target.parent} does not exist; create it first."
        )
    if target.is_dir():
        raise ConfigError(f"cannot write the ONNX file to {target}: it is a directory.")

    tolerance = _Tolerance(float(atol), float(rtol))
    module = cpu_copy(module)  # exported and checked on the CPU; the caller's module stays put
    inputs = tuple(t.cpu() for t in inputs)
    with eval_mode(module):
        return _export_checked(module, inputs, target, tolerance, dynamic_batch, opset)


def _export_checked(
    module: nn.Module,
    inputs: tuple[Tensor, ...],
    target: Path,
    tolerance: _Tolerance,
    dynamic_batch: bool,
    opset: int | None,
) -> ExportReport:
    """Export to a temporary file next to ``target``, check it, then move it into place."""
    batch = int(inputs[0].shape[0])
    input_names = _input_names(module, len(inputs))
    reference = _torch_outputs(module, inputs)
    output_names = (
        ("output",) if len(reference) == 1 else tuple(f"output_{i}" for i in range(len(reference)))
    )

    with atomic_file(target) as tmp:
        side_file = tmp.with_name(tmp.name + ".data")  # in case an exporter writes external data
        try:
            logger.info(
                "Exporting %s to ONNX (inputs %s, dynamic batch: %s)",
                type(module).__name__,
                [(tuple(t.shape), str(t.dtype)) for t in inputs],
                dynamic_batch,
            )
            dynamic, notes = _write_with_fallbacks(
                module, inputs, tmp, (input_names, output_names), dynamic_batch, opset
            )
            if not tmp.is_file() or tmp.stat().st_size == 0:
                raise GraphmergeError(f"torch.onnx.export wrote no ONNX file for {target}.")

            opset_found, onnx_inputs, onnx_outputs, symbolic = _read_onnx_header(tmp)
            if dynamic and not symbolic:  # torch.onnx relaxed a Dim the module specialises
                dynamic = False
                notes = (f"torch.export made the batch axis a constant (the module's code fixes "
                         f"it); the file has the example's batch size {batch} fixed.", *notes)
            batches = [batch, 2 * batch + 1] if dynamic else [batch]
            worst, worst_rel = _check_onnx(
                module, tmp, inputs, reference, (onnx_inputs, onnx_outputs), batches, tolerance
            )
        finally:
            side_file.unlink(missing_ok=True)
    if dynamic_batch and not dynamic:  # the file accepts less than asked: say so, once
        warnings.warn(f"export_onnx: {notes[0]}", UserWarning, stacklevel=3)
    logger.info(
        "Wrote %s (opset %d): max abs diff vs torch %.3g, relative error %.3g (atol %.3g, "
        "rtol %.3g)", target, opset_found, worst, worst_rel, tolerance.atol, tolerance.rtol,
    )
    return ExportReport(
        path=target,
        max_abs_diff=worst,
        opset=opset_found,
        input_names=onnx_inputs,
        output_names=onnx_outputs,
        batch_sizes=tuple(batches),
        max_rel_diff=worst_rel,
        dynamic_batch=dynamic,
        notes=notes,
    )


def _write_with_fallbacks(
    module: nn.Module,
    inputs: tuple[Tensor, ...],
    tmp: Path,
    names: tuple[tuple[str, ...], tuple[str, ...]],
    dynamic_batch: bool,
    opset: int | None,
) -> tuple[bool, tuple[str, ...]]:
    """Write the ONNX file into ``tmp``, trying in turn: the module as traced, then its
    core-ATen decomposition; with the batch axis dynamic if asked, then with it fixed.

    Returns:
        (whether the written file's batch axis is dynamic, one note per fallback taken).

    Raises:
        GraphmergeError: every attempt failed; the first attempt's error (the others are
            logged).
    """
    batch = int(inputs[0].shape[0])
    first: GraphmergeError | None = None
    for dynamic in (True, False) if dynamic_batch else (False,):
        trace_inputs = _resize_batch(inputs, 2) if dynamic and batch < 2 else inputs
        for decomposed in (False, True):
            try:
                _write_onnx(module, trace_inputs, tmp, names, dynamic, opset, decomposed)
            except GraphmergeError as exc:
                logger.info("ONNX export attempt (dynamic batch: %s, core-ATen decomposition: "
                            "%s) failed: %s", dynamic, decomposed, exc)
                first = first or exc
                continue
            return dynamic, _fallback_notes(first, dynamic_batch, dynamic, decomposed, batch)
    raise first if first is not None else GraphmergeError("torch.onnx.export was not run.")


def _fallback_notes(
    error: GraphmergeError | None, asked: bool, dynamic: bool, decomposed: bool, batch: int
) -> tuple[str, ...]:
    """One line per fallback that the successful attempt took (the fixed batch first)."""
    notes = []
    reason = str(error).split("\n", 1)[0]
    if asked and not dynamic:
        notes.append(f"the dynamic batch axis could not be exported ({reason}); the file has the "
                     f"example's batch size {batch} fixed.")
    if decomposed:
        notes.append("torch.onnx could not convert the module as traced; its core-ATen "
                     "decomposition was exported instead.")
        logger.info("ONNX export: %s", notes[-1])
    return tuple(notes)


def _write_onnx(
    module: nn.Module,
    trace_inputs: tuple[Tensor, ...],
    tmp: Path,
    names: tuple[tuple[str, ...], tuple[str, ...]],
    dynamic_batch: bool,
    opset: int | None,
    decomposed: bool = False,
) -> None:
    """Run the dynamo ONNX exporter into ``tmp``, with the batch axis dynamic if asked; an
    exporter failure becomes a GraphmergeError naming the module.

    With ``decomposed``, the module is first exported with ``torch.export`` and decomposed to
    core ATen ops, and that program is converted: views that the trace recorded from a fused
    kernel's strides are re-derived from the decomposed ops' own.
    """
    dynamic_shapes: tuple[dict[int, Any], ...] | None = None
    if dynamic_batch:
        dim = torch.export.Dim(BATCH_AXIS)
        dynamic_shapes = tuple({0: dim} for _ in trace_inputs)
    try:
        with warnings.catch_warnings(), quiet_export():
            warnings.filterwarnings("ignore", message=r".*axis name.*will not be used")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
            exported: Any = module
            if decomposed:
                exported = torch.export.export(
                    module, trace_inputs, dynamic_shapes=dynamic_shapes, strict=False
                ).run_decompositions()
            torch.onnx.export(
                exported,
                trace_inputs,
                str(tmp),
                dynamo=True,
                external_data=False,
                dynamic_shapes=None if decomposed else dynamic_shapes,
                input_names=list(names[0]),
                output_names=list(names[1]),
                opset_version=opset,
                verbose=False,
            )
    except GraphmergeError:
        raise
    except Exception as exc:
        raise GraphmergeError(
            f"torch.onnx.export failed for {type(module).__name__}: {summarize(exc)}. "
            f"Check that the module runs under torch.export with these inputs"
            + (" and a dynamic batch axis" if dynamic_batch else "") + "."
        ) from exc


def _check_onnx(
    module: nn.Module,
    tmp: Path,
    inputs: tuple[Tensor, ...],
    reference: list[np.ndarray],
    names: tuple[tuple[str, ...], tuple[str, ...]],
    batches: list[int],
    tolerance: _Tolerance,
) -> tuple[float, float]:
    """Run the ONNX file at every batch size in ``batches`` (the first is the inputs' own)
    and compare each output with torch; returns the largest absolute difference and the
    largest relative error, GraphmergeError if an output differs by more than
    ``tolerance.bound(max|torch|)``."""
    onnx_inputs, onnx_outputs = names
    batch = batches[0]
    worst = worst_rel = 0.0
    session = _ort_session(tmp)
    for b in batches:
        feeds_torch = inputs if b == batch else _resize_batch(inputs, b)
        want = reference if b == batch else _torch_outputs(module, feeds_torch)
        got = _run_ort(session, onnx_inputs, feeds_torch, b, resized=b != batch)
        for i, (diff, scale) in enumerate(_output_diffs(got, want, b)):
            rel = _relative(diff, scale)
            logger.info("ONNX vs torch, batch %d, output %d: max abs diff %.3g, scale %.3g, "
                        "relative error %.3g", b, i, diff, scale, rel)
            if not diff <= tolerance.bound(scale):
                name = onnx_outputs[i] if i < len(onnx_outputs) else str(i)
                raise GraphmergeError(
                    f"ONNX export of {type(module).__name__} differs from torch: output "
                    f"{name!r} (batch {b}) has max abs diff {diff:.3g}, a relative error of "
                    f"{rel:.3g} of its scale max|torch| = {scale:.3g}, above the tolerance "
                    f"{tolerance.bound(scale):.3g} = atol + rtol * scale (atol="
                    f"{tolerance.atol:.3g}, rtol={tolerance.rtol:.3g}; batch sizes {batches}). "
                    f"The file was not written; raise rtol (or atol, for outputs near zero) if "
                    f"this precision is acceptable."
                )
            worst, worst_rel = max(worst, diff), max(worst_rel, rel)
    return worst, worst_rel


def _read_onnx_header(path: Path) -> tuple[int, tuple[str, ...], tuple[str, ...], bool]:
    """Load an ONNX file and return (default-domain opset, input names, output names, whether
    every input's first axis is symbolic).

    Initializers listed as graph inputs are not counted as inputs.
    """
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise GraphmergeError(
            f"the exported file {path} is not a readable ONNX model: {summarize(exc)}"
        ) from exc
    opset = next(
        (int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), -1
    )
    initializers = {init.name for init in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    names_in = tuple(i.name for i in graph_inputs)
    names_out = tuple(o.name for o in model.graph.output)
    dims = [i.type.tensor_type.shape.dim for i in graph_inputs]
    symbolic = all(len(d) > 0 and d[0].HasField("dim_param") for d in dims)
    return opset, names_in, names_out, symbolic


def _ort_session(path: Path) -> Any:
    """An onnxruntime InferenceSession on the CPU provider, with warnings silenced."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise GraphmergeError(
            f"onnxruntime could not load the exported model: {summarize(exc)}") from exc


def _run_ort(
    session: Any, names: tuple[str, ...], inputs: tuple[Tensor, ...], batch: int, resized: bool
) -> list[np.ndarray]:
    """Run the session on ``inputs`` (one tensor per graph input); outputs as numpy arrays.

    ``resized`` says the batch size differs from the traced one (for the error message).
    """
    if len(names) != len(inputs):
        raise GraphmergeError(
            f"the exported graph has {len(names)} inputs {list(names)} but {len(inputs)} example "
            f"inputs were given; inputs that the model ignores or treats as constants are not "
            f"supported."
        )
    feeds = {name: t.numpy() for name, t in zip(names, inputs)}
    try:
        return [np.asarray(o) for o in session.run(None, feeds)]
    except Exception as exc:
        raise GraphmergeError(
            f"onnxruntime failed to run the exported model on a batch of {batch} "
            f"({summarize(exc)})"
            + ("; the batch axis is probably not dynamic." if resized else ".")
        ) from exc


