"""Every model family that Chinese checkpoints use and transformers ships, as a downloaded directory
(tests/hub_checkpoints.py), through the path such a checkpoint takes: sft with LoRA, chat with
piped stdin, eval and one serve request; an encoder through finetune-cls and predict.
docs/models.md lists the same families.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from conftest import DIALOGUES, TEXTS, write_conversations
from hub_checkpoints import ENCODERS, GENERATIVE, Shape, assert_spells_the_corpus, save_checkpoint

from huayu.cli import main


@pytest.fixture(scope="module")
def dialogues(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data")
    return write_conversations(tmp / "train.jsonl"), write_conversations(tmp / "eval.jsonl", DIALOGUES[:2])


@pytest.mark.parametrize("shape", GENERATIVE, ids=str)
def test_a_checkpoint_fine_tunes_with_lora_chats_evaluates_and_serves(shape, dialogues, tmp_path, monkeypatch,
                                                                      capsys):
    from huayu.models.families import family_of_model
    from huayu.models.loading import load_tokenizer

    train, held_out = dialogues
    base = save_checkpoint(shape, tmp_path / "base")
    assert_spells_the_corpus(load_tokenizer(base))
    adapter = str(tmp_path / "lora")
    assert main(["sft", "--model", base, "--data", train, "--finetuning-type", "lora", "--max-steps", "3",
                 "--batch-size", "2", "--max-source-length", "48", "--max-target-length", "24", "--out", adapter]) == 0
    lora = json.loads(Path(adapter, "adapter_config.json").read_text())
    model_type = json.loads(Path(base, "config.json").read_text())["model_type"]
    assert sorted(lora["target_modules"]) == sorted(family_of_model(base).lora_targets[model_type])  # docs/models.md

    monkeypatch.setattr("sys.stdin", io.StringIO("你好\n"))
    capsys.readouterr()
    assert main(["chat", adapter, "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.count("\n") == 1  # one reply line for one piped line

    assert main(["eval", adapter, "--data", held_out, "--max-new-tokens", "4", "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["samples"] == 2 and metrics["loss"] > 0

    _check_one_serve_request(shape, adapter)


def _check_one_serve_request(shape: Shape, adapter: str) -> None:
    from fastapi.testclient import TestClient

    from huayu.errors import HuayuError
    from huayu.serve.server import ServeConfig, build_service, create_app

    config = ServeConfig(model=adapter, served_model_name="m", threads=1)
    if shape.architecture.endswith("ForConditionalGeneration"):  # said, not crashed
        with pytest.raises(HuayuError, match="encoder-decoder"):
            build_service(config)
        return
    body = {"model": "m", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 4, "temperature": 0}
    with TestClient(create_app(build_service(config))) as client:
        reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("shape", ENCODERS, ids=str)
def test_an_encoder_checkpoint_fine_tunes_a_classifier_and_predicts(shape, tmp_path, capsys):
    """Encoders do not chat: what applies to them is classification (finetune-cls trains a whole
    classifier; LoRA adapters for classifiers are not supported there)."""
    base = save_checkpoint(shape, tmp_path / "base")
    rows = [f"{text}\t{'positive' if i % 2 else 'negative'}" for i, text in enumerate(TEXTS * 2)]
    labelled = tmp_path / "train.tsv"
    labelled.write_text("text\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "cls"
    assert main(["finetune-cls", base, "--train", str(labelled), "--dev", str(labelled), "--max-steps", "3",
                 "--batch-size", "4", "--eval-every", "3", "--max-length", "32", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["predict", str(out), "--input", str(labelled), "--backend", "torch"]) == 0
    predictions = capsys.readouterr().out.splitlines()
    assert len(predictions) == len(rows) and {p.split("\t")[0] for p in predictions} <= {"positive", "negative"}


def test_a_chatglm_config_gives_its_layer_count_as_num_layers():
    """ChatGLM's config (its own code, --trust-remote-code) says `num_layers`: the layers are still
    found, for --finetuning-type freeze, --lora-target all-linear and huayu plan."""
    import torch
    from transformers import PretrainedConfig

    from huayu.models.families import all_linear_targets, layer_count, layer_stacks

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attention = torch.nn.Module()
            self.self_attention.query_key_value = torch.nn.Linear(8, 24)

    model = torch.nn.Module()
    model.config = PretrainedConfig(num_layers=2)
    model.encoder = torch.nn.Module()
    model.encoder.layers = torch.nn.ModuleList([Block(), Block()])
    assert layer_count(model.config) == 2
    assert layer_stacks(model) == [("encoder.layers", model.encoder.layers)]
    assert all_linear_targets(model) == r"(encoder\.layers)\.\d+\.(self_attention\.query_key_value)"
