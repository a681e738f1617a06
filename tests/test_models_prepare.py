"""`ragdec models prepare` times the draft costs, so that the first question does not."""

from __future__ import annotations

import json

from ragdec.app.cli import main
from ragdec.decoding import cost as cost_module
from ragdec.models.home import ragdec_home


def test_prepare_measures_the_cost_curve_the_first_question_reads(weights, tmp_path, monkeypatch, capsys):
    name = weights("smollm2-135m-instruct")
    (tmp_path / "models").symlink_to(ragdec_home() / "models")  # the prepared weights, a fresh home otherwise
    monkeypatch.setenv("RAGDEC_HOME", str(tmp_path))
    monkeypatch.setattr(cost_module, "_MEMO", {})

    assert main(["models", "prepare", name, "--dtype", "float32"]) == 0
    assert "draft costs measured in float32" in capsys.readouterr().out
    (record_path,) = (tmp_path / "costs").iterdir()
    record = json.loads(record_path.read_text())
    assert record["version"] == cost_module.CURVE_VERSION
    assert len(record["seconds"]) == cost_module.MAX_DRAFT + 1
    assert record["seconds"] == sorted(record["seconds"])  # non-decreasing, as measured

    # what a question loads next is that record, not a new measurement
    def measured_again(*args, **kwargs):
        raise AssertionError("the first question measured the curve again")

    monkeypatch.setattr(cost_module, "_MEMO", {})
    monkeypatch.setattr(cost_module, "measure_forward_cost", measured_again)
    from ragdec.decoding.generator import Generator

    generator = Generator.load(name, dtype="float32")
    assert cost_module.forward_cost(generator.model, generator.name).seconds == tuple(record["seconds"])


def test_prepare_can_leave_the_measuring_to_the_first_question(weights, tmp_path, monkeypatch):
    name = weights("smollm2-135m-instruct")
    (tmp_path / "models").symlink_to(ragdec_home() / "models")
    monkeypatch.setenv("RAGDEC_HOME", str(tmp_path))
    assert main(["models", "prepare", name, "--no-measure"]) == 0
    assert not (tmp_path / "costs").exists()
