"""`huayu data knowledge`: knowledge -> question/answer dialogues, for a recipe's knowledge stage.

Two kinds of knowledge: terms with their descriptions (`什么是{x}？` -> the description) and
(entity, attribute, value) triples such as KdConv's kb_*.json (`{entity}的{attribute}是什么？` ->
`{entity}的{attribute}是{value}。`). Each sample's question (and answer) template is drawn at random
with a seeded generator, so many phrasings of a question teach one fact and a run is reproducible.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import string
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from huayu.config import add_config_arguments, build_config, config_from_args, field_doc
from huayu.data.commands import write_lines
from huayu.data.formats import (_collect, _first_char, _Invalid, _is_json, _json_entries, _lines, _read_all,
                                _required, _text, _type_name)
from huayu.errors import DataError, HuayuError

KINDS = ("auto", "triples", "terms")
TRIPLE_KEYS = ("subject", "relation", "object")
_SENTENCE_ENDS = "。！？；!?;"
_DOUBLE_STOP = re.compile(r"(?<=[。！？!?])。")  # "无需门票。" in "{value}。" ends once, not "。。"
TERM_QUESTIONS = ("什么是{x}？", "你听说过{x}吗？", "{x}是什么？", "请介绍一下{x}。", "能解释一下{x}吗？", "{x}指的是什么？")
TRIPLE_QUESTIONS = ("{entity}的{attribute}是什么？", "你知道{entity}的{attribute}吗？", "请问{entity}的{attribute}是？",
                    "我想知道{entity}的{attribute}。")
TRIPLE_ANSWERS = ("{entity}的{attribute}是{value}。", "{value}")
DESCRIPTION_QUESTIONS = ("介绍一下{entity}。", "{entity}是什么样的？", "你了解{entity}吗？")


@dataclass
class Templates:
    """Question/answer templates; a `--templates` YAML/JSON file overrides any of these lists."""

    term_questions: list[str] = field_doc("questions about a term {x}; the answer is its description",
                                          default_factory=lambda: list(TERM_QUESTIONS))
    triple_questions: list[str] = field_doc("questions about {entity}'s {attribute}",
                                            default_factory=lambda: list(TRIPLE_QUESTIONS))
    triple_answers: list[str] = field_doc("answers giving the {value} (of {entity}'s {attribute})",
                                          default_factory=lambda: list(TRIPLE_ANSWERS))
    description_questions: list[str] = field_doc("questions about {entity} answered by a description attribute",
                                                 default_factory=lambda: list(DESCRIPTION_QUESTIONS))
    description_attributes: list[str] = field_doc("attributes holding a description of the entity (KdConv)",
                                                  default_factory=lambda: ["Information"])


# template list -> (placeholders it may use, placeholders it must use)
PLACEHOLDERS = {
    "term_questions": ({"x"}, {"x"}),
    "triple_questions": ({"entity", "attribute"}, {"entity"}),
    "triple_answers": ({"entity", "attribute", "value"}, {"value"}),
    "description_questions": ({"entity"}, {"entity"}),
}


@dataclass
class KnowledgeConfig:
    path: str = field_doc("knowledge file: KdConv kb_*.json, triples JSONL/TSV or terms JSON/JSONL/TSV",
                          positional=True, default=None)
    out: str | None = field_doc("conversation JSONL file to write", default=None)
    kind: str = field_doc("triples, terms or auto (detect from the first record)", default="auto")
    templates: str | None = field_doc("YAML/JSON file overriding the built-in templates", default=None)
    seed: int = field_doc("seed for the template choice", default=0)
    per_item: int = field_doc("samples per term/fact, each with a different question template", default=1)
    max_answer_chars: int = field_doc("cut longer descriptions/values, at a sentence end if one is near (0: never)",
                                      default=300)
    group_values: bool = field_doc("merge the values of one entity's attribute (e.g. 周边景点) into one answer",
                                   default=True)
    term_field: str = field_doc("terms: JSON field with the term", default="term")
    description_field: str = field_doc("terms: JSON field with the description", default="description")
    skip_invalid: bool = field_doc("skip (and count) malformed records instead of stopping", default=False)


@dataclass
class KnowledgeResult:
    samples: list[dict]  # {"messages": [user question, assistant answer]}
    kind: str
    stats: Counter  # items read, duplicates dropped, invalid skipped, ...
    used: Counter  # template -> samples using it


# ---------------------------------------------------------------- templates


def load_templates(path=None) -> Templates:
    """Templates from a YAML/JSON file (lists it leaves out keep their defaults; no file: the defaults),
    checked here so a typo like `{entiy}` fails before any sample is written, not halfway through."""
    if path is None:
        return Templates()
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise HuayuError(f"{path}: cannot read templates: {exc}") from None
    if not isinstance(data, dict):
        known = ", ".join(f.name for f in fields(Templates))
        raise DataError(path, "file", f"expected a mapping of template lists ({known})")
    templates = build_config(Templates, data, source=str(path))
    check_templates(templates, path)
    return templates


def check_templates(templates: Templates, source="templates") -> None:
    for name, (allowed, required) in PLACEHOLDERS.items():
        group = getattr(templates, name)
        if not group:
            raise DataError(source, name, "needs at least one template")
        for n, template in enumerate(group, 1):
            reason = _placeholder_problem(template, allowed, required)
            if reason:
                raise DataError(source, f"{name} template {n} {template!r}", reason)


def _placeholder_problem(template: str, allowed: set[str], required: set[str]) -> str | None:
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        return f"{exc} (write a literal brace as {{{{ or }}}})"
    known = ", ".join("{" + p + "}" for p in sorted(allowed))
    if names - allowed:
        return f"unknown placeholder {', '.join('{' + p + '}' for p in sorted(names - allowed))} (allowed: {known})"
    if required - names:
        return f"missing placeholder {', '.join('{' + p + '}' for p in sorted(required - names))}"
    return None


# ---------------------------------------------------------------- reading


def _entries(path: Path):
    """(where, raw) per record: a KdConv KB (one JSON object, entity -> [[entity, attribute, value]]),
    JSON records, or tab-separated columns."""
    if _first_char(path) == "{":
        try:
            data = json.loads(_read_all(path))
        except json.JSONDecodeError:
            data = None  # JSONL: one object per line
        if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
            triples = [(entity, t) for entity, items in data.items() for t in items]
            return [(f"record {n} (entity {entity!r})", t) for n, (entity, t) in enumerate(triples, 1)]
    if _is_json(path):
        return list(_json_entries(path))
    return [(f"line {n}", line.split("\t")) for n, line in _lines(path) if line.strip()]


def _detect_kind(path: Path, entries, term_field: str) -> str:
    raw = next((raw for _, raw in entries if not isinstance(raw, _Invalid)), None)
    if isinstance(raw, list) and len(raw) in (2, 3):
        return ("terms", "triples")[len(raw) == 3]
    if isinstance(raw, dict) and set(TRIPLE_KEYS) <= raw.keys():
        return "triples"
    if isinstance(raw, dict) and term_field in raw:
        return "terms"
    raise DataError(path, "file", f"cannot tell triples from terms ({_type_name(raw)} records); pass --kind")


def _builder(kind: str, cfg: KnowledgeConfig):
    names, keys = (("entity", "attribute", "value"), TRIPLE_KEYS) if kind == "triples" else (
        ("term", "description"), (cfg.term_field, cfg.description_field))

    def build(raw, source: str) -> list[tuple[str, ...]]:
        if isinstance(raw, dict):
            raw = [_required(raw, key) for key in keys]
        if not isinstance(raw, list) or len(raw) != len(names):
            got = f"{len(raw)} columns" if isinstance(raw, list) else _type_name(raw)
            raise _Invalid(f"expected {len(names)} fields ({', '.join(names)}), got {got}")
        return [tuple(_text(value, name).strip() for value, name in zip(raw, names))]

    return build


# ---------------------------------------------------------------- generating


def generate(cfg: KnowledgeConfig, templates: Templates | None = None) -> KnowledgeResult:
    """Read `cfg.path` and turn every unique term or fact into `cfg.per_item` QA dialogues."""
    if cfg.kind not in KINDS:
        raise HuayuError(f"kind must be one of {', '.join(KINDS)}, got {cfg.kind!r}")
    if cfg.per_item < 1 or cfg.max_answer_chars < 0:
        raise HuayuError("per_item must be >= 1 and max_answer_chars >= 0")
    if templates is None:
        templates = load_templates(cfg.templates)
    else:
        check_templates(templates)
    path = Path(cfg.path)
    entries = _entries(path)
    kind = _detect_kind(path, entries, cfg.term_field) if cfg.kind == "auto" else cfg.kind
    items, skipped = _collect(path, entries, _builder(kind, cfg), cfg.skip_invalid)
    unique = list(dict.fromkeys(items))
    stats = Counter({"items read": len(items), "duplicates dropped": len(items) - len(unique),
                     "invalid skipped": skipped})
    if kind == "triples" and cfg.group_values:
        unique = _group_values(unique, stats)
    result = KnowledgeResult([], kind, stats, Counter())
    rng = random.Random(cfg.seed)
    for item in unique:
        for question, answer in _pairs(item, kind, templates, cfg, rng, result):
            result.samples.append({"messages": [{"role": "user", "content": question},
                                                {"role": "assistant", "content": answer}]})
    stats["samples written"] = len(result.samples)
    return result


def _group_values(triples: list[tuple[str, str, str]], stats: Counter) -> list[tuple[str, str, str]]:
    """One fact per (entity, attribute): KdConv lists each 周边景点 as its own triple, and asking the same
    question with five different answers would teach the model that any one of them is the whole answer."""
    groups: dict[tuple[str, str], list[str]] = {}
    for entity, attribute, value in triples:
        groups.setdefault((entity, attribute), []).append(value)
    stats["values merged into multi-valued facts"] = sum(len(v) for v in groups.values() if len(v) > 1)
    return [(entity, attribute, "、".join(values)) for (entity, attribute), values in groups.items()]


def _pairs(item: tuple[str, ...], kind: str, templates: Templates, cfg: KnowledgeConfig, rng: random.Random,
           result: KnowledgeResult):
    """`per_item` (question, answer) pairs with distinct question templates, counting what was used."""
    if kind == "terms":
        questions, answers, fill = templates.term_questions, ["{description}"], {"x": item[0], "description": item[1]}
    elif item[1] in templates.description_attributes:
        questions, answers, fill = templates.description_questions, ["{value}"], {"entity": item[0], "value": item[2]}
    else:
        questions, answers = templates.triple_questions, templates.triple_answers
        fill = dict(zip(("entity", "attribute", "value"), item))
    key = "description" if kind == "terms" else "value"
    fill[key] = _truncate(fill[key], cfg.max_answer_chars, result.stats)
    count = min(cfg.per_item, len(questions))
    result.stats["samples short of per_item (too few templates)"] += cfg.per_item - count
    for question in rng.sample(questions, count):
        answer = rng.choice(answers)
        result.used[question] += 1
        if len(answers) > 1:
            result.used[answer] += 1
        yield question.format(**fill), _DOUBLE_STOP.sub("", answer.format(**fill))


def _truncate(text: str, limit: int, stats: Counter) -> str:
    """Cut at the last sentence end within `limit` when it keeps at least half, else at `limit`."""
    if not limit or len(text) <= limit:
        return text
    stats[f"answers cut to {limit} characters"] += 1
    head = text[:limit]
    end = max(head.rfind(c) for c in _SENTENCE_ENDS)
    return head[: end + 1] if end + 1 >= limit // 2 else head


def knowledge_to_dialogues(path, kind: str = "auto", templates: Templates | str | None = None, seed: int = 0,
                           **options) -> list[dict]:
    """The recipe-runner entry: conversation records for `path`; `templates` is a file or a `Templates`,
    `options` are other KnowledgeConfig fields."""
    if isinstance(templates, (str, Path)):
        options["templates"], templates = str(templates), None
    return generate(KnowledgeConfig(path=str(path), kind=kind, seed=seed, **options), templates).samples


# ---------------------------------------------------------------- command


def add_knowledge_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, KnowledgeConfig)


def run_knowledge(args) -> int:
    cfg = config_from_args(KnowledgeConfig, args)
    if not cfg.path or not cfg.out:
        raise HuayuError("give the knowledge file and --out FILE")
    result = generate(cfg)
    write_lines(Path(cfg.out), [json.dumps(s, ensure_ascii=False) for s in result.samples])
    print(f"{cfg.path}: {result.kind}")
    for name, count in result.stats.items():
        if count or name in ("duplicates dropped", "invalid skipped"):
            print(f"  {name}: {count:,}")
    print(f"wrote {len(result.samples):,} samples to {cfg.out}\ntemplates used:")
    for template, count in result.used.most_common():
        print(f"  {count:>8,}  {template}")
    return 0
