"""A merge project: the YAML file `graphmerge merge` reads, validated up front, and what it
names — the user's model factories, checkpoints, calibration and evaluation data.

```yaml
models:                               # two or more
  - factory: models:make_net          # "module:callable" returning an nn.Module
    kwargs: {depth: 2}                # optional
    checkpoint: shallow.safetensors   # .safetensors, or .pt/.pth/.bin (weights_only=True)
  - {factory: models:make_net, kwargs: {depth: 4}, checkpoint: deep.pt}
calibration: {factory: models:calibration}   # or dataset: fashion-mnist, or files: calib/*.pt
eval: {files: test.pt}                # optional, same forms, batches with labels
merge: {method: zip, align: lma}      # the options of graphmerge.merge (MergeConfig)
output: {onnx: true, report: true}
```

Every key is checked before a model is built or a batch is read: an unknown key, a bad value
or a missing file raises `ConfigError` naming the key (`models[1].checkpoint`), the value and
what is allowed. Paths are relative to the config file's folder; factory modules are imported
from that folder and from the working directory.

This module is the command line's, not the engine's: it may use the lab (built-in datasets).
"""

from __future__ import annotations

import glob
import importlib
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from torch import Tensor, nn
from tqdm.auto import tqdm

from graphmerge.config import MergeConfig
from graphmerge.errors import ConfigError, DataError, GraphmergeError, summarize
from graphmerge.inputs import infer_input_count, split_batch
from graphmerge.io.folder import load_state

__all__ = ["Project", "ModelSpec", "DataSpec", "OutputSpec", "load_project", "Loaded",
           "load", "build_model", "model_spec", "load_batches", "accuracy", "DATASETS", "WEIGHT_SUFFIXES", "DATA_SUFFIXES"]

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
DATA_SUFFIXES = (".safetensors", ".pt", ".pth")
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def _fashion_mnist(split: str) -> tuple[Tensor, Tensor]:
    from graphmerge.lab.data import load_fashion_mnist

    return load_fashion_mnist(split)


#: Built-in datasets: name -> (split -> (inputs, labels)).
DATASETS: dict[str, Callable[[str], tuple[Tensor, Tensor]]] = {"fashion-mnist": _fashion_mnist}


class _Strict(BaseModel):
    """Unknown keys are errors that list the allowed ones."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = [k for k in data if k not in cls.model_fields]
            if unknown:
                raise ValueError(f"unknown key {unknown[0]!r}; allowed keys: "
                                 f"{', '.join(cls.model_fields)}")
        return data


def _root(info: ValidationInfo) -> Path:
    return Path((info.context or {}).get("root", "."))


def _import_path(value: str) -> str:
    if not _IMPORT_PATH.match(value):
        raise ValueError(f"{value!r} is not an import path 'module:callable' (e.g. "
                         f"mypkg.models:make_net)")
    return value


class ModelSpec(_Strict):
    """One model: a factory, its keyword arguments, and its trained weights."""

    factory: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None
    name: str | None = None

    @field_validator("factory")
    @classmethod
    def _factory(cls, value: str) -> str:
        return _import_path(value)

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        path = _root(info) / value
        if path.suffix.lower() not in WEIGHT_SUFFIXES:
            raise ValueError(f"{value!r} has suffix {path.suffix!r}; a checkpoint is "
                             f"{', '.join(WEIGHT_SUFFIXES)}")
        if not path.is_file():
            raise ValueError(f"checkpoint file {value!r} not found (looked for {path})")
        return value


class DataSpec(_Strict):
    """Batches from exactly one source: a factory, a built-in dataset, or tensor files."""

    factory: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    dataset: Literal["fashion-mnist"] | None = None
    split: Literal["train", "test"] | None = None
    files: str | list[str] | None = None
    limit: PositiveInt | None = None
    batch_size: PositiveInt | None = None
    inputs: PositiveInt | None = None

    @field_validator("factory")
    @classmethod
    def _factory(cls, value: str | None) -> str | None:
        return value if value is None else _import_path(value)

    @field_validator("files")
    @classmethod
    def _files_exist(cls, value: str | list[str] | None, info: ValidationInfo
                     ) -> str | list[str] | None:
        for pattern in [value] if isinstance(value, str) else value or []:
            found = _glob(_root(info), pattern)
            if not found:
                raise ValueError(f"no file matches {pattern!r} (in {_root(info)})")
            bad = [p.name for p in found if p.suffix.lower() not in DATA_SUFFIXES]
            if bad:
                raise ValueError(f"{bad[0]!r} is not a tensor file; use "
                                 f"{', '.join(DATA_SUFFIXES)}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> "DataSpec":
        given = [k for k in ("factory", "dataset", "files") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of factory, dataset, files (got "
                             f"{', '.join(given) or 'none'})")
        if self.kwargs and self.factory is None:
            raise ValueError("kwargs go with factory")
        if self.split is not None and self.dataset is None:
            raise ValueError("split goes with dataset")
        return self


class OutputSpec(_Strict):
    """What OUT/ gets besides the merged module, the match graph and result.json."""

    onnx: bool = True
    report: bool = True


class Project(_Strict):
    """The whole config file."""

    title: str | None = None
    models: list[ModelSpec] = Field(min_length=2)
    calibration: DataSpec
    eval: DataSpec | None = None
    merge: dict[str, Any] = Field(default_factory=dict)
    output: OutputSpec = Field(default_factory=OutputSpec)
    _root: Path = PrivateAttr(default_factory=Path.cwd)  # the config file's folder

    @property
    def root(self) -> Path:
        """The folder paths and factory modules are resolved from."""
        return self._root

    @field_validator("merge")
    @classmethod
    def _merge_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            MergeConfig.from_dict(value)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return value

    def merge_config(self, progress: bool) -> MergeConfig:
        """The merge options; `progress` applies unless the file sets it."""
        return MergeConfig.from_dict({"progress": progress, **self.merge})


def _glob(root: Path, pattern: str) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(root / pattern), recursive=True))


def _where(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _one_line(error: ValidationError, file: Path) -> str:
    """The first problem of a ValidationError as one line: where, what, the value given."""
    errors = error.errors()
    e = errors[0]
    loc = tuple(p for p in e["loc"] if p not in ("function-after", "function-before"))
    if e["type"] == "value_error":
        message = str(e["ctx"]["error"])
    elif e["type"] == "missing":
        message = f"missing key {loc[-1]!r}"
        loc = loc[:-1]
    else:
        message = f"{e['msg'][0].lower()}{e['msg'][1:]}, got {e['input']!r}"
    more = f" (and {len(errors) - 1} more problem{'s' * (len(errors) > 2)})" if len(
        errors) > 1 else ""
    return f"{file}: {_where(loc) or 'top level'}: {message}{more}"


def load_project(path: str | Path) -> Project:
    """Read and validate a project file; every problem is a ConfigError of one line.

    Returns:
        the Project; `.root` is the file's folder.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {file} not found")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{file}: not valid YAML{where}: "
                          f"{getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: the config must be a mapping with keys models, "
                          f"calibration (and eval, merge, output), got "
                          f"{type(data).__name__}")
    root = file.resolve().parent
    try:
        project = Project.model_validate(data, context={"root": root})
    except ValidationError as e:
        raise ConfigError(_one_line(e, file)) from None
    project._root = root
    return project


def import_factory(spec: str, root: Path, where: str) -> Callable[..., Any]:
    """The callable named by 'module:attr', imported from `root` or the working directory."""
    for folder in (str(Path.cwd()), str(root)):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise ConfigError(f"{where}: cannot import module {module_name!r} (no module "
                              f"named {e.name!r} in {root} or the working directory)") from e
        raise ConfigError(f"{where}: importing {module_name!r} failed: {summarize(e)}") from e
    except Exception as e:
        raise ConfigError(f"{where}: importing {module_name!r} raised "
                          f"{summarize(e)}{_origin(e)}") from e
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            names = [n for n in dir(module) if not n.startswith("_")
                     and callable(getattr(module, n))]
            raise ConfigError(f"{where}: module {module_name!r} ({module.__file__}) has no "
                              f"{attr!r}; its callables: {', '.join(names) or 'none'}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{where}: {spec!r} is a {type(target).__name__}, not a callable")
    return target


def _origin(e: BaseException) -> str:
    """' (file.py:12)' for the innermost frame of an exception, if any."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f" ({Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno})" if tb else ""


def _call(fn: Callable[..., Any], kwargs: dict[str, Any], where: str, spec: str) -> Any:
    try:
        return fn(**kwargs)
    except GraphmergeError:
        raise
    except Exception as e:
        raise ConfigError(f"{where}: {spec}(**{kwargs}) raised {summarize(e)}"
                          f"{_origin(e)}") from e


def load_checkpoint(model: nn.Module, path: Path, where: str) -> None:
    """Load `path` into `model` strictly; a mismatch names the first missing, unexpected and
    mis-shaped key."""
    state = load_state(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shaped = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing key {missing[0]!r}" + _more(missing))
    if unexpected:
        problems.append(f"unexpected key {unexpected[0]!r}" + _more(unexpected))
    if shaped:
        k = shaped[0]
        problems.append(f"key {k!r} has shape {list(state[k].shape)} in the checkpoint, "
                        f"{list(own[k].shape)} in the model" + _more(shaped))
    if problems:
        raise ConfigError(f"{where}: checkpoint {path.name} does not fit the model: "
                          f"{'; '.join(problems)}; check the factory and its kwargs")
    model.load_state_dict(state)


def _more(keys: list[str]) -> str:
    return f" (+{len(keys) - 1} more)" if len(keys) > 1 else ""


def _batches_of(x: tuple[Tensor, ...], size: int) -> list[tuple[Tensor, ...]]:
    return [tuple(t[i:i + size] for t in x) for i in range(0, len(x[0]), size)]


def _read_tensor_file(path: Path, where: str) -> tuple[Tensor, ...]:
    """One batch from a file: a tensor, a tuple/list of tensors (inputs, then labels), or a
    dict {x, y} (safetensors files: tensors named x and optionally y)."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            value: Any = load_file(str(path))
        else:
            value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"{where}: cannot read {path} ({summarize(e)})") from e
    if isinstance(value, dict) and "x" in value:
        value = (value["x"], value["y"]) if "y" in value else (value["x"],)
    if isinstance(value, Tensor):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not value or not all(
            isinstance(t, Tensor) for t in value):
        raise DataError(f"{where}: {path.name} must hold a tensor, a tuple (inputs..., labels) "
                        f"or a dict with x (and y); found {type(value).__name__}")
    return tuple(value)


def load_batches(spec: DataSpec, root: Path, where: str, default_limit: int | None = None
                 ) -> list[Any]:
    """The batches a DataSpec names, as a list (at most `limit` examples)."""
    limit = spec.limit or default_limit
    size = spec.batch_size or 100
    if spec.dataset is not None:
        x, y = DATASETS[spec.dataset](spec.split or "train")
        n = min(len(x), limit or len(x))
        picked = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]
        return _batches_of((x[picked], y[picked]), size)
    if spec.files is not None:
        patterns = [spec.files] if isinstance(spec.files, str) else spec.files
        batches = []
        for p in (p for pattern in patterns for p in _glob(root, pattern)):
            batch = _read_tensor_file(p, where)
            batches += _batches_of(batch, spec.batch_size) if spec.batch_size else [batch]
    else:
        batches = _call(import_factory(spec.factory, root, f"{where}.factory"), spec.kwargs,
                        f"{where}.factory", spec.factory)
        if isinstance(batches, Tensor) or not isinstance(batches, Iterable):
            raise DataError(f"{where}.factory {spec.factory} returned a "
                            f"{type(batches).__name__}; return an iterable of batches (a list "
                            f"of tensors, of (inputs, labels) tuples, or a DataLoader)")
    batches = list(batches) if limit is None else _take(batches, limit)
    if not batches:
        raise DataError(f"{where}: no batches (check the files or the factory)")
    return batches


def _take(batches: Iterable[Any], limit: int) -> list[Any]:
    out, n = [], 0
    for b in batches:
        first = b if isinstance(b, Tensor) else b[0]
        out.append(b if n + len(first) <= limit else (
            first[:limit - n] if isinstance(b, Tensor) else tuple(t[:limit - n] for t in b)))
        n += len(first)
        if n >= limit:
            break
    return out


@dataclass
class Loaded:
    """What a project names, built: models (checkpoints loaded), their descriptions, the
    calibration and evaluation batches, and the seconds each took."""

    models: list[nn.Module]
    rows: list[dict[str, Any]]
    calibration: list[Any]
    evaluation: list[Any] | None
    seconds: dict[str, float]
    n_inputs: int  # model inputs at the start of every batch

    def example_inputs(self, n: int = 8) -> tuple[Any, ...]:
        """The first `n` examples of the first calibration batch, as model inputs."""
        inputs = split_batch(self.calibration[0], self.n_inputs)
        return tuple(t[:n] if isinstance(t, Tensor) else t for t in inputs)


def build_model(spec: ModelSpec, root: Path, where: str,
                factory: Callable[..., Any] | None = None) -> nn.Module:
    """The model a ModelSpec names, its checkpoint loaded, in eval mode."""
    factory = factory or import_factory(spec.factory, root, f"{where}.factory")
    model = _call(factory, spec.kwargs, f"{where}.factory", spec.factory)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{where}.factory {spec.factory} returned a "
                          f"{type(model).__name__}, not a torch.nn.Module")
    if spec.checkpoint is not None:
        load_checkpoint(model, root / spec.checkpoint, f"{where}.checkpoint")
    return model.eval()


def model_spec(values: dict[str, Any], root: Path, where: str) -> ModelSpec:
    """A ModelSpec from keys given outside a config file (the command line)."""
    try:
        return ModelSpec.model_validate(values, context={"root": root})
    except ValidationError as e:
        raise ConfigError(_one_line(e, Path(where))) from None


def load(project: Project) -> Loaded:
    """Import every factory first (so a typo fails before anything is built), then build the
    models, load their checkpoints, and read the data."""
    root = project.root
    t0 = time.perf_counter()
    factories = [import_factory(m.factory, root, f"models[{i}].factory")
                 for i, m in enumerate(project.models)]
    models, rows = [], []
    for i, (spec, factory) in enumerate(zip(project.models, factories)):
        model = build_model(spec, root, f"models[{i}]", factory)
        models.append(model)
        rows.append({"name": spec.name or Path(spec.checkpoint or spec.factory).stem,
                     "factory": spec.factory + (f" {spec.kwargs}" if spec.kwargs else ""),
                     "checkpoint": spec.checkpoint or "",
                     "parameters": sum(p.numel() for p in model.parameters())})
    t1 = time.perf_counter()
    calibration = load_batches(project.calibration, root, "calibration", default_limit=512)
    evaluation = (None if project.eval is None else
                  load_batches(project.eval, root, "eval"))
    n = project.calibration.inputs or infer_input_count(models[0], calibration[0])
    if evaluation is not None:
        bad = next((b for b in evaluation if isinstance(b, Tensor) or len(b) <= n), None)
        if bad is not None:
            raise DataError(f"eval: batches need labels after the {n} model input(s), e.g. "
                            f"(x, y); got {_describe(bad)}")
    return Loaded(models, rows, calibration, evaluation,
                  {"load models": t1 - t0, "load data": time.perf_counter() - t1}, n)


def _describe(batch: Any) -> str:
    if isinstance(batch, Tensor):
        return f"a tensor of shape {list(batch.shape)}"
    return f"a {type(batch).__name__} of {len(batch)} item(s)"


def accuracy(model: nn.Module, batches: list[Any], n_inputs: int, progress: bool = True,
             desc: str = "evaluate") -> float:
    """Fraction of examples whose argmax over the last axis of the (first) output is the
    label; batches are (`n_inputs` inputs..., labels)."""
    right = total = 0
    with torch.no_grad():
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
            out = model(*batch[:n_inputs])
            out = out[0] if isinstance(out, (tuple, list)) else out
            labels = batch[n_inputs]
            if labels.shape != out.shape[:-1] or labels.is_floating_point():
                raise DataError(f"eval: labels must be class indices of shape "
                                f"{list(out.shape[:-1])} (the outputs are {list(out.shape)}), "
                                f"got {labels.dtype} of shape {list(labels.shape)}")
            right += int((out.argmax(-1) == labels).sum())
            total += len(labels)
    return right / max(total, 1)
