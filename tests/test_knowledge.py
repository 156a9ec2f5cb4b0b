"""`huayu data knowledge`: terms and triples -> QA dialogues through seeded, validated templates."""

from __future__ import annotations

import json

import pytest

from huayu.cli import main
from huayu.data.formats import read_dialogues
from huayu.data.knowledge import TERM_QUESTIONS, KnowledgeConfig, Templates, generate, knowledge_to_dialogues
from huayu.errors import DataError

KB = {  # KdConv kb_*.json shape: entity -> [[entity, attribute, value], ...], duplicates included
    "故宫": [["故宫", "电话", "010-85007938"], ["故宫", "周边景点", "天坛"], ["故宫", "电话", "010-85007938"],
           ["故宫", "周边景点", "恭王府"], ["故宫", "Information", "故宫是明清两代的皇宫。它又称紫禁城。"]],
    "天坛": [["天坛", "门票", "15元。"]],
}
FIXED = Templates(term_questions=["什么是{x}？"], triple_questions=["{entity}的{attribute}是什么？"],
                  triple_answers=["{entity}的{attribute}是{value}。"], description_questions=["介绍一下{entity}。"])


def _write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def _pairs(samples: list[dict]) -> list[tuple[str, str]]:
    return [(s["messages"][0]["content"], s["messages"][1]["content"]) for s in samples]


@pytest.fixture
def kb(tmp_path) -> str:
    return _write(tmp_path / "kb_travel.json", json.dumps(KB, ensure_ascii=False, indent=2))


@pytest.fixture
def terms(tmp_path) -> str:
    lines = [json.dumps({"term": f"术语{i}", "description": f"术语{i}的解释。"}, ensure_ascii=False) for i in range(60)]
    return _write(tmp_path / "terms.jsonl", "\n".join(lines) + "\n")


def test_seed_picks_every_template_reproducibly(terms):
    first = knowledge_to_dialogues(terms, seed=1)
    used = {question.replace(f"术语{i}", "{x}") for i, (question, _) in enumerate(_pairs(first))}
    assert used == set(TERM_QUESTIONS)
    assert knowledge_to_dialogues(terms, seed=1) == first
    assert knowledge_to_dialogues(terms, seed=2) != first


def test_kdconv_triples_to_exact_pairs(kb):
    result = generate(KnowledgeConfig(path=kb), FIXED)
    assert result.kind == "triples"
    assert _pairs(result.samples) == [
        ("故宫的电话是什么？", "故宫的电话是010-85007938。"),
        ("故宫的周边景点是什么？", "故宫的周边景点是天坛、恭王府。"),
        ("介绍一下故宫。", "故宫是明清两代的皇宫。它又称紫禁城。"),  # Information: the value is the answer
        ("天坛的门票是什么？", "天坛的门票是15元。"),  # the value's own 。 is not doubled
    ]
    assert result.stats["items read"] == 6 and result.stats["duplicates dropped"] == 1
    assert result.stats["values merged into multi-valued facts"] == 2


def test_ungrouped_values_and_truncation(kb):
    result = generate(KnowledgeConfig(path=kb, group_values=False, max_answer_chars=15), FIXED)
    pairs = _pairs(result.samples)
    assert [a for q, a in pairs if "周边景点" in q] == ["故宫的周边景点是天坛。", "故宫的周边景点是恭王府。"]
    assert ("介绍一下故宫。", "故宫是明清两代的皇宫。") in pairs  # cut at the sentence end
    assert result.stats["answers cut to 15 characters"] == 1


def test_terms_tsv_custom_fields_and_per_item(tmp_path):
    tsv = _write(tmp_path / "terms.tsv", "光合作用\t植物利用光能合成有机物的过程。\n熵\t系统混乱程度的度量。\n")
    samples = knowledge_to_dialogues(tsv, per_item=3, seed=0)
    assert len(samples) == 6 and {a for _, a in _pairs(samples)} == {"植物利用光能合成有机物的过程。", "系统混乱程度的度量。"}
    assert len({q for q, _ in _pairs(samples[:3])}) == 3  # distinct templates per term
    jsonl = _write(tmp_path / "t.jsonl", json.dumps({"name": "熵", "text": "混乱程度。"}, ensure_ascii=False) + "\n")
    samples = knowledge_to_dialogues(jsonl, templates=FIXED, term_field="name", description_field="text")
    assert _pairs(samples) == [("什么是熵？", "混乱程度。")]


def test_plain_triples_jsonl_and_tsv(tmp_path):
    record = {"subject": "长城", "relation": "地址", "object": "北京市延庆区"}
    jsonl = _write(tmp_path / "triples.jsonl", json.dumps(record, ensure_ascii=False) + "\n")
    tsv = _write(tmp_path / "triples.tsv", "长城\t地址\t北京市延庆区\n")
    for path in (jsonl, tsv):
        assert _pairs(knowledge_to_dialogues(path, templates=FIXED)) == [("长城的地址是什么？", "长城的地址是北京市延庆区。")]


def test_bad_record_names_file_and_record(tmp_path):
    good = json.dumps({"subject": "长城", "relation": "地址", "object": "北京"}, ensure_ascii=False)
    path = _write(tmp_path / "triples.jsonl", good + '\n{"subject": "长城", "relation": "门票"}\n')
    with pytest.raises(DataError, match=r"triples.jsonl: line 2: missing key 'object'"):
        knowledge_to_dialogues(path)
    result = generate(KnowledgeConfig(path=path, skip_invalid=True))
    assert result.stats["invalid skipped"] == 1 and len(result.samples) == 1


def test_template_file_with_bad_placeholder(tmp_path, kb, capsys):
    bad = _write(tmp_path / "templates.yaml", "triple_questions:\n  - '{entity}的{attribute}是什么？'\n  - '{entiy}的{attribute}？'\n")
    with pytest.raises(DataError, match=r"templates.yaml: triple_questions template 2 .*unknown placeholder \{entiy\}"):
        knowledge_to_dialogues(kb, templates=bad)
    assert main(["data", "knowledge", kb, "--out", str(tmp_path / "o.jsonl"), "--templates", bad]) == 1
    assert "unknown placeholder {entiy}" in capsys.readouterr().err
    missing = _write(tmp_path / "missing.json", json.dumps({"triple_answers": ["{entity}的{attribute}"]}))
    with pytest.raises(DataError, match=r"missing.json: triple_answers template 1 .*missing placeholder \{value\}"):
        knowledge_to_dialogues(kb, templates=missing)


def test_cli_writes_conversations_huayu_reads(tmp_path, kb, capsys):
    out = tmp_path / "qa" / "kb_qa.jsonl"
    assert main(["data", "knowledge", kb, "--out", str(out), "--seed", "3", "--per-item", "2"]) == 0
    printed = capsys.readouterr().out
    assert "items read: 6" in printed and "duplicates dropped: 1" in printed and "samples written: 8" in printed
    assert "templates used:" in printed
    result = read_dialogues(out)
    assert result.format == "conversation" and len(result.records) == 8
    assert all([m["role"] for m in d.messages] == ["user", "assistant"] for d in result.records)
    assert not list(out.parent.glob(".*.tmp"))  # written through a temp file and a rename
