"""The width-heterogeneous ViT benchmark's merge, scoring and report paths on tiny untrained
ViTs (`--smoke`): 16/4 ⊕ 24/4 (head dims 4 and 6), 16/4 ⊕ 24/6 (4 and 6 heads) and the
homogeneous 24/4 reference. The measured results come from running the script itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_vit_width_smoke(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import vit_width

    vit_width.main(["--smoke", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "vit_width.json").read_text())
    pairs = record["pairs"]
    methods = {(r["method"], r["norms"]) for r in pairs["64/4 ⊕ 96/4"]["mean"]}
    assert {("zip", "repair"), ("zip, β=0", "repair"), ("zip, B first", "repair")} <= methods
    reference = {(r["method"], r["norms"]) for r in pairs["96/4 ⊕ 96/4"]["mean"]}
    assert ("permute", "repair") in reference
    # elastic merges: the wider model's residual width (24) and, for 24/6, its 6 heads
    zipped = {r["method"]: r for r in pairs["64/4 ⊕ 96/4"]["mean"] if r["norms"] == "repair"}
    assert zipped["zip"]["params"] == next(r["params"] for r in pairs["96/4 ⊕ 96/4"]["mean"]
                                           if r["method"] == "model B alone")
    stats = pairs["64/4 ⊕ 96/6"]["mean_stats"]
    assert stats["heads [4, 6]"]["merged"] == 6 and stats["units [16, 24]"]["merged"] == 24
    assert sum(stats["heads [4, 6]"][k] for k in ("both", "A only", "B only")) == 6
    md = (tmp_path / "vit_width.md").read_text()
    assert "- 64/4 ⊕ 96/4, zip, repair: joint" in md and "96/6 ⊕ 96/6 zip" not in md
    assert (tmp_path / "vit_width.png").is_file()
