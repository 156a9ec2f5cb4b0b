"""The output-directory rule for the commands that train, evaluate, index, run recipes and demos:
a new or empty directory, or the command's own earlier output; anything else only with --overwrite,
and then nothing of the user's is deleted."""

import json

import pytest
from conftest import write_conversations, write_texts

from huayu.cli import main
from huayu.outputs import OUTPUT_RECORD, check_output_dir, claim_output_dir


@pytest.fixture
def users_dir(tmp_path):
    """A directory of someone else's files, with names huayu's outputs also use."""
    d = tmp_path / "mine"
    d.mkdir()
    for name in ("config.json", "model.safetensors", "notes.txt"):
        (d / name).write_text(f"the user's {name}", encoding="utf-8")
    return d


def _intact(d):
    return all((d / n).read_text(encoding="utf-8") == f"the user's {n}"
               for n in ("config.json", "model.safetensors", "notes.txt"))


def pretrain(tokenizer_dir, data, out, *extra):
    return ["pretrain", "--model", "tiny", "--tokenizer", tokenizer_dir, "--data", data, "--seq-len", "16",
            "--batch-size", "2", "--max-steps", "2", "--out", str(out), *extra]


def test_training_into_a_foreign_directory_is_refused_then_overwrites_only_same_names(
        tmp_path, tokenizer_dir, users_dir, capsys):
    data = write_texts(tmp_path / "t.txt")
    assert main(pretrain(tokenizer_dir, data, users_dir)) == 1
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err and "Traceback" not in err
    assert _intact(users_dir) and not (users_dir / OUTPUT_RECORD).exists()
    assert main(pretrain(tokenizer_dir, data, users_dir, "--overwrite")) == 0
    assert (users_dir / "notes.txt").read_text(encoding="utf-8") == "the user's notes.txt"  # nothing else deleted
    assert (users_dir / "train_result.json").exists()


@pytest.mark.parametrize("command", ["pretrain", "eval", "demo", "recipe"])
def test_a_file_as_out_is_a_clear_error(command, tmp_path, tokenizer_dir, tiny_model_dir, capsys):
    target = tmp_path / "a-file"
    target.write_text("keep me", encoding="utf-8")
    data, dialogues = write_texts(tmp_path / "t.txt"), write_conversations(tmp_path / "d.jsonl")
    argv = {"pretrain": pretrain(tokenizer_dir, data, target),
            "eval": ["eval", tiny_model_dir, "--data", dialogues, "--out", str(target)],
            "demo": ["demo", "--corpus", str(tmp_path), "--out", str(target)]}.get(command)
    if command == "recipe":
        recipe = tmp_path / "r.yaml"
        recipe.write_text(json.dumps({"out": str(target), "model": tiny_model_dir, "stages": [
            {"name": "a", "command": "sft", "args": {"data": dialogues, "max_steps": 1}}]}), encoding="utf-8")
        argv = ["recipe", "run", str(recipe)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "is a file, not a directory" in err and "Traceback" not in err
    assert target.read_text(encoding="utf-8") == "keep me"


def test_demo_refuses_a_foreign_directory_before_deleting_anything(tmp_path, users_dir, capsys):
    assert main(["demo", "--corpus", str(tmp_path), "--out", str(users_dir)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert _intact(users_dir)


def test_eval_refuses_a_foreign_directory_before_the_work(tmp_path, tiny_model_dir, users_dir, capsys):
    dialogues = write_conversations(tmp_path / "d.jsonl")
    argv = ["eval", tiny_model_dir, "--data", dialogues, "--max-new-tokens", "2", "--out", str(users_dir)]
    assert main(argv) == 1 and _intact(users_dir)
    assert main(argv + ["--overwrite"]) == 0 and (users_dir / "metrics.json").exists()
    assert (users_dir / "notes.txt").exists()
    assert main(argv[:-1] + [str(tmp_path / "ev")]) == 0
    assert main(argv[:-1] + [str(tmp_path / "ev")]) == 0  # its own earlier output: replaced


def test_data_index_refuses_foreign_files_at_its_prefix(tmp_path, tokenizer_dir, capsys):
    corpus = write_texts(tmp_path / "t.txt")
    (tmp_path / "store_ids.npy").write_text("not mine to replace", encoding="utf-8")
    argv = ["data", "index", corpus, "--out", str(tmp_path / "store"), "--tokenizer", tokenizer_dir]
    assert main(argv) == 1
    assert "not a huayu token store" in capsys.readouterr().err
    assert (tmp_path / "store_ids.npy").read_text(encoding="utf-8") == "not mine to replace"
    assert main(argv + ["--overwrite"]) == 0
    assert main(argv) == 0  # an earlier store is replaced


def test_recipe_run_refuses_a_foreign_root(tmp_path, tiny_model_dir, users_dir, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"out": str(users_dir), "model": tiny_model_dir, "stages": [
        {"name": "a", "command": "sft", "args": {"data": "d.jsonl", "max_steps": 1}}]}), encoding="utf-8")
    assert main(["recipe", "run", str(recipe)]) == 1
    assert "--overwrite" in capsys.readouterr().err and _intact(users_dir)


def test_the_rule_recognises_a_command_s_own_output(tmp_path):
    out = tmp_path / "o"
    assert claim_output_dir(out, "sft") is False  # new
    (out / "model.safetensors").write_text("x", encoding="utf-8")
    assert check_output_dir(out, "sft") is True
    with pytest.raises(Exception, match="holds the output of `huayu sft`"):
        check_output_dir(out, "pretrain")


def test_a_directory_written_with_overwrite_never_passes_for_huayu_s_own(tmp_path, users_dir, capsys):
    """Else the next run without --overwrite would take it for its own output and replace it whole."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    assert claim_output_dir(users_dir, "demo", overwrite=True) is False
    assert main(["demo", "--corpus", str(corpus), "--out", str(users_dir)]) == 1
    assert "--overwrite" in capsys.readouterr().err and _intact(users_dir)
