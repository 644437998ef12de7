"""The shape of the house: no import cycle in the package, the engine never imports the lab or
the CLI, and every merge step is a pass that refuses to run before what it needs."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

import graphmerge as gm
from graphmerge.calibration import Calibration
from graphmerge.passes import PIPELINE, MergeContext, PassOrderError, match_spaces, merge_pass
from graphmerge.passes.manager import PassDeclarationError

PACKAGE = Path(gm.__file__).parent
# the command line and the user's project (YAML config, factories, built-in datasets) may use
# the lab; nothing else may use them
NOT_ENGINE = ("graphmerge.lab", "graphmerge.cli", "graphmerge.project")


# the layers, bottom up: a module imports only from its own layer or below; the top-level
# `graphmerge/__init__.py` is the public API: it may import anything, and it is imported only
# from the top layer (the command line, the user's project and the lab use it as users do)
LAYERS = (
    ("graphmerge.errors", "graphmerge.inputs"),
    ("graphmerge.graph",),
    ("graphmerge.match", "graphmerge.calibration"),
    ("graphmerge.surgery",),
    ("graphmerge.passes", "graphmerge.config"),
    ("graphmerge.merge", "graphmerge.plan"),
    ("graphmerge.io",),
    ("graphmerge.cli", "graphmerge.project", "graphmerge.lab"),
)
# what a pass file may import from passes/ (logic two passes share lives in a lower layer)
PASS_HELPERS = ("graphmerge.passes.manager", "graphmerge.passes.context")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the graphmerge modules it imports anywhere (top level or inside functions),
    except under `if TYPE_CHECKING:`."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and getattr(node.test, "id", None) == "TYPE_CHECKING"
                       for n in ast.walk(node)}
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module:
                base = node.module if node.level == 0 else None
                assert base is not None, f"{name}: use absolute imports"
                for alias in node.names:
                    deps.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules
                             else base)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _package_closure(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Importing `a.b.c` runs `a/__init__` and `a/b/__init__` too."""
    out = {}
    for name, deps in graph.items():
        full = set(deps)
        for d in deps:
            parts = d.split(".")
            full.update(".".join(parts[:k]) for k in range(2, len(parts)) if
                        ".".join(parts[:k]) in graph)
        out[name] = {d for d in full if not name.startswith(d + ".") and d != name}
    return out


def test_no_import_cycle_in_the_package():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [node, dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_engine_never_imports_the_lab_or_the_cli():
    graph = _package_closure(_imports())
    engine = [m for m in graph if not m.startswith(NOT_ENGINE)]
    assert len(engine) > 20
    for module in engine:
        bad = sorted(d for d in graph[module] if d.startswith(NOT_ENGINE))
        assert not bad, f"engine module {module} imports {bad}"


def test_the_checker_sees_a_cycle_and_a_lab_import(tmp_path, monkeypatch):
    # the two checks above can fail: a package with a cycle and an engine->lab import
    pkg = tmp_path / "graphmerge"
    (pkg / "lab").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "lab" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from graphmerge.b import x\n")
    (pkg / "b.py").write_text("def f():\n    from graphmerge.a import y\n"
                              "from graphmerge.lab import z\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", pkg)
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycle_in_the_package()
    graph = _package_closure(_imports())
    assert "graphmerge.lab" in graph["graphmerge.b"]


def _layer(module: str) -> int:
    """The layer of a graphmerge module (AssertionError for a module no layer holds)."""
    if module == "graphmerge":
        return len(LAYERS) - 1
    for k, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return k
    raise AssertionError(f"module {module} is in no layer: add it to LAYERS")


def _upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import that points up the layers, every pass file's import of another pass file,
    and every import of a pass file from outside the passes (their API is the package
    `graphmerge.passes`; only `PASS_HELPERS` may be imported)."""
    bad = []
    for module, deps in sorted(graph.items()):
        if module == "graphmerge":
            continue
        bad += [f"{module} imports {d} (a higher layer)" for d in sorted(deps)
                if _layer(d) > _layer(module)]
        passes = sorted(d for d in deps if d.startswith("graphmerge.passes")
                        and d not in PASS_HELPERS)
        if module.startswith("graphmerge.passes."):
            bad += [f"pass file {module} imports {d}" for d in passes]
        elif module != "graphmerge.passes":
            bad += [f"{module} imports pass file {d}" for d in passes if d != "graphmerge.passes"]
    return bad


def test_imports_point_down_the_layers_and_passes_import_no_passes():
    graph = _imports()
    bad = _upward_imports(graph)
    assert not bad, "layering broken:\n" + "\n".join(bad)
    assert {_layer(m) for m in graph} == set(range(len(LAYERS)))  # every layer holds a module


def test_the_layer_checker_sees_an_upward_import_and_a_pass_importing_a_pass(tmp_path,
                                                                             monkeypatch):
    pkg = tmp_path / "graphmerge"
    for sub in ("graph", "passes", "lab"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from graphmerge.lab import z\n")  # the API: allowed
    (pkg / "graph" / "a.py").write_text("def f():\n    from graphmerge.passes import b\n"
                                        "import graphmerge\n")
    (pkg / "passes" / "b.py").write_text("from graphmerge.passes.context import c\n"
                                         "from graphmerge.graph.a import f\n")
    (pkg / "passes" / "context.py").write_text("")
    (pkg / "passes" / "d.py").write_text("from graphmerge.passes.b import x\n")
    (pkg / "lab" / "e.py").write_text("from graphmerge.passes import d\n"
                                      "from graphmerge.passes import PIPELINE\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", pkg)
    assert _upward_imports(_imports()) == [
        "graphmerge.graph.a imports graphmerge (a higher layer)",
        "graphmerge.graph.a imports graphmerge.passes.b (a higher layer)",
        "graphmerge.graph.a imports pass file graphmerge.passes.b",
        "graphmerge.lab.e imports pass file graphmerge.passes.d",
        "pass file graphmerge.passes.d imports graphmerge.passes.b",
    ]
    with pytest.raises(AssertionError, match="layering broken"):
        test_imports_point_down_the_layers_and_passes_import_no_passes()


def test_the_pipeline_is_one_ordered_list_whose_needs_come_first():
    provided: set[str] = set()
    for p in PIPELINE:
        missing = set(p.needs) - provided
        assert not missing, f"pass {p.name} needs {missing} before any pass provides it"
        provided.update(p.provides)
    assert [p.name for p in PIPELINE][:3] == ["trace_models", "check_spaces", "align_depths"]


def test_a_pass_run_too_early_names_the_missing_pass():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    ctx = MergeContext([model, model], Calibration([torch.randn(4, 3)], 1), (torch.randn(4, 3),))
    with pytest.raises(PassOrderError, match="collect_statistics"):
        match_spaces(ctx)


def test_a_pass_that_writes_an_undeclared_field_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(4, 3)

    def fresh() -> MergeContext:
        ctx = MergeContext([model, model], Calibration([x], 1), (x,))
        ctx.plans = {}
        return ctx

    @merge_pass(needs=("plans",), provides=("head_mode",))
    def adds_a_plan(ctx):
        ctx.head_mode = "average"
        ctx.plans[0] = "a plan"

    @merge_pass(provides=("checked",))
    def replaces_models(ctx):
        ctx.checked = True
        ctx.models = list(ctx.models)

    with pytest.raises(PassDeclarationError, match="adds_a_plan wrote `plans`"):
        adds_a_plan(fresh())
    with pytest.raises(PassDeclarationError, match="replaces_models wrote `models`"):
        replaces_models(fresh())
    declared = merge_pass(needs=("plans",), provides=("head_mode",),
                          writes=("plans",))(adds_a_plan.run)
    assert declared(fresh()).plans == {0: "a plan"}


def test_every_pass_declares_the_fields_it_writes():
    # a merge with depth alignment (replaces models and traced), concatenated heads (adds a
    # plan) and a partial cut (replaces the module) runs every declaration path
    wide = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    shallow = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(32, 3)
    result = gm.merge([wide, shallow], [x], heads="concat", partial=0.5, progress=False)
    assert result.module(x).shape == (32, 4)


class _Untouchable:
    """Calibration data that fails the test if anything reads it."""

    def __iter__(self):
        raise AssertionError("the calibration data was read before the options were checked")


@pytest.mark.parametrize("options, match", [
    ({"method": "zipit"}, "average, permute, zip"),
    ({"metod": "zip"}, "unknown merge option 'metod'"),
    ({"method": "average", "alpha": 0.3}, "does not take alpha"),
    ({"alpha": 2.0}, "alpha must be in"),
    ({"heads": "sum"}, "average, concat"),
    ({"align": "greedy"}, "lma, sma, uniform"),
    ({"norms": "renorm"}, "repair, reset, none"),
    ({"partial": 1.5}, "partial must be"),
    ({"width": 3}, "ratio"),
    ({"width": -0.5}, "positive"),
    ({"width": {"a": 3}}, "space ids"),
    ({"method": "permute", "width": 0.5}, "elastic"),
    ({"check": "yes"}, "True or False"),
])
def test_bad_options_are_refused_before_any_work(options, match):
    class Untraceable(nn.Module):
        def forward(self, x):
            raise AssertionError("the model was run before the options were checked")

    with pytest.raises(gm.ConfigError, match=match):
        gm.merge([Untraceable(), Untraceable()], _Untouchable(), torch.randn(2, 3), **options)


def test_a_merge_config_object_and_overrides():
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(16, 3)
    twin = gm.permute(model, x, seed=1)
    cfg = gm.MergeConfig(method="permute", heads="average", progress=False)
    result = gm.merge([model, twin], [x], config=cfg, norms="none")
    assert result.method == "permute"
    assert set(result.seconds) >= {p.name for p in PIPELINE} | {"total"}
    with torch.no_grad():
        assert torch.allclose(result.module(x), model(x), atol=1e-5)


def test_option_help_is_written_once_and_shown_by_merge_and_the_cli(capsys):
    from graphmerge.cli import build_parser
    from graphmerge.config import option_help

    fields = [f.name for f in dataclasses.fields(gm.MergeConfig)]
    text = option_help()
    assert [line.split(":")[0] for line in text.splitlines() if not line.startswith(" ")] == fields
    assert option_help(indent=12) in gm.merge.__doc__
    with pytest.raises(SystemExit):
        build_parser().parse_args(["merge", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for name in fields:
        assert f"{name}: " in shown
    assert " ".join(gm.MergeConfig.__dataclass_fields__["norms"].metadata["help"].split()) in shown


#: the longest an engine function may be (lines, docstring included)
LONGEST = 80


def test_no_engine_function_is_longer_than_80_lines():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if _module_name(path).startswith(NOT_ENGINE):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST:
                    too_long.append(f"{_module_name(path)}.{node.name}: {lines} lines")
    assert not too_long, "split these into named steps: " + "; ".join(too_long)
