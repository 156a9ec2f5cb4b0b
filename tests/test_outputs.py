"""The output-directory rule (huayu.outputs) in every command that writes a tokenizer, a model or a
data split: a new, empty or own earlier output is written (the earlier one replaced whole), a
foreign non-empty directory only with --overwrite and never emptied, a file as --out is refused."""

from __future__ import annotations

import json

import pytest
from conftest import save_preset, write_conversations, write_texts

from huayu.cli import main
from huayu.outputs import OUTPUT_RECORD, output_owner


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_model_dir):
    work = tmp_path_factory.mktemp("lora")
    out = work / "lora"
    assert main(["sft", "--model", tiny_model_dir, "--data", write_conversations(work / "d.jsonl"),
                 "--finetuning-type", "lora", "--max-steps", "1", "--out", str(out)]) == 0
    return str(out)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, tokenizer):
    from huayu.models.loading import load_model

    path = tmp_path_factory.mktemp("classifier")
    load_model("bert-tiny", tokenizer, classes=["negative", "positive"], seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def command_argv(name: str, request, tmp_path) -> tuple[list[str], str]:
    """`name`'s command line without --out, and a file its output holds."""
    if name == "tokenizer train":
        corpus = write_texts(tmp_path / "c.txt")
        return ["tokenizer", "train", "--data", corpus, "--vocab-size", "100"], "tokenizer.json"
    if name == "data convert":
        data = write_conversations(tmp_path / "d.jsonl")
        return ["data", "convert", data, "--to", "conversation", "--split-ratio", "2,1,1"], "train.jsonl"
    model = request.getfixturevalue("tiny_model_dir")
    if name == "export merge":
        return ["export", "merge", model, request.getfixturevalue("lora_dir")], "model.safetensors"
    if name == "export onnx":
        return ["export", "onnx", request.getfixturevalue("classifier_dir")], "model.onnx"
    if name == "export reshard":
        return ["export", "reshard", model, "--max-shard-size", "100KB"], "model.safetensors.index.json"
    return ["quantize", model, "--bits", "8"], "model.safetensors"


COMMANDS = ["tokenizer train", "data convert", "export merge", "export reshard", "quantize", "export onnx"]
# an ONNX export takes ~5 s, so the tests that run one are in the slow suite; the refusals come first and are fast
RUNNING = [pytest.param(c, marks=pytest.mark.slow) if c == "export onnx" else c for c in COMMANDS]


def foreign_dir(path):
    path.mkdir()
    (path / "notes.txt").write_text("mine", encoding="utf-8")
    return path


@pytest.mark.parametrize("name", COMMANDS)
def test_a_foreign_directory_is_refused_and_left_intact(name, request, tmp_path, capsys):
    argv, _ = command_argv(name, request, tmp_path)
    out = foreign_dir(tmp_path / "out")
    assert main([*argv, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"huayu {name}: error: --out '{out}' is not empty" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"


@pytest.mark.parametrize("name", COMMANDS)
def test_a_file_as_out_is_a_clear_error(name, request, tmp_path, capsys):
    argv, _ = command_argv(name, request, tmp_path)
    out = tmp_path / "out.bin"
    out.write_text("mine", encoding="utf-8")
    assert main([*argv, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"--out '{out}' is a file, not a directory" in err and "Traceback" not in err
    assert out.read_text(encoding="utf-8") == "mine"


@pytest.mark.parametrize("name", RUNNING)
def test_an_earlier_output_of_the_command_is_replaced_whole(name, request, tmp_path):
    argv, made = command_argv(name, request, tmp_path)
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 0
    (out / "left-over.bin").write_bytes(b"of the earlier run")
    assert main([*argv, "--out", str(out)]) == 0
    assert (out / made).is_file() and not (out / "left-over.bin").exists()
    assert json.loads((out / OUTPUT_RECORD).read_text(encoding="utf-8")) == {"command": name}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


@pytest.mark.parametrize("name", RUNNING)
def test_overwrite_writes_into_a_foreign_directory_and_deletes_nothing(name, request, tmp_path):
    argv, made = command_argv(name, request, tmp_path)
    out = foreign_dir(tmp_path / "out")
    assert main([*argv, "--out", str(out), "--overwrite"]) == 0
    assert (out / made).is_file() and (out / "notes.txt").read_text(encoding="utf-8") == "mine"
    # the directory is still the user's: a run without --overwrite must not replace it whole
    main([*argv, "--out", str(out)])
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"


def test_convert_refuses_an_existing_output_file_unless_overwrite(tmp_path, capsys):
    argv = ["data", "convert", write_conversations(tmp_path / "d.jsonl"), "--to", "conversation"]
    out = tmp_path / "converted.jsonl"
    out.write_text("mine\n", encoding="utf-8")
    assert main([*argv, "--out", str(out)]) == 1
    assert f"--out {out} exists" in capsys.readouterr().err and out.read_text(encoding="utf-8") == "mine\n"
    assert main([*argv, "--out", str(out), "--overwrite"]) == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == 6


def test_an_export_never_copies_its_sources_output_record(tmp_path, tiny_model_dir):
    """Copied from a source that is itself an export, the record would claim a directory written with
    --overwrite for the source's command, which would then replace it whole."""
    source = tmp_path / "sharded"
    assert main(["export", "reshard", tiny_model_dir, "--max-shard-size", "100KB", "--out", str(source)]) == 0
    out = foreign_dir(tmp_path / "out")
    assert main(["quantize", str(source), "--out", str(out), "--overwrite"]) == 0
    assert output_owner(out) != "export reshard"


def test_an_export_into_its_own_input_is_refused(tmp_path, tokenizer, capsys):
    model = save_preset("tiny", tokenizer, tmp_path / "model")
    assert main(["export", "reshard", model, "--out", model, "--overwrite"]) == 1
    assert "is an input of `huayu export reshard`" in capsys.readouterr().err
