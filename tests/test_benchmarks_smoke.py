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
