"""`graphmerge merge CONFIG.yaml -o OUT/` through the real console script: the README
walkthrough exactly as written, and every bad config a user can write (one line, no traceback,
a non-zero exit, nothing written).

The console script is run as `python -c "from graphmerge.cli import main; ..."` with
PYTHONPATH set to the tree under test: in a fresh clone (`pip install -e .`) the installed
`graphmerge` script would do the same, but in a second worktree it points at another tree.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import graphmerge
from graphmerge.cli import main

ROOT = Path(graphmerge.__file__).resolve().parents[1]
CONSOLE = [sys.executable, "-c", "from graphmerge.cli import main; raise SystemExit(main())"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def graphmerge_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*CONSOLE, *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=300)


def test_the_readme_walkthrough_runs_as_written(tmp_path):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Merge your own models", 1)[1].split("\n## ", 1)[0]
    script = "\n".join(re.findall(r"```bash\n(.*?)```", section, re.S))
    assert "graphmerge merge" in script and "python train.py" in script
    bin_dir = tmp_path / "bin"  # `python` and `graphmerge` as the README's reader has them
    bin_dir.mkdir()
    scripts = {"python": f'exec {sys.executable} "$@"',
               "graphmerge": f'exec {sys.executable} -c "from graphmerge.cli import main; '
                             f'raise SystemExit(main())" "$@"'}
    for name, line in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{line}\n")
        (bin_dir / name).chmod(0o755)
    env = {**_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    out = next(tmp_path.glob("*/out"))
    for name in ("merged/model.safetensors", "merged.onnx", "match_graph.json",
                 "match_graph.graphml", "report.md", "result.json", "alignment.png",
                 "spaces.png", "match_graph.png"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "## Accuracy" in report and "| merged |" in report
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["merge"]["align"] == "lma"
    assert [a["depths"] for a in result["alignment"] if len(set(a["depths"])) > 1] == [[2, 4]]
    accuracy = {r["model"]: r["accuracy"] for r in result["scores"]}
    assert accuracy["merged"] > 0.5  # four classes: chance is 0.25
    assert result["checks"]["ONNX (onnxruntime) agrees with torch"] < 1e-4
    merged = graphmerge.load_module(out / "merged")  # the documented call
    x = torch.load(out.parent / "test.pt", weights_only=True)[0]
    with torch.no_grad():
        assert merged(x).shape == (len(x), 4)


MODELS_PY = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, depth=2):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
                                    for _ in range(depth))
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.inp(x))
        for b in self.blocks:
            x = x + b(x)
        return self.out(x)

def make(depth=2):
    return Net(depth)

def calibration():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(32, 6, generator=g) for _ in range(2)]

class Gated(Net):
    def forward(self, x, gate=None):
        return super().forward(x if gate is None else x * gate)

def make_gated(depth=2):
    return Gated(depth)

def gated_calibration():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(32, 6, generator=g), torch.rand(32, 6, generator=g)) for _ in range(2)]
'''
NETS: dict = {}
exec(MODELS_PY, NETS)  # the same model class, for writing its checkpoints here
Net = NETS["Net"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A folder with a model file, two checkpoints (depths 2 and 3) and eval data."""
    root = tmp_path_factory.mktemp("project")
    (root / "nets.py").write_text(MODELS_PY)
    (root / "broken.py").write_text("import torch\nmake = undefined_name\n")
    torch.manual_seed(0)
    save_file(Net(2).state_dict(), str(root / "a.safetensors"))
    torch.save(Net(3).state_dict(), root / "b.pt")
    g = torch.Generator().manual_seed(1)
    torch.save((torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)),
               root / "test.pt")
    return root


def valid() -> dict:
    return {"models": [{"factory": "nets:make", "kwargs": {"depth": 2},
                        "checkpoint": "a.safetensors"},
                       {"factory": "nets:make", "kwargs": {"depth": 3}, "checkpoint": "b.pt"}],
            "calibration": {"factory": "nets:calibration"},
            "eval": {"files": "test.pt"},
            "merge": {"method": "zip"},
            "output": {"onnx": False}}


def _with(change) -> dict:
    config = valid()
    change(config)
    return config


def _set(path: str, value):
    def change(config: dict) -> None:
        *keys, last = path.split(".")
        node = config
        for k in keys:
            node = node[int(k)] if isinstance(node, list) else node[k]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return change


BAD = {
    "unknown top-level key": (_set("modles", []), r"top level: unknown key 'modles'; allowed "
                                                  r"keys: title, models, calibration, eval"),
    "unknown model key": (_set("models.0.chekpoint", "a.pt"),
                          r"models\[0\]: unknown key 'chekpoint'; allowed keys: factory, kwargs, "
                          r"checkpoint"),
    "unknown merge option": (_set("merge.metod", "zip"),
                             r"merge: unknown merge option 'metod'; valid options: method"),
    "bad merge value": (_set("merge.method", "zipit"),
                        r"merge: unknown method 'zipit'; valid: average, permute, zip"),
    "one model": (lambda c: c["models"].pop(), r"models: list should have at least 2 items"),
    "two data sources": (_set("calibration.dataset", "fashion-mnist"),
                         r"calibration: give exactly one of factory, dataset, files \(got "
                         r"factory, dataset\)"),
    "unknown dataset": (_set("calibration", {"dataset": "cifar"}),
                        r"calibration.dataset: input should be 'fashion-mnist', got 'cifar'"),
    "bad factory path": (_set("models.1.factory", "nets.make"),
                         r"models\[1\].factory: 'nets.make' is not an import path "
                         r"'module:callable'"),
    "missing checkpoint": (_set("models.0.checkpoint", "nope.pt"),
                           r"models\[0\].checkpoint: checkpoint file 'nope.pt' not found"),
    "missing eval files": (_set("eval.files", "eval/*.pt"),
                           r"eval.files: no file matches 'eval/\*.pt'"),
    "factory module missing": (_set("models.0.factory", "mynets:make"),
                               r"models\[0\].factory: cannot import module 'mynets'"),
    "factory module fails": (_set("models.0.factory", "broken:make"),
                             r"models\[0\].factory: importing 'broken' raised NameError: name "
                             r"'undefined_name' is not defined \(broken.py:2\)"),
    "factory name missing": (_set("models.0.factory", "nets:mkae"),
                             r"models\[0\].factory: module 'nets' .* has no 'mkae'; its "
                             r"callables: Gated, Net, calibration, gated_calibration, make, "
                             r"make_gated"),
    "factory kwargs wrong": (_set("models.0.kwargs", {"deep": 1}),
                             r"models\[0\].factory: nets:make\(\*\*\{'deep': 1\}\) raised "
                             r"TypeError"),
    "checkpoint of another depth": (_set("models.0.checkpoint", "b.pt"),
                                    r"models\[0\].checkpoint: checkpoint b.pt does not fit the "
                                    r"model: unexpected key 'blocks.2.0.weight'"),
    "checkpoint missing keys": (_set("models.1.checkpoint", "a.safetensors"),
                                r"checkpoint a.safetensors does not fit the model: missing key "
                                r"'blocks.2.0.weight'"),
}


def _case_folder(project: Path, folder: Path, case: str) -> None:
    for name in ("nets.py", "broken.py", "a.safetensors", "b.pt", "test.pt"):
        (folder / name).symlink_to(project / name)
    (folder / "merge.yaml").write_text(yaml.safe_dump(_with(BAD[case][0])))


def _one_clear_line(code: int, stderr: str, case: str, folder: Path) -> None:
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("graphmerge: error: ")
    assert re.search(BAD[case][1], lines[0]), lines[0]
    assert not (folder / "out").exists()
    assert [p.name for p in folder.iterdir() if p.name.startswith(".out")] == []


@pytest.fixture
def fresh_imports(monkeypatch):
    """Factories are imported from the config's folder: forget them after each test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name in ("nets", "broken"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_config_is_one_line_and_exit_code_2(project, tmp_path, case, capsys,
                                                 monkeypatch, fresh_imports):
    _case_folder(project, tmp_path, case)
    monkeypatch.chdir(tmp_path)
    code = main(["merge", "merge.yaml", "-o", "out", "-q"])
    _one_clear_line(code, capsys.readouterr().err, case, tmp_path)


# one case per kind of mistake, through the console script in a fresh process (~3 s each)
CONSOLE_CASES = ["unknown model key", "bad merge value", "missing checkpoint",
                 "factory module fails", "checkpoint of another depth"]


def test_bad_configs_through_the_console_script(project, tmp_path):
    for case in CONSOLE_CASES:
        folder = tmp_path / case.replace(" ", "-")
        folder.mkdir()
        _case_folder(project, folder, case)
        run = graphmerge_cli("merge", "merge.yaml", "-o", "out", "-q", cwd=folder)
        _one_clear_line(run.returncode, run.stderr, case, folder)


def test_yaml_errors_a_missing_file_and_verbose_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("models:\n  - factory: nets:make\n   kwargs: {}\n")
    assert main(["merge", "bad.yaml", "-o", "out"]) == 2
    assert re.fullmatch(r"graphmerge: error: bad.yaml: not valid YAML at line 3, column \d+: .*\n",
                        capsys.readouterr().err)
    assert main(["merge", "missing.yaml", "-o", "out"]) == 2
    assert capsys.readouterr().err == "graphmerge: error: config file missing.yaml not found\n"
    assert main(["merge", "missing.yaml", "-o", "out", "-v"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_dry_run_force_and_an_atomic_out(project, tmp_path, capsys, fresh_imports):
    config = project / "merge.yaml"
    config.write_text(yaml.safe_dump(valid()))
    out = tmp_path / "out"
    assert main(["merge", str(config), "-o", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr()
    assert "depths [2, 3]; model 0 placed in model 1's 3 units: 1 candidate placement" in \
        printed.out
    assert "space   1: [8, 8] -> 8" in printed.out and not out.exists()
    assert "calibration statistics" not in printed.err  # no pass over the data

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", str(config), "-o", str(out), "-q"]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    # a run that fails half-way (labels the merged model cannot be scored on) leaves OUT/ as
    # it was and no temporary folder
    bad_eval = tmp_path / "labels.pt"
    torch.save((torch.randn(8, 6), torch.zeros(8, 2)), bad_eval)
    broken = project / "broken_eval.yaml"
    broken.write_text(yaml.safe_dump(_with(_set("eval.files", str(bad_eval)))))
    assert main(["merge", str(broken), "-o", str(out), "--force", "-q"]) == 2
    assert "eval: labels must be class indices of shape [8]" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".out")] == []

    assert main(["merge", str(config), "-o", str(out), "--force"]) == 0
    err = capsys.readouterr().err  # progress bars without -q
    assert "calibration statistics" in err and "REPAIR (all batches at once)" in err
    assert not (out / "keep.txt").exists() and not (out / "merged.onnx").exists()
    result = json.loads((out / "result.json").read_text())
    assert result["checks"]["merged/ reloads with the same outputs"] == 0.0
    assert [r["model"] for r in result["scores"]] == ["a", "b", "merged"]


def test_inspect_a_factory_and_a_config_model_and_draw_them(project, tmp_path, capsys,
                                                            monkeypatch, fresh_imports):
    config = project / "merge.yaml"
    config.write_text(yaml.safe_dump(valid()))
    monkeypatch.chdir(project)
    assert main(["inspect", "nets:make", "--config", '{"depth": 3}', "--checkpoint", "b.pt",
                 "--input-shape", "4,6", "--draw", str(tmp_path / "g.png")]) == 0
    assert "stages (units of depth)" in capsys.readouterr().out
    assert (tmp_path / "g.png").stat().st_size > 0
    assert main(["inspect", str(config), "--index", "1", "--check", "--trials", "1"]) == 0
    assert "permutation oracle: 1 trials passed" in capsys.readouterr().out
    assert main(["inspect", "nets:make", "--checkpoint", "b.pt", "--input-shape", "4,6"]) == 2
    assert "checkpoint b.pt does not fit the model: unexpected key 'blocks.2.0.weight'" in \
        capsys.readouterr().err


def test_data_from_the_built_in_dataset_files_and_limits(project):
    from graphmerge.project import DataSpec, load_batches

    spec = DataSpec(dataset="fashion-mnist", split="test", limit=50, batch_size=20)
    batches = load_batches(spec, project, "eval")
    assert [tuple(x.shape) for x, _ in batches] == [(20, 1, 28, 28), (20, 1, 28, 28),
                                                     (10, 1, 28, 28)]
    assert batches[0][1].dtype == torch.int64
    spec = DataSpec.model_validate({"files": ["test.pt"], "batch_size": 16, "limit": 36},
                                   context={"root": project})
    assert [len(x) for x, _ in load_batches(spec, project, "calibration")] == [16, 16, 4]


def test_calibration_inputs_say_how_many_batch_items_are_inputs(project, tmp_path, capsys,
                                                                fresh_imports):
    """A model with an optional input and two-item batches: refused until `inputs:` says."""
    config = _with(_set("calibration.factory", "nets:gated_calibration"))
    for m in config["models"]:
        m["factory"] = "nets:make_gated"
    config.pop("eval")
    path = project / "gated.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["merge", str(path), "-o", str(tmp_path / "a"), "-q"]) == 2
    assert "set `inputs:` under calibration" in capsys.readouterr().err
    config["calibration"]["inputs"] = 2
    path.write_text(yaml.safe_dump(config))
    assert main(["merge", str(path), "-o", str(tmp_path / "b"), "-q"]) == 0
    merged = graphmerge.load_module(tmp_path / "b" / "merged")
    x = torch.randn(4, 6)
    with torch.no_grad():  # the gate is an input of the merged model, and it is read
        assert not torch.allclose(merged(x, torch.zeros(4, 6)), merged(x, torch.ones(4, 6)))


def test_the_merge_command_under_torchrun_gives_the_one_process_merge(project, tmp_path):
    """Two ranks: each merges with its share of the calibration batches (statistics and CKA
    all-reduced); rank 0 alone evaluates and writes OUT/."""
    from safetensors.torch import load_file
    from test_calibration import _free_port

    config = project / "torchrun.yaml"
    config.write_text(yaml.safe_dump(valid()))
    one = graphmerge_cli("merge", str(config), "-o", str(tmp_path / "one"), "-q", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(_free_port()), "-m", "graphmerge.cli", "merge", str(config),
         "-o", str(tmp_path / "two"), "-q"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1  # rank 0 only
    a = load_file(str(tmp_path / "one" / "merged" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "merged" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst < 1e-5, worst
    assert json.loads((tmp_path / "two" / "result.json").read_text())["scores"]
