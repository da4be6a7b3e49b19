"""The recipes' shared machinery: stages resume where they stopped, redo what changed, and give the
same artefacts; bad rows stop a run only above the threshold; rates carry Wilson intervals."""

import json

import ml_collections
import pytest

from jaxlm.errors import ConfigError, DataError
from jaxlm.recipes.base import BadRows, Recipe, Stage
from jaxlm.recipes.report import bar_chart, markdown_table, rate, wilson

CALLS = []


def _prompts(run):
    CALLS.append("prompts")
    n = run.cfg.data.n
    run.write_jsonl("prompts.jsonl", ({"id": i, "text": f"q{i}"} for i in range(n)))
    return {"prompts": n}


def _answer(run):
    CALLS.append("answer")
    rows = run.read_jsonl("prompts.jsonl")
    bad = BadRows("answers", run.cfg.gen.max_bad)
    out = []
    for r in run.progress(rows, "answering"):
        if (r["id"] + 1) % run.cfg.gen.bad_every == 0:
            bad.add("empty answer", f"prompt {r['id']}")
            continue
        out.append({"id": r["id"], "answer": r["text"].upper() * run.cfg.gen.times})
    bad.check(len(rows))
    run.write_jsonl("answers.jsonl", out)
    return {"answers": len(out), **bad.summary()}


def _crash_once(run):
    CALLS.append("report")
    if run.cfg.report.crash:
        raise KeyboardInterrupt  # a Ctrl-C in the middle of the last stage
    run.path("report.md").write_text(f"{len(run.read_jsonl('answers.jsonl'))} answers\n")
    return {}


RECIPE = Recipe("toy", [Stage("prompts", _prompts, config=("data",), outputs=("prompts.jsonl",)),
                        Stage("answer", _answer, config=("gen",), outputs=("answers.jsonl",)),
                        Stage("report", _crash_once, config=("report",), outputs=("report.md",))])


def config(**kw):
    cfg = ml_collections.ConfigDict({"data": {"n": 6}, "gen": {"times": 1, "bad_every": 100, "max_bad": 0.5},
                                     "report": {"crash": False}})
    for k, v in kw.items():
        section, field = k.split("__")
        cfg[section][field] = v
    return cfg


def test_resume_skips_done_stages_and_gives_identical_artefacts(tmp_path):
    CALLS.clear()
    with pytest.raises(KeyboardInterrupt):
        RECIPE.run(config(report__crash=True), tmp_path)
    assert CALLS == ["prompts", "answer", "report"]
    first = (tmp_path / "answers.jsonl").read_bytes()
    CALLS.clear()
    summaries = RECIPE.run(config(), tmp_path)  # resumes at the stage that did not finish
    assert CALLS == ["report"] and summaries["answer"]["answers"] == 6
    assert (tmp_path / "answers.jsonl").read_bytes() == first
    state = json.loads((tmp_path / "state.json").read_text())
    assert set(state["stages"]) == {"prompts", "answer", "report"}
    CALLS.clear()
    RECIPE.run(config(), tmp_path)  # nothing to do
    assert CALLS == []
    CALLS.clear()
    RECIPE.run(config(), tmp_path, from_stage="answer")  # redo one stage and what follows
    assert CALLS == ["answer", "report"] and (tmp_path / "answers.jsonl").read_bytes() == first


def test_a_changed_section_reruns_its_stage_and_everything_downstream(tmp_path):
    RECIPE.run(config(), tmp_path)
    CALLS.clear()
    RECIPE.run(config(gen__times=2), tmp_path)
    assert CALLS == ["answer", "report"]
    CALLS.clear()
    RECIPE.run(config(gen__times=2, data__n=3), tmp_path)
    assert CALLS == ["prompts", "answer", "report"]
    assert len((tmp_path / "answers.jsonl").read_text().splitlines()) == 3
    CALLS.clear()
    (tmp_path / "answers.jsonl").unlink()  # a lost artefact is rebuilt
    RECIPE.run(config(gen__times=2, data__n=3), tmp_path)
    assert CALLS == ["answer", "report"]


def test_bad_rows_counted_below_the_threshold_and_stop_above(tmp_path):
    s = RECIPE.run(config(gen__bad_every=3), tmp_path / "a")  # ids 2 and 5 of 6: a third
    assert s["answer"]["answers"] == 4 and s["answer"]["bad"] == {"empty answer": 2}
    assert s["answer"]["bad_examples"]["empty answer"] == ["prompt 2", "prompt 5"]
    with pytest.raises(DataError, match=r"answers: 6 of 6 rows are bad \(100%\), more than max_bad_fraction=50%"):
        RECIPE.run(config(gen__bad_every=1), tmp_path / "b")


def test_unknown_stage_names(tmp_path):
    with pytest.raises(ConfigError, match="recipe toy has the stages prompts, answer, report"):
        RECIPE.run(config(), tmp_path, from_stage="nope")


def test_wilson_interval_against_the_formula():
    lo, hi = wilson(40, 97)
    assert lo == pytest.approx(0.31957, abs=1e-5) and hi == pytest.approx(0.51185, abs=1e-5)  # by hand
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0 and wilson(0, 0) == (0.0, 1.0)
    for n in range(1, 40):  # the bounds at 0/n and n/n are exact (6/6 once gave 0.9999999999999999), and mirror
        assert wilson(n, n)[1] == 1.0 and wilson(0, n)[0] == 0.0
        assert wilson(0, n)[1] == pytest.approx(3.8416 / (n + 3.8416)) and wilson(n, n)[0] == pytest.approx(
            1 - wilson(0, n)[1])
    assert rate(40, 97) == "41.2% [32.0, 51.2] (40/97)"
    assert markdown_table(["a", "b"], [[1, 0.5], ["x|y", 2]]).splitlines()[3] == "| x\\|y | 2 |"


def test_bar_chart_error_bars_that_round_past_the_value(tmp_path):
    # an interval bound a rounding error past its bar (the GenTool mini run's 6/6 crashed matplotlib)
    out = bar_chart(tmp_path / "c.png", ["x", "y"], {"m": [1.0, 0.0]}, ylabel="rate", title="t",
                    errors={"m": [(0.61, 0.9999999999999999), (2.8e-17, 0.39)]})
    assert out.stat().st_size > 1000


def test_recipe_cli_lists_and_refuses_unknown(capsys):
    from jaxlm.cli import main

    assert main(["recipe", "nope"]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err
