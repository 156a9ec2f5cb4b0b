"""Preference pairs: the readers (errors name the file and record, --skip-invalid counts), `data
inspect` / `data convert` on pairs, their encoding as SFT encodes replies, and the moss_style recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DIALOGUES

from huayu.cli import main
from huayu.data.preferences import encode_pairs, pair_collate, read_preferences
from huayu.errors import DataError

SHARED = Path(__file__).parents[1] / ".." / "shared" / "data" / "instruct"
QUESTIONS = [d[i] for d in DIALOGUES for i in range(0, len(d), 2)]
ANSWERS = [d[i] for d in DIALOGUES for i in range(1, len(d), 2)]


def synthetic_pairs(rounds: int = 3) -> list[dict]:
    """Each question with several answers; the chosen one ends with 谢谢你, the rejected one does not:
    a preference a reward model (or DPO) can learn in a few steps."""
    return [{"prompt": q, "chosen": ANSWERS[(i + k) % len(ANSWERS)] + "谢谢你",
             "rejected": ANSWERS[(i + k) % len(ANSWERS)]} for k in range(rounds) for i, q in enumerate(QUESTIONS)]


def write_jsonl(path, records) -> str:
    Path(path).write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                                  for r in records), encoding="utf-8")
    return str(path)


def test_the_three_shapes_read_alike(tmp_path):
    dpo = [{"conversations": [{"from": "system", "value": "你是助手"}, {"from": "human", "value": "你好"}],
            "chosen": {"from": "gpt", "value": "你好！"}, "rejected": {"from": "gpt", "value": "走开"}}]
    ranking = [{"instruction": "你好", "input": "", "output": ["你好！", "走开", "嗯"], "system": "你是助手",
                "history": []}]
    plain = [{"prompt": "你好", "chosen": "你好！", "rejected": "走开", "system": "你是助手"},
             {"messages": [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好"}],
              "chosen": "你好！", "rejected": "走开"},
             {"prompt": [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好"}],  # trl's
              "chosen": [{"role": "assistant", "content": "你好！"}], "rejected": [{"role": "assistant", "content": "走开"}]}]
    (tmp_path / "dpo.json").write_text(json.dumps(dpo, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "rm.json").write_text(json.dumps(ranking, ensure_ascii=False), encoding="utf-8")
    results = [read_preferences(tmp_path / "dpo.json"), read_preferences(tmp_path / "rm.json"),
               read_preferences(write_jsonl(tmp_path / "p.jsonl", plain))]
    assert [r.format for r in results] == ["pairs", "ranking", "pairs"]
    pairs = [p for r in results for p in r.records]
    assert len(pairs) == 5
    for pair in pairs:
        assert pair.prompt == [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好"}]
        assert (pair.chosen, pair.rejected) == ("你好！", "走开")
    assert pairs[1].source.endswith("rm.json:record 1") and pairs[4].source.endswith("p.jsonl:line 3")


@pytest.mark.parametrize("record, reason", [
    ({"prompt": "你好", "chosen": "好"}, "line 2: missing key 'rejected'"),
    ({"chosen": "好", "rejected": "坏"}, "line 2: missing the prompt: one of 'conversations', 'messages', 'prompt'"),
    ({"prompt": "你好", "chosen": "好", "rejected": ""}, "line 2: rejected: empty text"),
    ({"prompt": "你好", "chosen": {"role": "user", "content": "好"}, "rejected": "坏"},
     "line 2: chosen: expected an assistant turn, got a user turn"),
    ({"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "嗯"}], "chosen": "好",
      "rejected": "坏"}, "line 2: the prompt must end with a user turn"),
    ({"messages": [{"role": "client", "content": "你好"}], "chosen": "好", "rejected": "坏"},
     "line 2: messages turn 1: unknown role 'client'"),
    ("{not json", "line 2: invalid JSON"),
])
def test_a_bad_record_names_the_file_the_line_and_the_reason(tmp_path, record, reason):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "你好", "chosen": "好", "rejected": "坏"}, record])
    with pytest.raises(DataError) as err:
        read_preferences(path)
    assert str(err.value).startswith(f"{path}: {reason}")
    result = read_preferences(path, skip_invalid=True)
    assert (len(result.records), result.skipped) == (1, 1)


def test_a_ranking_needs_two_replies_and_other_data_is_not_pairs(tmp_path):
    path = tmp_path / "rm.json"
    path.write_text(json.dumps([{"instruction": "你好", "output": ["好", "坏"]}, {"instruction": "你好", "output": ["好"]}],
                               ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DataError, match=r"rm.json: record 2: output: expected a list of at least 2 replies"):
        read_preferences(path)
    with pytest.raises(DataError, match="not preference data"):
        read_preferences(write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "你好"}]}]))


def test_cli_skip_invalid_counts_and_inspect_shows_pairs(tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", synthetic_pairs(1) + ['{"prompt": "你好"}'])
    assert main(["data", "inspect", path]) == 1
    assert f"{path}: line 9: missing key 'chosen'" in capsys.readouterr().err
    assert main(["data", "inspect", path, "--skip-invalid", "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "format: pairs" in out and "pairs: 8" in out and "skipped (invalid): 1" in out
    assert "chosen reply the longer one: 8 of 8 (100%)" in out
    assert f"user: {QUESTIONS[0]}\n  chosen: {ANSWERS[0]}谢谢你\n  rejected: {ANSWERS[0]}\n" in out


@pytest.mark.skipif(not (SHARED / "dpo_zh_demo.json").exists(), reason="needs ../shared/data")
def test_the_shared_preference_files_read_whole():
    dpo, rm = read_preferences(SHARED / "dpo_zh_demo.json"), read_preferences(SHARED / "oaast_rm_zh.json")
    assert (dpo.format, len(dpo.records), rm.format, len(rm.records)) == ("pairs", 300, "ranking", 775)
    assert sum(p.prompt[0]["role"] == "system" for p in dpo.records) == 64
    assert max(len(p.prompt) for p in rm.records) == 5  # history turns come before the instruction


def test_convert_splits_pairs_and_writes_prompts_with_chosen_replies(tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", synthetic_pairs(3))
    assert main(["data", "convert", path, "--to", "pairs", "--split-ratio", "8,1,1", "--out",
                 str(tmp_path / "split")]) == 0
    parts = {name: read_preferences(tmp_path / "split" / f"{name}.jsonl").records for name in ("train", "valid", "test")}
    assert [len(p) for p in parts.values()] == [19, 3, 2]
    originals = {(p.prompt[-1]["content"], p.chosen, p.rejected) for p in read_preferences(path).records}
    assert {(p.prompt[-1]["content"], p.chosen, p.rejected) for ps in parts.values() for p in ps} == originals
    assert main(["data", "convert", str(tmp_path / "split" / "test.jsonl"), "--to", "conversation", "--out",
                 str(tmp_path / "chosen.jsonl")]) == 0
    dialogues = [json.loads(line) for line in (tmp_path / "chosen.jsonl").read_text().splitlines()]
    assert [d["messages"][-1]["content"] for d in dialogues] == [p.chosen for p in parts["test"]]
    conversations = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "你好"},
                                                                     {"role": "assistant", "content": "好"}]}])
    assert main(["data", "convert", conversations, "--to", "pairs", "--out", str(tmp_path / "x.jsonl")]) == 1
    assert "--to pairs needs preference data" in capsys.readouterr().err


def test_pairs_are_encoded_as_sft_encodes_replies_and_batches_count_pairs(tmp_path, tokenizer):
    from huayu.data.chat import encode_dialogue, ensure_chat_template
    from huayu.models.families import DECODER

    ensure_chat_template(tokenizer)
    records = synthetic_pairs(1)[:3]
    records.append({**records[0], "rejected": records[0]["chosen"]})  # as oaast_rm_zh.json has three
    pairs = read_preferences(write_jsonl(tmp_path / "p.jsonl", records)).records
    notes = []
    examples = encode_pairs(tokenizer, DECODER, pairs, 64, 64, report=notes.append)
    assert len(examples) == 3
    assert notes == ["train: 4 pairs -> 3; 0 truncated to max source/target length 64/64; 1 dropped: their two "
                     "replies are the same (once truncated)"]
    messages = pairs[0].prompt + [{"role": "assistant", "content": pairs[0].chosen}]
    assert examples[0].chosen == encode_dialogue(tokenizer, messages, 64, 64, "last")
    assert encode_pairs(tokenizer, DECODER, pairs, 64, 4, report=notes.append) == []  # only the answers' starts
    assert notes[-1] == ("train: 4 pairs -> 0; 4 truncated to max source/target length 64/4; 4 dropped: their two "
                         "replies are the same (once truncated)")

    batch = pair_collate(tokenizer.pad_token_id)(examples[:3])
    assert batch["input_ids"].shape[0] == 6 and batch["reply_labels"].shape == batch["input_ids"].shape
    assert DECODER.loss_items(batch) == 3  # the loop weights a batch by its pairs
    assert batch["input_ids"][3, :len(examples[0].rejected.input_ids)].tolist() == examples[0].rejected.input_ids


def test_the_moss_style_recipe_plans_and_parses(capsys):
    recipe = str(Path(__file__).parents[1] / "recipes" / "moss_style.yaml")
    assert main(["recipe", "run", recipe, "--dry-run", "--set", "out_root=/nonexistent"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["pairs_split", "chosen_dialogues", "sft", "rm", "dpo", "simpo",
                                                      "judge"]
    assert "huayu dpo --model /nonexistent/moss_style/sft " in lines[4]
    assert "--reward-model /nonexistent/moss_style/rm --model /nonexistent/moss_style/dpo " in lines[6]
