"""The command line: inspect (space table, oracle, match graph) and error handling."""

import json

import pytest

from graphmerge.cli import main


def test_inspect_prints_the_space_table_and_runs_the_oracle(capsys):
    assert main(["inspect", "resnet", "--config", '{"depths": [1, 1, 1]}', "--check",
                 "--trials", "1"]) == 0
    out = capsys.readouterr().out
    assert "7 spaces: 6 free, 1 frozen" in out
    assert "stage at `stem_2` ×1 residual" in out
    assert "frozen: touches the graph output" in out
    assert "permutation oracle: 1 trials passed" in out


def test_inspect_bad_config_is_one_clear_error(capsys):
    assert main(["inspect", "resnet", "--config", '{"depths": [1, 1]}']) == 2
    assert "depths" in capsys.readouterr().err
    assert main(["inspect", "resnet", "--config", "not json"]) == 2
    assert "JSON" in capsys.readouterr().err


def test_unknown_model_lists_the_choices(capsys):
    with pytest.raises(SystemExit):
        main(["inspect", "alexnet"])
    assert "resnet" in capsys.readouterr().err


def test_inspect_reads_and_converts_a_match_graph(tmp_path, capsys):
    import torch

    import graphmerge as gm
    from graphmerge.io.match_graph import write_match_graph

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x = torch.randn(32, 4)  # tanh: no dead units, so every unit has an exact partner
    result = gm.merge([model, gm.permute(model, x)], [x], heads="average", progress=False)
    saved = write_match_graph(result.match_graph, tmp_path / "g.json")
    assert main(["inspect", "--match-graph", str(saved), "--write", str(tmp_path / "g.graphml"),
                 "--write", str(tmp_path / "g.dot")]) == 0
    out = capsys.readouterr().out
    assert "m0/space1 ~ m1/space1: widths [8, 8] -> 8 (zip, mean corr 1.000)" in out
    assert (tmp_path / "g.graphml").stat().st_size > 0
    assert (tmp_path / "g.dot").read_text().startswith("graph match {")
    assert json.loads(saved.read_text())["graph"]["method"] == "zip"


def test_inspect_refuses_an_oracle_that_checks_nothing(capsys):
    assert main(["inspect", "mlp", "--check", "--trials", "-1"]) == 2
    err = capsys.readouterr().err
    assert "trials must be an int >= 1" in err and "Traceback" not in err
