"""`huayu recipe run`: stages chained in order, skipped when done, refused when changed, resumed when cut off."""

import contextlib
import io
import json
from pathlib import Path

import pytest
import yaml
from conftest import write_conversations

from huayu.cli import COMMANDS, main
from huayu.errors import HuayuError
from huayu.recipes import load_recipe, plan

ROOT = Path(__file__).parents[1]
TINY = {"max_steps": 2, "batch_size": 2, "max_source_length": 32, "max_target_length": 16, "no_cache": True}


def write_recipe(path, model, data, out, stage2=None, **top):
    """Two tiny sft stages on `data`; `stage2` overrides keys of the second one."""
    stages = [{"name": "first", "command": "sft", "args": {"data": "${data}", "lr": 1e-3, **TINY}},
              {"name": "second", "command": "sft", "args": {"data": "${data}", "lr": 5e-4, **TINY}, **(stage2 or {})}]
    recipe = {"vars": {"data": data}, "out": str(out), "model": model, "stages": stages, **top}
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    """A two-stage recipe run to the end, the second stage evaluated: (tmp dir, recipe, its output)."""
    tmp = tmp_path_factory.mktemp("recipe")
    data = write_conversations(tmp / "d.jsonl")
    evaluation = {"data": "${data}", "max_new_tokens": 4, "max_samples": 2, "batch_size": 2}
    recipe = write_recipe(tmp / "r.yaml", tiny_model_dir, data, tmp / "out", {"eval": evaluation})
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        code = main(["recipe", "run", recipe])
    assert code == 0, output.getvalue()
    return tmp, recipe, output.getvalue()


def run(recipe, capsys, *extra):
    code = main(["recipe", "run", recipe, *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_stages_chain_and_record_markers_and_results(finished, tiny_model_dir):
    tmp, _, output = finished
    out = tmp / "out"
    first, second = out / "first", out / "second"
    assert yaml.safe_load((first / "config.yaml").read_text())["model"] == tiny_model_dir
    assert yaml.safe_load((second / "config.yaml").read_text())["model"] == str(first)
    assert f"from '{first}'" in output  # the trainer loaded stage 2's model from stage 1's output
    for stage in (first, second):
        marker = json.loads((stage / "recipe_stage.json").read_text())
        assert marker["command"][:1] == ["sft"] and f"--out {stage}" in marker["command_line"]
    rows = json.loads((out / "recipe_results.json").read_text())
    assert [r["stage"] for r in rows] == ["first", "second"]
    assert all(isinstance(r["train_loss"], float) for r in rows)
    assert rows[0]["eval_loss"] is None and isinstance(rows[1]["eval_loss"], float)
    assert set(rows[1]) >= {"ppl", "bleu4", "dist2", "f1", "rouge_l"}
    assert "| second | sft |" in (out / "recipe_results.md").read_text()
    assert yaml.safe_load((out / "recipe.yaml").read_text())["stages"][0]["args"]["data"] == str(tmp / "d.jsonl")


def test_rerun_skips_finished_stages(finished, capsys):
    tmp, recipe, _ = finished
    files = [p for p in (tmp / "out").rglob("*") if p.is_file() and p.parent != tmp / "out"]  # not recipe_*
    before = {p: p.stat().st_mtime_ns for p in files}
    code, output = run(recipe, capsys)
    assert code == 0, output
    assert "stage first: done, skipped" in output and "stage second: done, skipped" in output
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert "| second | sft |" in output


def test_changed_stage_is_refused(finished, capsys, tiny_model_dir):
    tmp, _, _ = finished
    changed = write_recipe(tmp / "changed.yaml", tiny_model_dir, str(tmp / "d.jsonl"), tmp / "out",
                           {"args": {"data": "${data}", "lr": 1e-4, **TINY}})
    code, output = run(changed, capsys)
    assert code == 1
    assert "stage second:" in output and "another version of the recipe" in output
    assert f"remove {tmp / 'out' / 'second'}" in output and "--lr 0.0001" in output


def test_interrupted_stage_resumes_and_a_new_eval_runs_alone(tmp_path, capsys, tiny_model_dir):
    data = write_conversations(tmp_path / "d.jsonl")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, data, tmp_path / "out")
    assert run(recipe, capsys)[0] == 0
    (tmp_path / "out" / "second" / "recipe_stage.json").unlink()  # as if killed after its checkpoint
    code, output = run(recipe, capsys)
    assert code == 0, output
    assert "stage first: done, skipped" in output
    assert "--resume true" in output and "resuming from" in output
    assert (tmp_path / "out" / "second" / "recipe_stage.json").exists()
    weights = tmp_path / "out" / "second" / "model.safetensors"
    trained = weights.stat().st_mtime_ns
    with_eval = write_recipe(tmp_path / "r.yaml", tiny_model_dir, data, tmp_path / "out",
                             {"eval": {"data": data, "max_new_tokens": 2, "max_samples": 1}})
    code, output = run(with_eval, capsys)  # an eval added later runs alone: the training stands
    assert code == 0, output
    assert "stage second: done, skipped" in output and "stage second: huayu eval" in output
    assert weights.stat().st_mtime_ns == trained and (tmp_path / "out" / "second" / "eval" / "metrics.json").exists()


def test_a_failing_stage_stops_the_recipe(tmp_path, capsys, tiny_model_dir):
    code, output = run(write_recipe(tmp_path / "r.yaml", tiny_model_dir, str(tmp_path / "missing.jsonl"),
                                    tmp_path / "out"), capsys)
    assert code == 1 and "stage first failed" in output
    assert not (tmp_path / "out" / "second").exists()


def test_variables_are_substituted_and_set(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", "tiny", "a.jsonl", "${root}/out",
                          vars={"data": "a.jsonl", "root": "runs"})
    assert plan(load_recipe(recipe, {}))[0].argv[:3] == ["sft", "--model", "tiny"]
    resolved = load_recipe(recipe, {"root": "/x", "data": "/d/b.jsonl"})
    first, second = plan(resolved)
    assert first.argv[first.argv.index("--data") + 1] == "/d/b.jsonl"
    assert first.argv[-2:] == ["--out", "/x/out/first"]
    assert second.argv[second.argv.index("--model") + 1] == "/x/out/first"
    with pytest.raises(HuayuError, match="not a variable"):
        load_recipe(recipe, {"nope": "1"})
    code, output = run(write_recipe(tmp_path / "bad.yaml", "tiny", "${missing}", "out"), capsys)
    assert code == 1 and "unknown variable ${missing}" in output


def test_stage_replay_ratio_replays_earlier_stages_data(tmp_path, capsys, tiny_model_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, "general.jsonl", tmp_path / "out",
                          {"args": {"data": "domain.jsonl", **TINY}, "replay_ratio": 0.5})
    _, second = plan(load_recipe(recipe, {}))
    i = second.argv.index("--replay-data")
    assert second.argv[i:i + 4] == ["--replay-data", "general.jsonl", "--replay-ratio", "0.5"]
    code, output = run(recipe, capsys, "--dry-run")  # sft's own parser accepts every stage's options
    assert code == 0, output
    assert "second: huayu sft --model" in output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["t5_three_stage.yaml", "vertical_domain.yaml", "bundled_chat.yaml"])
def test_shipped_recipes_resolve(name, tmp_path, capsys):
    recipe = str(ROOT / "recipes" / name)
    stages = plan(load_recipe(recipe, {"data_root": "/data"}))
    assert all(" ".join(s.argv[:2]) in COMMANDS or s.argv[0] in COMMANDS for s in stages)
    assert all("${" not in arg for s in stages for arg in s.argv)
    assert any("/data/" in arg for s in stages for arg in s.argv)
    code, output = run(recipe, capsys, "--dry-run", "--set", f"out_root={tmp_path}")  # every option parses
    assert code == 0, output
    assert output.count(": huayu ") == sum(1 + bool(s.eval_argv) for s in stages)


def test_a_tokenizer_stage_is_the_next_training_stage_s_tokenizer(tmp_path, capsys):
    """A `tokenizer train` stage trains on its args' data and hands its output to the training stage
    after it (which starts from a preset, so it needs one); it runs like any stage."""
    data = write_conversations(tmp_path / "d.jsonl")
    recipe = {"out": str(tmp_path / "out"), "model": "tiny", "stages": [
        {"name": "tok", "command": "tokenizer train", "args": {"data": [data], "kind": "char", "vocab_size": 200}},
        {"name": "lm", "command": "sft", "args": {"data": data, **TINY}}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    tok, lm = plan(load_recipe(str(path), {}))
    assert tok.argv[:2] == ["tokenizer", "train"] and tok.argv[-1] == str(tmp_path / "out" / "tok" / "tokenizer")
    assert lm.argv[lm.argv.index("--tokenizer") + 1] == tok.argv[-1]
    code, output = run(str(path), capsys)
    assert code == 0, output
    assert (tmp_path / "out" / "tok" / "tokenizer" / "tokenizer.json").exists()
    assert (tmp_path / "out" / "lm" / "model.safetensors").exists()
