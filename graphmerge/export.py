"""Export merged models: ONNX files checked against onnxruntime, and safetensors folders.

- :func:`export_onnx` writes one self-contained ``.onnx`` file with the torch 2.x (dynamo,
  ``torch.export``-based) exporter, with a dynamic batch axis on every input, and proves the
  file right by running it in onnxruntime on the example inputs and on a batch of another size.
- :func:`save_module` writes a :class:`torch.fx.GraphModule`'s generated code
  (:meth:`~torch.fx.GraphModule.to_folder`) plus its weights as ``model.safetensors``.
- :func:`load_state` reads a state dict from ``.safetensors`` or (weights-only) ``.pt``/``.pth``.

Every file or folder is written atomically: it is built under a temporary name in the
destination's directory and moved into place with :func:`os.replace`, so a failure never
leaves a partial file and never touches what was there before.
"""

from __future__ import annotations

import builtins
import inspect
import logging
import os
import pickle
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from graphmerge.errors import ConfigError, DataError, GraphmergeError

__all__ = [
    "ExportReport",
    "export_onnx",
    "save_module",
    "load_state",
    "safetensors_ready",
    "WEIGHTS_FILE",
]

logger = logging.getLogger(__name__)

#: Name of the weights file :func:`save_module` writes inside its folder.
WEIGHTS_FILE = "model.safetensors"
#: Name of the dynamic batch axis in exported ONNX files.
BATCH_AXIS = "batch"
_PT_SUFFIXES = (".pt", ".pth", ".bin")
_SAFETENSORS_SUFFIXES = (".safetensors",)


# --------------------------------------------------------------------------------------
# ONNX export
# --------------------------------------------------------------------------------------


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
    """

    path: Path
    max_abs_diff: float
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    batch_sizes: tuple[int, ...] = ()


def _as_input_tuple(example_inputs: Any) -> tuple[Tensor, ...]:
    """Normalise one tensor or a tuple/list of tensors to a tuple of tensors sharing dim 0.

    Raises:
        ConfigError: not a tensor or a sequence of tensors.
        DataError: a scalar tensor, or inputs whose first (batch) dimensions differ.
    """
    if isinstance(example_inputs, Tensor):
        inputs: tuple[Any, ...] = (example_inputs,)
    elif isinstance(example_inputs, (tuple, list)) and len(example_inputs) > 0:
        inputs = tuple(example_inputs)
    else:
        raise ConfigError(
            f"example_inputs must be a tensor or a non-empty tuple of tensors, got "
            f"{type(example_inputs).__name__}."
        )
    for i, t in enumerate(inputs):
        if not isinstance(t, Tensor):
            raise ConfigError(
                f"example_inputs[{i}] is a {type(t).__name__}; every example input must be a "
                f"torch.Tensor with the batch as its first dimension."
            )
        if t.dim() == 0:
            raise DataError(
                f"example_inputs[{i}] is a scalar tensor; every input needs a batch dimension "
                f"first, e.g. x.unsqueeze(0)."
            )
    batches = {int(t.shape[0]) for t in inputs}
    if len(batches) != 1:
        shapes = [tuple(t.shape) for t in inputs]
        raise DataError(
            f"example inputs have different batch sizes (shapes {shapes}); all inputs must share "
            f"their first dimension."
        )
    if 0 in batches:
        raise DataError("example inputs have batch size 0; pass at least one example.")
    return tuple(t.detach().cpu() for t in inputs)


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
    """Run ``module`` (already in eval mode) under no_grad; outputs as numpy arrays."""
    with torch.no_grad():
        out = module(*inputs)
    return [t.detach().cpu().numpy() for t in _flatten_outputs(out)]


def _max_abs_diff(got: Sequence[np.ndarray], want: Sequence[np.ndarray], batch: int) -> float:
    """Largest absolute elementwise difference between two output lists (float64 arithmetic).

    Raises:
        GraphmergeError: different number of outputs or different shapes.
    """
    if len(got) != len(want):
        raise GraphmergeError(
            f"onnxruntime returned {len(got)} outputs for batch {batch} but torch returned "
            f"{len(want)}; the exported graph does not match the module."
        )
    worst = 0.0
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape:
            raise GraphmergeError(
                f"output {i} has shape {g.shape} in onnxruntime but {w.shape} in torch for batch "
                f"{batch}; the exported graph does not match the module."
            )
        if g.size == 0:
            continue
        g64 = g.astype(np.float64)
        w64 = w.astype(np.float64)
        same = (g64 == w64) | (np.isnan(g64) & np.isnan(w64))  # equal infinities / NaNs count as 0
        diff = np.where(same, 0.0, np.abs(g64 - w64))
        worst = max(worst, float(np.nan_to_num(diff, nan=np.inf).max()))
    return worst


def _remove_quietly(*paths: Path) -> None:
    """Delete files that may or may not exist, ignoring errors (cleanup after a failure)."""
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:  # pragma: no cover - best effort
            logger.warning("could not remove temporary file %s: %s", p, exc)


def export_onnx(
    module: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    path: str | os.PathLike[str],
    *,
    atol: float = 1e-4,
    dynamic_batch: bool = True,
    opset: int | None = None,
) -> ExportReport:
    """Export ``module`` to a single ONNX file and check it against torch in onnxruntime.

    The module is exported in eval mode with ``torch.onnx.export(..., dynamo=True,
    external_data=False)``; with ``dynamic_batch`` every input's first axis is one shared
    dynamic dimension named ``"batch"`` (a ``torch.export.Dim``). An example batch of size 1 is
    repeated to size 2 for tracing, because ``torch.export`` specialises size-1 dimensions.

    The file is checked before it is moved to ``path``: onnxruntime (CPUExecutionProvider) runs
    it on the example inputs and, with ``dynamic_batch``, on a batch of another size (``2 * B +
    1`` rows built by repeating the examples) and compares every output with torch's (eval mode,
    no_grad). The module's train/eval flag is restored afterwards.

    Args:
        module: an ``nn.Module`` or ``torch.fx.GraphModule`` taking the example inputs
            positionally.
        example_inputs: one tensor [B, ...] or a tuple of tensors sharing B (float images,
            int64 token ids and masks, ...).
        path: the ``.onnx`` file to write; its directory must exist.
        atol: the largest accepted absolute difference between onnxruntime and torch outputs.
        dynamic_batch: make the batch axis dynamic (and prove it with a second batch size).
        opset: ONNX opset version; None uses torch's default.

    Returns:
        an :class:`ExportReport`.

    Raises:
        ConfigError: bad arguments (not a module, bad inputs, missing directory, bad atol).
        DataError: inputs without a common batch dimension.
        GraphmergeError: the export or onnxruntime failed, or the outputs differ by more than
            ``atol``. In every failure case no file is left at ``path`` by this call and an
            existing file there is unchanged.
    """
    if not isinstance(module, nn.Module):
        raise ConfigError(f"export_onnx needs a torch.nn.Module, got {type(module).__name__}.")
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not atol >= 0:
        raise ConfigError(f"atol must be a non-negative number, got {atol!r}.")
    inputs = _as_input_tuple(example_inputs)
    target = Path(path)
    if not target.parent.is_dir():
        raise ConfigError(
            f"cannot write {target}: directory {target.parent} does not exist; create it first."
        )
    if target.is_dir():
        raise ConfigError(f"cannot write the ONNX file to {target}: it is a directory.")

    was_training = module.training
    module.eval()
    try:
        return _export_checked(module, inputs, target, float(atol), dynamic_batch, opset)
    finally:
        module.train(was_training)


def _export_checked(
    module: nn.Module,
    inputs: tuple[Tensor, ...],
    target: Path,
    atol: float,
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
    trace_inputs = _resize_batch(inputs, 2) if dynamic_batch and batch < 2 else inputs
    dynamic_shapes: tuple[dict[int, Any], ...] | None = None
    if dynamic_batch:
        dim = torch.export.Dim(BATCH_AXIS)
        dynamic_shapes = tuple({0: dim} for _ in inputs)

    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    side_files = (tmp.with_name(tmp.name + ".data"),)  # in case an exporter writes external data
    try:
        logger.info(
            "Exporting %s to ONNX (inputs %s, dynamic batch: %s)",
            type(module).__name__,
            [(tuple(t.shape), str(t.dtype)) for t in inputs],
            dynamic_batch,
        )
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*axis name.*will not be used")
                warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
                torch.onnx.export(
                    module,
                    trace_inputs,
                    str(tmp),
                    dynamo=True,
                    external_data=False,
                    dynamic_shapes=dynamic_shapes,
                    input_names=list(input_names),
                    output_names=list(output_names),
                    opset_version=opset,
                    verbose=False,
                )
        except GraphmergeError:
            raise
        except Exception as exc:
            raise GraphmergeError(
                f"torch.onnx.export failed for {type(module).__name__} "
                f"({type(exc).__name__}: {exc}). Check that the module runs under torch.export "
                f"with these inputs" + (" and a dynamic batch axis" if dynamic_batch else "") + "."
            ) from exc
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise GraphmergeError(f"torch.onnx.export wrote no ONNX file for {target}.")

        opset_found, onnx_inputs, onnx_outputs = _read_onnx_header(tmp)
        batches = [batch]
        if dynamic_batch:
            batches.append(2 * batch + 1)
        worst = 0.0
        session = _ort_session(tmp)
        for b in batches:
            feeds_torch = inputs if b == batch else _resize_batch(inputs, b)
            want = reference if b == batch else _torch_outputs(module, feeds_torch)
            got = _run_ort(session, onnx_inputs, feeds_torch, b, resized=b != batch)
            diff = _max_abs_diff(got, want, b)
            logger.info("ONNX vs torch, batch %d: max abs diff %.3g", b, diff)
            worst = max(worst, diff)
        if not worst <= atol:
            raise GraphmergeError(
                f"ONNX export of {type(module).__name__} differs from torch: max abs diff "
                f"{worst:.3g} exceeds the tolerance atol={atol:.3g} (batch sizes {batches}). "
                f"The file was not written; raise atol if this precision is acceptable."
            )
        os.replace(tmp, target)
    except BaseException:
        _remove_quietly(tmp, *side_files)
        raise
    _remove_quietly(*side_files)
    logger.info(
        "Wrote %s (opset %d): max abs diff vs torch %.3g <= atol %.3g",
        target,
        opset_found,
        worst,
        atol,
    )
    return ExportReport(
        path=target,
        max_abs_diff=worst,
        opset=opset_found,
        input_names=onnx_inputs,
        output_names=onnx_outputs,
        batch_sizes=tuple(batches),
    )


def _read_onnx_header(path: Path) -> tuple[int, tuple[str, ...], tuple[str, ...]]:
    """Load an ONNX file and return (default-domain opset, input names, output names).

    Initializers listed as graph inputs are not counted as inputs.
    """
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise GraphmergeError(
            f"the exported file {path} is not a readable ONNX model: {exc}"
        ) from exc
    opset = next(
        (int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), -1
    )
    initializers = {init.name for init in model.graph.initializer}
    names_in = tuple(i.name for i in model.graph.input if i.name not in initializers)
    names_out = tuple(o.name for o in model.graph.output)
    return opset, names_in, names_out


def _ort_session(path: Path) -> Any:
    """An onnxruntime InferenceSession on the CPU provider, with warnings silenced."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise GraphmergeError(f"onnxruntime could not load the exported model: {exc}") from exc


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
            f"({type(exc).__name__}: {exc})"
            + ("; the batch axis is probably not dynamic." if resized else ".")
        ) from exc


# --------------------------------------------------------------------------------------
# safetensors folders and state dicts
# --------------------------------------------------------------------------------------


def safetensors_ready(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """A state dict that :func:`safetensors.torch.save_file` accepts.

    Every tensor is detached, moved to the CPU and copied into its own contiguous memory, so
    tensors that shared storage (tied weights, views) are saved as independent copies under
    every key and load back with strict key checking.

    Args:
        state: name -> tensor (any shapes, devices, dtypes).

    Returns:
        name -> contiguous CPU tensor, same shapes and values.

    Raises:
        DataError: a value is not a tensor (e.g. a module's ``extra_state``).
    """
    out: dict[str, Tensor] = {}
    for name, value in state.items():
        if not isinstance(value, Tensor):
            raise DataError(
                f"state entry {name!r} is a {type(value).__name__}, not a tensor; safetensors "
                f"stores tensors only."
            )
        out[str(name)] = value.detach().to("cpu", copy=True).contiguous()
    return out


def _save_safetensors(state: Mapping[str, Any], path: Path, metadata: dict[str, str]) -> None:
    """Write ``state`` to ``path`` with :func:`safetensors.torch.save_file` (not atomic)."""
    from safetensors.torch import save_file

    save_file(safetensors_ready(state), str(path), metadata=metadata)


# Names GraphModule.to_folder defines itself, or that are Python builtins.
_TO_FOLDER_NAMES = frozenset(
    {"inf", "nan", "NoneType", "torch", "device", "fx_pytree", "pytree"} | set(dir(builtins))
)


def _extra_imports(module: torch.fx.GraphModule) -> str:
    """Import lines for the globals the generated forward uses that to_folder does not emit.

    ``to_folder`` only writes imports for torch's own code-generation globals; functions
    called through ``torch.fx.wrap`` (or other non-torch callables) would be undefined names.
    Each module-level function, class or module among the code's globals gets an import
    line; string globals are annotation aliases, harmless under postponed annotations.
    """
    code_globals = module.graph.python_code(root_module="self").globals
    lines: list[str] = []
    for i, (name, value) in enumerate(sorted(code_globals.items())):
        if name in _TO_FOLDER_NAMES or isinstance(value, str):
            continue
        if inspect.ismodule(value):
            lines.append(f"import {value.__name__} as {name}")
            continue
        owner = getattr(value, "__module__", None)
        qualname = getattr(value, "__qualname__", None)
        if isinstance(owner, str) and isinstance(qualname, str) and "<" not in qualname:
            lines.append(f"import {owner} as _gm_import_{i}")
            lines.append(f"{name} = _gm_import_{i}.{qualname}")
        else:
            logger.warning(
                "save_module: the generated code uses %s = %r, which cannot be imported by "
                "name; importing the saved folder will fail, but its weights are fine",
                name,
                value,
            )
    return "".join(line + "\n" for line in lines)


def _rewrite_generated_code(module: torch.fx.GraphModule, folder: Path, build_dir: Path) -> None:
    """Make the ``module.py`` written by ``to_folder`` independent of the build directory.

    ``GraphModule.to_folder`` hard-codes absolute paths into ``build_dir`` and loads the
    weights from a pickled ``state_dict.pt``. This rewrites every path to be relative to the
    file itself and loads the weights from ``model.safetensors`` instead.
    """
    code_file = build_dir / "module.py"
    code = code_file.read_text()
    prefix = f"r'{build_dir}/"
    state_load = f"torch.load({prefix}state_dict.pt')"
    if state_load not in code:
        raise GraphmergeError(
            f"unexpected GraphModule.to_folder output in {code_file}: the state-dict load line "
            f"was not found, so the code cannot be pointed at {WEIGHTS_FILE}."
        )
    code = code.replace(
        state_load, f"_load_safetensors(_os.path.join(_HERE, '{WEIGHTS_FILE}'))"
    )
    # torch.load(r'<build>/stem.pt', weights_only=False)
    #   -> torch.load(_os.path.join(_HERE, r'stem.pt'), weights_only=False)
    code = code.replace(prefix, "_os.path.join(_HERE, r'")
    code = code.replace(".pt', weights_only", ".pt'), weights_only")
    # fx emits `torch.fx._symbolic_trace.wrap("fn")` for wrapped functions; to_folder indents
    # it into the class body, where it raises. It only matters for re-tracing: drop it.
    code = re.sub(r"(?m)^[ \t]*torch\.fx\._symbolic_trace\.wrap\([^\n]*\)[ \t]*\n", "", code)
    if str(build_dir) in code:
        raise GraphmergeError(
            f"could not make {code_file} relocatable: it still names the build directory "
            f"{build_dir}."
        )
    header = (
        "# Generated by graphmerge.save_module from torch.fx.GraphModule.to_folder.\n"
        f"# Weights are read from {WEIGHTS_FILE}; the *.pt files hold pickled submodules\n"
        "# (the module structure), so only import this folder from a source you trust.\n"
        "from __future__ import annotations  # fx annotations name aliases to_folder omits\n"
        "import os as _os\n"
        "from safetensors.torch import load_file as _load_safetensors\n"
        "_HERE = _os.path.dirname(_os.path.abspath(__file__))\n"
        f"{_extra_imports(module)}"
    )
    code_file.write_text(header + code)
    (build_dir / "state_dict.pt").unlink(missing_ok=True)
    logger.debug("Rewrote %s to load %s relative to %s", code_file, WEIGHTS_FILE, folder)


def save_module(
    module: torch.fx.GraphModule | nn.Module,
    folder: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    module_name: str = "FxModule",
) -> Path:
    """Save a module's weights (and, for a GraphModule, its generated code) to ``folder``.

    Contents of the folder:

    - ``model.safetensors``: the full ``state_dict()`` (every tensor contiguous, shared
      tensors stored as separate copies), readable with :func:`load_state`.
    - for a :class:`torch.fx.GraphModule` only: the code of
      :meth:`~torch.fx.GraphModule.to_folder` (``module.py``, ``__init__.py`` and one pickled
      ``<child>.pt`` per child module whose repr is not code), rewritten so that it loads its
      weights from ``model.safetensors`` relative to its own location:
      ``from <folder> import <module_name>`` rebuilds the module.

    The folder is built under a temporary name next to ``folder`` and renamed into place.

    Args:
        module: the module to save.
        folder: destination directory (its parent must exist).
        overwrite: replace an existing non-empty ``folder``.
        module_name: class name of the generated module (GraphModule only).

    Returns:
        the folder path.

    Raises:
        ConfigError: ``folder`` exists and is a file, or is a non-empty directory and
            ``overwrite`` is False; the parent directory is missing; bad module_name.
        DataError: a state entry is not a tensor.
    """
    if not isinstance(module, nn.Module):
        raise ConfigError(f"save_module needs a torch.nn.Module, got {type(module).__name__}.")
    if not module_name.isidentifier():
        raise ConfigError(f"module_name must be a Python identifier, got {module_name!r}.")
    target = Path(folder)
    if not target.parent.is_dir():
        raise ConfigError(
            f"cannot save to {target}: directory {target.parent} does not exist; create it first."
        )
    _check_destination(target, overwrite)

    build_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        metadata = {"format": "pt", "module_class": type(module).__qualname__}
        if isinstance(module, torch.fx.GraphModule):
            with warnings.catch_warnings():  # pickled child modules are expected, see above
                warnings.filterwarnings("ignore", message=r".*saved as pickled files instead")
                module.to_folder(build_dir, module_name=module_name)
            _rewrite_generated_code(module, target, build_dir)
            metadata["module_name"] = module_name
        _save_safetensors(module.state_dict(), build_dir / WEIGHTS_FILE, metadata)
        _move_into_place(build_dir, target, overwrite)
    except BaseException:
        shutil.rmtree(build_dir, ignore_errors=True)
        raise
    logger.info("Saved %s to %s", type(module).__name__, target)
    return target


def _check_destination(target: Path, overwrite: bool) -> None:
    """Raise ConfigError if ``target`` may not be (re)placed."""
    if target.exists() and not target.is_dir():
        raise ConfigError(f"cannot save a module to {target}: it exists and is not a directory.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ConfigError(
            f"folder {target} already exists and is not empty; pass overwrite=True to replace "
            f"it, or choose another folder."
        )


def _move_into_place(build_dir: Path, target: Path, overwrite: bool) -> None:
    """Rename ``build_dir`` to ``target``; an existing target is swapped out, then deleted."""
    _check_destination(target, overwrite)  # again: the folder may have appeared meanwhile
    if not target.exists() or not any(target.iterdir()):
        os.replace(build_dir, target)  # replaces a missing or empty directory atomically
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rmdir(backup)
    os.replace(target, backup)
    try:
        os.replace(build_dir, target)
    except BaseException:
        os.replace(backup, target)  # put the old folder back
        raise
    shutil.rmtree(backup, ignore_errors=True)


def load_state(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a state dict (name -> tensor) from a file, never unpickling arbitrary objects.

    ``.safetensors`` files are read with :func:`safetensors.torch.load_file`; ``.pt``,
    ``.pth`` and ``.bin`` files with ``torch.load(weights_only=True)``, which only rebuilds
    tensors and plain containers. A folder written by :func:`save_module` may be given too
    (its ``model.safetensors`` is read).

    Args:
        path: the file (or a :func:`save_module` folder).

    Returns:
        name -> CPU tensor.

    Raises:
        ConfigError: unknown suffix; a pickle that needs full unpickling (convert it to
            safetensors); a file that holds something other than a flat name -> tensor dict.
        DataError: the file is missing or corrupt.
    """
    file = Path(path)
    if file.is_dir():
        file = file / WEIGHTS_FILE
    if not file.is_file():
        raise DataError(f"weights file {file} does not exist.")
    suffix = file.suffix.lower()
    if suffix in _SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(file), device="cpu")
        except Exception as exc:
            raise DataError(
                f"{file} is not a readable safetensors file ({type(exc).__name__}: {exc})."
            ) from exc
    elif suffix in _PT_SUFFIXES:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ConfigError(
                f"{file} cannot be loaded with torch.load(weights_only=True): it contains "
                f"objects other than tensors and plain containers, and graphmerge never unpickles "
                f"arbitrary objects. If you trust the file, convert it to safetensors once, e.g. "
                f"safetensors.torch.save_file(torch.load(path, weights_only=False), "
                f"'model.safetensors') (after extracting the state dict), and load that. "
                f"Details: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from exc
        except Exception as exc:
            raise DataError(
                f"{file} is not a readable torch checkpoint ({type(exc).__name__}: {exc})."
            ) from exc
    else:
        raise ConfigError(
            f"unknown weights file type {file.suffix!r} for {file}; use .safetensors (preferred) "
            f"or .pt/.pth/.bin."
        )
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        kinds = (
            sorted({type(v).__name__ for v in state.values()})
            if isinstance(state, Mapping)
            else [type(state).__name__]
        )
        raise ConfigError(
            f"{file} does not hold a flat state dict of name -> tensor (found {kinds}); if it is "
            f"a checkpoint, save its state dict alone (e.g. ckpt['state_dict'])."
        )
    logger.debug("Loaded %d tensors from %s", len(state), file)
    return dict(state)
