"""A smoke run of the main job (`graphmerge demo`) on real Fashion-MNIST with tiny settings."""

import json

from graphmerge.lab import experiment
from graphmerge.lab.experiment import TaskPairConfig, run_demo


def test_demo_smoke_run(tmp_path, monkeypatch):
    cfg = TaskPairConfig(model={"depths": [1, 1, 1], "width": 1, "stem_stride": 2}, epochs=1)
    report = run_demo(tmp_path / "out", cfg, cache_dir=tmp_path / "cache", progress=False)
    rows = {r["method"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())[
        "rows"]}
    assert set(rows) == {"model A alone", "model B alone", "ensemble", "average", "permute", "zip"}
    # one epoch already gives each model far-above-chance accuracy on its own task
    assert rows["model A alone"]["per_task"][0] > 0.8
    assert rows["model B alone"]["per_task"][1] > 0.8
    assert 0.2 < rows["zip"]["joint"] <= 1.0
    for name in ("merged/model.safetensors", "merged.onnx", "match_graph.json", "results.md"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert "ONNX" in report and "zip" in report
    for name in ("report.md", "result.json", "spaces.png", "match_graph.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0  # the report of `graphmerge merge`
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2

    # a second run loads both models from the cache: training would fail now
    def no_training(*args, **kwargs):
        raise AssertionError("the second run trained a model instead of loading the cache")

    monkeypatch.setattr(experiment, "train_classifier", no_training)
    run_demo(tmp_path / "again", cfg, cache_dir=tmp_path / "cache", methods=("average",),
             onnx=False, progress=False)
    again = {r["method"]: r for r in json.loads((tmp_path / "again" / "results.json")
                                                .read_text())["rows"]}
    for name in ("model A alone", "model B alone"):
        assert again[name]["joint"] == rows[name]["joint"]
