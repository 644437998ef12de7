"""Folders and state dicts: a GraphModule's generated code plus its weights as safetensors, and
safe loading of weights files.

- :func:`save_module` writes a :class:`torch.fx.GraphModule`'s generated code
  (:meth:`~torch.fx.GraphModule.to_folder`) plus its weights as ``model.safetensors``.
- :func:`load_module` rebuilds the saved module (imports its code: trusted folders only).
- :func:`load_state` reads a state dict from ``.safetensors`` or (weights-only) ``.pt``/``.pth``.

Folders are written atomically (:mod:`graphmerge.io.atomic`).
"""

from __future__ import annotations

import builtins
import copy
import inspect
import logging
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from graphmerge.errors import ConfigError, DataError, GraphmergeError, summarize
from graphmerge.graph.capture import check_materialized
from graphmerge.io.atomic import as_path, atomic_folder

__all__ = ["save_module", "load_module", "load_state", "safetensors_ready", "cpu_copy",
           "WEIGHTS_FILE"]

logger = logging.getLogger(__name__)

#: Name of the weights file :func:`save_module` writes inside its folder.
WEIGHTS_FILE = "model.safetensors"
_PT_SUFFIXES = (".pt", ".pth", ".bin")
_SAFETENSORS_SUFFIXES = (".safetensors",)




def cpu_copy(module: nn.Module) -> nn.Module:
    """`module` itself when every tensor it holds is on the CPU, else a copy on the CPU
    (parameters, buffers and plain tensor attributes such as an fx graph's constants); the
    caller's module stays where it is."""
    def tensors(m: nn.Module) -> list[Tensor]:
        return [*m.parameters(), *m.buffers(),
                *(v for sub in m.modules() for v in vars(sub).values() if isinstance(v, Tensor))]

    if all(t.device.type == "cpu" for t in tensors(module)):
        return module
    out = copy.deepcopy(module).cpu()
    for sub in out.modules():
        for key, value in list(vars(sub).items()):
            if isinstance(value, Tensor) and value.device.type != "cpu":
                setattr(sub, key, value.cpu())
    return out


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
    if not isinstance(module_name, str) or not module_name.isidentifier():
        raise ConfigError(f"module_name must be a Python identifier, got {module_name!r}.")
    check_materialized(module, f"the {type(module).__name__} to save")
    module = cpu_copy(module)  # a GPU module is saved from a CPU copy: it loads anywhere
    target = as_path(folder, "folder")
    with atomic_folder(target, overwrite) as build_dir:
        metadata = {"format": "pt", "module_class": type(module).__qualname__}
        if isinstance(module, torch.fx.GraphModule):
            with warnings.catch_warnings():  # pickled child modules are expected, see above
                warnings.filterwarnings("ignore", message=r".*saved as pickled files instead")
                module.to_folder(build_dir, module_name=module_name)
            _rewrite_generated_code(module, target, build_dir)
            metadata["module_name"] = module_name
        _save_safetensors(module.state_dict(), build_dir / WEIGHTS_FILE, metadata)
    logger.info("Saved %s to %s", type(module).__name__, target)
    return target


def load_module(folder: str | os.PathLike[str]) -> nn.Module:
    """Rebuild the module :func:`save_module` wrote to ``folder`` (a GraphModule's code and
    weights), in eval mode. This imports the folder's code and unpickles its ``*.pt`` child
    modules: only load folders from a source you trust (:func:`load_state` reads the weights
    alone, safely).

    Example: ``merged = graphmerge.load_module("out/merged")``.

    Raises:
        DataError: the folder has no code (e.g. saved from a plain nn.Module) or no weights.
    """
    import importlib.util
    import sys

    from safetensors import safe_open

    root = as_path(folder, "folder").resolve()
    init, weights = root / "__init__.py", root / WEIGHTS_FILE
    if not init.is_file() or not weights.is_file():
        raise DataError(f"{root} is not a folder written by save_module for a GraphModule "
                        f"(it needs __init__.py, module.py and {WEIGHTS_FILE}).")
    try:
        with safe_open(str(weights), framework="pt") as f:
            class_name = (f.metadata() or {}).get("module_name", "FxModule")
    except Exception as exc:
        raise DataError(f"{weights} is not a readable safetensors file ({summarize(exc)}).") from exc
    name = f"_graphmerge_saved_{abs(hash(str(root))):x}"
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[
        str(root)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    try:
        spec.loader.exec_module(package)
        module = getattr(package, class_name)()
    except Exception as exc:
        raise DataError(f"the module saved in {root} could not be rebuilt ({summarize(exc)}); "
                        f"its weights alone can be read with graphmerge.load_state.") from exc
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
    return module.eval()


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
    file = as_path(path)
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
                f"{file} is not a readable safetensors file ({summarize(exc)})."
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
                f"Details: {summarize(exc)}"
            ) from exc
        except Exception as exc:
            raise DataError(
                f"{file} is not a readable torch checkpoint ({summarize(exc)})."
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
