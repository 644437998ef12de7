"""The benchmarks' merge and scoring paths on tiny untrained models (`--smoke`): no training,
a few seconds each. The measured results come from running the scripts themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def _benchmarks_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))


def test_vit_pair_smoke(tmp_path):
    pytest.importorskip("matplotlib")
    import vit_pair

    vit_pair.main(["--smoke", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "vit_pair.json").read_text())
    methods = [(r["method"], r["norms"]) for r in record["mean"]]
    assert ("zip, heads frozen", "repair") in methods and ("zip", "none") in methods
    assert record["self_merge"]["merged_output_error"] < 1e-3  # exact self-merge
    assert (tmp_path / "vit_pair.png").is_file() and "heads frozen" in (
        tmp_path / "vit_pair.md").read_text()


def test_bbc_minilm_smoke(tmp_path):
    pytest.importorskip("matplotlib")
    import bbc_minilm

    bbc_minilm.main(["--smoke", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "bbc_minilm.json").read_text())
    rows = {r["method"]: r for r in record["rows"]}
    assert {"model A alone", "model B alone", "ensemble", "zip", "zip, partial 0.5"} <= set(rows)
    for r in rows.values():
        assert r.get("error") or 0 <= r["probe"] <= 1
    assert rows["zip"].get("alignments")  # the 2-layer model was expanded to 3


def test_heterogeneous_norms_smoke(tmp_path):
    pytest.importorskip("matplotlib")
    import heterogeneous_norms

    row = {"method": "ensemble", "norms": "", "joint": 0.5, "spread": 0.0,
           "per_task": [0.9, 0.9], "task_mean": 0.9, "params": 1, "flops": 1}
    rows = [row] + [{**row, "method": "zip", "norms": n} for n in ("repair", "reset", "none")]
    kept = {"archs": [[[1], 1], [[2], 1]], "reference": [[2], 1], "seeds": [[0, 1]],
            "runs": [], "reference_runs": [], "mean": rows, "reference_mean": rows,
            "epochs": 5, "command": "earlier", "wall_minutes": None}
    saved = {"experiments": {"kept": kept}, "torch": "x", "machine": "y"}
    (tmp_path / "heterogeneous_norms.json").write_text(json.dumps(saved))
    heterogeneous_norms.main(["--smoke", "--experiments", "1,4", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "heterogeneous_norms.json").read_text())
    assert "kept" in record["experiments"]  # rows not rerun stay
    three = record["experiments"]["3 models: 1-1-1 ×2, 2-2-2 ×2, 2-2-2 ×1"]
    methods = {(r["method"], r["norms"]) for r in three["mean"]}
    assert {("model C alone", ""), ("zip, LMA", "repair"), ("zip, LMA", "none")} <= methods
    assert all(len(r["per_task"]) == 3 for r in three["mean"])
    md = (tmp_path / "heterogeneous_norms.md").read_text()
    assert "| task C |" in md and "width: ×1 ⊕ ×2, 2-2-2, zip, reset" in md
    assert (tmp_path / "heterogeneous_norms.png").is_file()


def test_device_check_smoke(tmp_path, monkeypatch):
    """The GPU check's paths on the CPU: a family merged on the CPU and on `--device`, a
    LLaMA pair of the sweep (with the [hf] extra), the table written under $OUT."""
    import device_check

    monkeypatch.setenv("OUT", str(tmp_path))
    device_check.main(["--device", "cpu", "--quick", "--families", "mlp",
                       "--shapes", "64:128:1"])
    table = (tmp_path / "device_check.md").read_text()
    assert "| mlp | self | ok | 0.0e+00 |" in table and "| mlp | hetero | ok |" in table
    if device_check._hf_builders():
        assert "| llama h64 f128 L1 | pair | ok |" in table


def test_scale_smoke():
    """One tiny LLaMA pair merged and measured in this process, and the table rendered."""
    import argparse

    import scale

    row = scale.one(64, 128, 1, "cpu", (16, 16), None)
    assert row["params"] > 0 and row["merge"] > 0 and row["coverage"] > 0.9
    assert set(scale.PASSES) <= set(row["passes"]) and row["peak_gib"] > 0
    args = argparse.Namespace(device="cpu", tokens="16x16", batch=16, max_memory=None)
    table = scale.render([row, dict(row, params=2 * row["params"], merge=2 * row["merge"])],
                         args, 1.0)
    assert "| 64 / 128 / 1 / 32000 |" in table and "parameters^1.00" in table


def test_refit_sweep_smoke(tmp_path):
    import refit_sweep

    refit_sweep.main(["--smoke", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "refit_sweep.json").read_text())
    assert {(r["what"], r["value"]) for r in record["runs"]} == {
        ("images per class", 2), ("images per class", 4), ("ridge", 1e-3), ("ridge", 1.0)}
    assert all(r["error_after"] <= r["error_before"] for r in record["runs"])
    import graphmerge.surgery.refit as refit_module
    assert refit_module.RIDGE == 1e-3  # set back after each merge
    assert "| 1 |" in (tmp_path / "refit_sweep.md").read_text()
