"""The README stays true for a user who follows it word for word.

Every `huayu` command line of its ```bash blocks is parsed by that command's own parser (so a flag
or positional the command does not take fails here, and flags are spelled in full, not abbreviated);
every `--flag` in the prose exists; and the commands that are cheap run end to end, as written, in a
workspace whose `../shared/data` holds tiny stand-ins for the corpora the README names. Commands
that need a server, a GPU or a long training run are parsed only (the slow suite runs the training
path with tiny sizes).
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import json
import re
import shlex
from pathlib import Path

import pytest
from conftest import DIALOGUES, TEXTS, save_preset

from huayu.cli import COMMANDS, build_parser, main

README = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
SHARED = "../shared/data/"
SEPARATORS = {"|", "||", ";", "&&", "&"}
REDIRECTS = {"<", ">", ">>"}
ELISION = "..."  # "the options of the line above": such a line is parsed without it, never run
INPUT_SUFFIXES = (".txt", ".json", ".jsonl", ".gz", ".tsv", ".csv", ".yaml", ".yml")
# run end to end in the default suite: quick on tiny inputs, and no model training
CHEAP = {"data inspect", "data convert", "data knowledge", "tokenizer train", "metrics", "export reshard", "quantize"}
# the slow suite adds the training path, with these sizes put in place of the README's
TRAINING = {"pretrain", "sft", "eval", "generate", "plan", "data index", "data show-masked", "finetune-cls",
            "export merge", "export onnx", "predict"}
TINY = {"--model": {"small": "tiny", "t5-small": "t5-tiny", "glm-nano": "glm-tiny", "ernie-3.0-nano": "bert-tiny"},
        "--max-steps": "2", "--seq-len": "32", "--batch-size": "4", "--epochs": "1", "--eval-every": "1",
        "--save-every": "1", "--warmup-steps": "0", "--max-new-tokens": "4", "--workers": "1", "--bf16": None}


# ---------------------------------------------------------------- reading the README


def bash_lines(text: str) -> list[str]:
    """The lines of every ```bash block, continuation backslashes joined."""
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S)
    return [line.strip() for block in blocks for line in re.sub(r"\\\n\s*", " ", block).splitlines() if line.strip()]


def huayu_commands(line: str) -> list[tuple[list[str], bool]]:
    """(argv, whether a pipe feeds its stdin) of every huayu command in a shell line (after pipes and
    `;`, under `torchrun -m huayu.cli`), without comments and redirections."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, segment, fed = [], [], False
    for token in [*lexer, ";"]:
        if token not in SEPARATORS:
            segment.append(token)
            continue
        words = [w for i, w in enumerate(segment) if w not in REDIRECTS and (i == 0 or segment[i - 1] not in REDIRECTS)]
        if words[:1] == ["huayu"]:
            commands.append((words[1:], fed))
        elif "huayu.cli" in words:
            commands.append((words[words.index("huayu.cli") + 1:], fed))
        segment, fed = [], token == "|"
    return commands


def command_name(argv: list[str]) -> str:
    return " ".join(argv[:2]) if " ".join(argv[:2]) in COMMANDS else argv[0]


README_ENTRIES = [command for line in bash_lines(README) for command in huayu_commands(line)]
README_COMMANDS = [argv for argv, _ in README_ENTRIES]


def inline_code(text: str) -> list[str]:
    """`code` spans outside the fenced blocks."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.findall(r"`([^`\n]+)`", prose)


parser = functools.cache(build_parser)  # every README line of a command parses with the same parser


def flags(tokens: list[str]) -> list[str]:
    return [t.split("=", 1)[0] for t in tokens if t.startswith("--")]


# ---------------------------------------------------------------- parsing every command


def test_the_readme_has_commands_to_check():
    assert len(README_COMMANDS) > 50 and CHEAP | TRAINING <= {command_name(a) for a in README_COMMANDS}


@pytest.mark.parametrize("argv", README_COMMANDS, ids=lambda argv: " ".join(argv)[:60])
def test_readme_command_parses(argv):
    argv = [arg for arg in argv if arg != ELISION]
    name = command_name(argv)
    assert name in COMMANDS, f"`huayu {' '.join(argv)}`: no command {argv[0]!r}"
    args = argv[len(name.split()):]
    known = parser(name)._option_string_actions
    assert not [f for f in flags(args) if f not in known], f"`huayu {' '.join(argv)}`: unknown or abbreviated flags"
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        try:
            parser(name).parse_args(args)
        except SystemExit:
            pytest.fail(f"`huayu {' '.join(argv)}` does not parse: {errors.getvalue().strip()}")


def test_every_flag_in_the_prose_exists():
    """A flag named in the prose belongs to the command it is shown with, or else to some command."""
    every_flag = {f for name in COMMANDS for f in parser(name)._option_string_actions}
    unknown = []
    for span in inline_code(README):
        words = span.split()
        if words[0] == "huayu" and len(words) > 1 and not (words[1].isupper() or words[1] in ("--help", "--version")):
            name = command_name(words[1:])
            if name not in COMMANDS:
                unknown.append(f"{span}: no command {name!r}")
                continue
            unknown += [f"{span}: {f}" for f in flags(words) if f not in parser(name)._option_string_actions]
        elif words[0].startswith("--"):
            unknown += [f"{span}: {f}" for f in flags(words) if f not in every_flag]
    assert not unknown


# ---------------------------------------------------------------- running the cheap ones


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _jsonl(records: list) -> str:
    return "".join(_json(r) + "\n" for r in records)


def _counselling(turns: list[str]) -> dict:
    return {"conversation": [{"role": ("client", "counselor")[i % 2], "content": t} for i, t in enumerate(turns)]}


REVIEWS = [("房间很干净，服务也好", "positive"), ("太差了，不会再来", "negative")]
SENTIMENT = "text\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in REVIEWS * 8)
CORPUS = (TEXTS + [turn for d in DIALOGUES for turn in d] + [text for text, _ in REVIEWS] + ["好", "差"]) * 3
KNOWLEDGE = {"故宫": [["故宫", "门票", "60元"], ["故宫", "周边景点", "天坛"],
                    ["故宫", "Information", "明清两代的皇宫。"]]}
STAND_INS = {  # path under ../shared/data -> tiny contents in the real file's format (.gz: compressed)
    "pretrain/modern-zh.jsonl.gz": _jsonl([{"source": "s", "title": "t", "text": text} for text in CORPUS]),
    "dialogue/smilechat.jsonl.gz": _jsonl([_counselling(d) for d in DIALOGUES]
                                          + [_counselling(["只有提问，没有回答"])]),  # invalid: --skip-invalid
    "dialogue/kdconv/film/dev.json": _json([{"name": str(n), "messages": [{"message": t} for t in d]}
                                            for n, d in enumerate(DIALOGUES * 4)]),
    "dialogue/kdconv/travel/kb_travel.json": _json(KNOWLEDGE),
    "classify/chnsenticorp/train.tsv": SENTIMENT,
    "classify/chnsenticorp/dev.tsv": SENTIMENT,
    "instruct/alpaca_zh_demo.json": _json([{"instruction": q, "input": "", "output": a} for q, a, *_ in DIALOGUES]),
    "instruct/glaive_toolcall_zh_demo.json": _json([{"conversations": [{"from": "human", "value": "计算 12+7"},
                                                                   {"from": "function_call", "value": json.dumps(
                                                                       {"name": "calculator",
                                                                        "arguments": {"expression": "12+7"}})},
                                                                   {"from": "observation", "value": "19"},
                                                                   {"from": "gpt", "value": "结果是19。"}],
                                                  "tools": json.dumps([{"name": "calculator", "description": "算术",
                                                                        "parameters": {"type": "object", "properties": {
                                                                            "expression": {"type": "string"}}}}])}]),
    "instruct/dpo_zh_demo.json": _json([{"conversations": [{"from": "human", "value": q}],
                                         "chosen": {"from": "gpt", "value": a},
                                         "rejected": {"from": "gpt", "value": "不知道。"}} for q, a, *_ in DIALOGUES]),
}


def test_every_corpus_the_readme_names_has_a_stand_in():
    named = set(re.findall(re.escape(SHARED) + r"([\w./-]+\w)", README))
    assert named <= STAND_INS.keys()


def workspace(root: Path) -> Path:
    """`root/work` to run in, beside `root/shared/data` holding the stand-ins."""
    for name, text in STAND_INS.items():
        path = root / "shared" / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    (root / "work").mkdir()
    return root / "work"


def inputs(args: list[str]) -> list[str]:
    """The arguments that name files or directories the command reads (what --out names is written)."""
    return [a for i, a in enumerate(args) if not a.startswith("-") and (i == 0 or args[i - 1] != "--out")
            and ("/" in a or a.endswith(INPUT_SUFFIXES))]


def written(path: Path) -> bool:
    """Whether `path` exists, as a file, a directory or a token store's prefix (PREFIX_ids.npy ...)."""
    return path.exists() or any(path.parent.glob(f"{path.name}_*"))


def run_readme_commands(work: Path, names: set[str], sizes: dict, capsys) -> set[str]:
    """Run, in README order, every command of `names` whose inputs exist by then and that reads no
    pipe (chat, predict from stdin); the names that ran."""
    ran = set()
    for argv, fed in README_ENTRIES:
        name = command_name(argv)
        if name not in names or fed or ELISION in argv or not all(written(work / p) for p in inputs(argv)):
            continue
        argv = resized(argv, sizes)
        code = main(argv)
        output = capsys.readouterr()
        assert code == 0, f"`huayu {shlex.join(argv)}` exited with {code}:\n{output.out[-2000:]}\n{output.err[-2000:]}"
        ran.add(name)
    return ran


def resized(argv: list[str], sizes: dict) -> list[str]:
    """`argv` with the values of the flags in `sizes` replaced (a mapping replaces only the values it
    names; None drops the flag)."""
    out = []
    for i, arg in enumerate(argv):
        flag = argv[i - 1] if i else None
        if arg in sizes and sizes[arg] is None:
            continue
        if flag in sizes and not arg.startswith("-"):
            new = sizes[flag]
            arg = new.get(arg, arg) if isinstance(new, dict) else new
        out.append(arg)
    return out


def test_the_cheap_readme_commands_run_as_written(tmp_path, tokenizer, monkeypatch, capsys):
    work = workspace(tmp_path)
    for model in ("out/pretrain", "out/sft"):  # what the training commands before them would have written
        save_preset("tiny", tokenizer, work / model)
    (work / "generated.txt").write_text("今天天气很好\n我会陪你聊天\n", encoding="utf-8")
    (work / "references.txt").write_text("今天天气不错\n我陪你聊天吧\n", encoding="utf-8")
    monkeypatch.chdir(work)
    assert run_readme_commands(work, CHEAP, {}, capsys) == CHEAP
    assert json.loads((work / "out/sft-single/model.safetensors.index.json").read_text())["weight_map"]


@pytest.mark.slow
def test_the_readme_training_path_runs_with_tiny_sizes(tmp_path, monkeypatch, capsys):
    work = workspace(tmp_path)
    monkeypatch.chdir(work)
    ran = run_readme_commands(work, CHEAP | TRAINING, TINY, capsys)
    # merge needs out/lora and metrics generated.txt, which the README makes from files of the user's own
    assert ran == (CHEAP | TRAINING) - {"export merge", "metrics"}
