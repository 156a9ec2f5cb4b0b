"""`huayu recipe run RECIPE.yaml`: training stages in order, each starting from the previous one's output.

Multi-stage recipes (the T5 chat model's dialogue -> knowledge -> instruction stages, ChatDoctor's
general -> domain tuning) take days, so a rerun must never redo finished work nor quietly reuse work
done under other settings. After a stage succeeds, `<out>/<stage>/recipe_stage.json` records its
resolved command line and a hash of it chained with every earlier stage's hash: a rerun skips a
stage whose hash matches, refuses one whose recipe changed (so would everything built on it), and
continues an interrupted training stage (checkpoints, no marker) with the trainer's `--resume`.
Every stage runs in-process through `huayu.cli.main`, so it takes exactly the flags its command does.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from huayu.errors import HuayuError
from huayu.outputs import OVERWRITE_HELP, check_output_dir, claim_output_dir

TRAINING = ("pretrain", "sft", "rm", "dpo")
_COMMON = {"name", "command", "args"}
STAGE_KEYS = {"pretrain": _COMMON | {"eval"}, "sft": _COMMON | {"eval", "replay_ratio"}, "rm": _COMMON,
              "dpo": _COMMON | {"eval"}, "data knowledge": _COMMON | {"input", "output"},
              "data convert": _COMMON | {"input", "output"}, "tokenizer train": _COMMON | {"output"},
              "rm compare": _COMMON | {"output"}}
TOKENIZER = "tokenizer train"  # its output is the tokenizer of the training stage after it
TOP_KEYS = {"vars", "out", "model", "tokenizer", "stages"}
MARKER = "recipe_stage.json"
METRICS = {"eval_loss": "loss", "ppl": "ppl", "bleu4": "bleu4", "dist2": "dist2", "f1": "f1", "rouge_l": "rouge_l"}
VARIABLE = re.compile(r"\$\{([^}]*)\}")


@dataclass
class Stage:
    name: str
    command: str
    out: Path  # the stage's directory: its model, or its data file, and its marker
    argv: list[str]
    hash: str  # of argv and every earlier stage's hash
    eval_argv: list[str] | None
    eval_hash: str | None


def substitute(value, table: dict, where: str):
    """`value` with every `${name}` in its strings replaced from `table`; a string that is one
    variable takes the variable's value as it is (a number stays a number)."""
    if isinstance(value, dict):
        return {k: substitute(v, table, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, table, where) for v in value]
    if not isinstance(value, str):
        return value
    for name in VARIABLE.findall(value):
        if name not in table:
            raise HuayuError(f"{where}: unknown variable ${{{name}}} (known: {', '.join(table) or 'none'}; "
                             "declare it under vars:, or name an earlier stage as ${STAGE.out})")
    whole = VARIABLE.fullmatch(value)
    return table[whole.group(1)] if whole else VARIABLE.sub(lambda m: str(table[m.group(1)]), value)


def load_recipe(path: str, sets: dict[str, str]) -> dict:
    """The recipe with `--set` applied to its vars and every variable substituted."""
    try:
        recipe = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise HuayuError(f"{path}: cannot read recipe: {exc}") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("stages"), list) or not recipe["stages"]:
        raise HuayuError(f"{path}: a recipe is a mapping with a non-empty list under stages:")
    _no_unknown(recipe, TOP_KEYS, path)
    declared = dict(recipe.get("vars") or {})
    unknown = set(sets) - set(declared)
    if unknown:
        raise HuayuError(f"--set {', '.join(sorted(unknown))}: not a variable of {path} "
                         f"(its vars: {', '.join(declared) or 'none'})")
    table: dict = {}
    for name, value in {**declared, **sets}.items():  # a variable may use the ones above it
        table[name] = substitute(value, table, f"{path}: vars.{name}")
    resolved = {k: substitute(v, table, f"{path}: {k}") for k, v in recipe.items() if k not in ("vars", "stages")}
    resolved = {"vars": table, "out": f"out/{Path(path).stem}", **resolved, "stages": []}
    for i, spec in enumerate(recipe["stages"]):
        spec = substitute(spec, table, f"{path}: stage {i + 1}")
        _check_stage(spec, f"{path}: stage {i + 1}", {s["name"] for s in resolved["stages"]})
        table[f"{spec['name']}.out"] = str(stage_output(str(resolved["out"]), spec))
        resolved["stages"].append(spec)
    return resolved


def _no_unknown(mapping: dict, known: set, where: str) -> None:
    extra = set(mapping) - known
    if extra:
        raise HuayuError(f"{where}: unknown key(s) {', '.join(sorted(extra))} (known: {', '.join(sorted(known))})")


def _check_stage(spec, where: str, taken: set[str]) -> None:
    if not isinstance(spec, dict) or spec.get("command") not in STAGE_KEYS:
        raise HuayuError(f"{where}: a stage is a mapping with name, args and a command: {', '.join(STAGE_KEYS)}")
    _no_unknown(spec, STAGE_KEYS[spec["command"]], f"{where} ({spec['command']})")
    name = spec.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name) or name in taken:
        raise HuayuError(f"{where}: name must be a directory name (letters, digits, _ . -) no other stage has, "
                         f"got {name!r}")
    if not all(isinstance(spec.get(k) or {}, dict) for k in ("args", "eval")):
        raise HuayuError(f"{where} ({name}): args and eval are mappings of the command's options")
    owned = {"out", "resume"} & set(spec.get("args") or {})  # the runner sets these
    if owned:
        raise HuayuError(f"{where} ({name}): remove args.{', args.'.join(sorted(owned))}: the recipe sets it")


def stage_output(root: str, spec: dict) -> Path:
    """A training stage's model directory, or the file (or directory) a data stage writes."""
    out = Path(root) / spec["name"]
    default = "tokenizer" if spec["command"] == TOKENIZER else "data.jsonl"
    return out if spec["command"] in TRAINING else out / spec.get("output", default)


def flags(args: dict) -> list[str]:
    """`key: value` -> `--key value` (dashes for underscores unless the key is dotted, like
    `train.lr`); lists give several values, mappings `k=v,...`, true a bare flag (which both
    huayu's config flags and plain switches accept), false `--key false`; null leaves it out."""
    argv = []
    for key, value in args.items():
        if value is None:
            continue
        flag = f"--{key}" if "." in key else f"--{key.replace('_', '-')}"
        if value is True:
            argv.append(flag)
        elif isinstance(value, dict):
            argv += [flag, ",".join(f"{k}={v}" for k, v in value.items())]
        else:
            values = value if isinstance(value, list) else [value]
            argv += [flag, *("false" if v is False else str(v) for v in values)]
    return argv


def _as_list(value) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, ensure_ascii=False).encode()).hexdigest()[:16]


def plan(recipe: dict) -> list[Stage]:
    """Each stage's command line: a training stage starts from the previous training stage's
    output (the first from the recipe's model and tokenizer) and replays earlier stages' data."""
    model, tokenizer, seen_data, chain, stages = recipe.get("model"), recipe.get("tokenizer"), [], "", []
    for spec in recipe["stages"]:
        out, args = stage_output(recipe["out"], spec), dict(spec.get("args") or {})
        positional = [] if spec["command"] in TRAINING else [str(p) for p in _as_list(spec.get("input"))]
        if spec["command"] in TRAINING:
            args = _training_args(spec, args, model, tokenizer, seen_data)
            model, tokenizer = str(out), None
            seen_data += [str(p) for p in _as_list(args.get("data"))]
        elif spec["command"] == TOKENIZER:
            tokenizer = str(out)
        argv = [*spec["command"].split(), *positional, *flags({**args, "out": str(out)})]
        chain = _digest([argv, chain])
        eval_argv = ["eval", str(out), "--out", str(out / "eval"), *flags(spec["eval"])] if spec.get("eval") else None
        stages.append(Stage(spec["name"], spec["command"], out if spec["command"] in TRAINING else out.parent,
                            argv, chain, eval_argv, eval_argv and _digest(eval_argv)))
    return stages


def _training_args(spec: dict, args: dict, model, tokenizer, seen_data: list[str]) -> dict:
    if model is None and "model" not in args:
        raise HuayuError(f"stage {spec['name']}: no model to start from: set model: at the top of the recipe")
    start = {"model": model, **({"tokenizer": tokenizer} if tokenizer else {})}
    if "replay_ratio" not in spec:
        return {**start, **args}
    if not seen_data or "replay_data" in args:
        raise HuayuError(f"stage {spec['name']}: replay_ratio replays the earlier training stages' data, so it "
                         "needs an earlier training stage and no args.replay_data of its own")
    return {**start, **args, "replay_data": list(seen_data), "replay_ratio": spec["replay_ratio"]}


def _marker(stage: Stage) -> dict | None:
    path = stage.out / MARKER
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def check_markers(stages: list[Stage]) -> None:
    """Refuse, before anything runs, a finished stage whose command line (or an earlier one) changed."""
    for stage in stages:
        marker = _marker(stage)
        if marker and marker["hash"] != stage.hash:
            raise HuayuError(
                f"stage {stage.name}: {stage.out} was made by another version of the recipe\n"
                f"  then: huayu {marker['command_line']}\n  now:  huayu {shlex.join(stage.argv)}\n"
                f"remove {stage.out} (and the stages after it, which start from it) to run it again, "
                "or give the changed stage a new name")


def check_arguments(stages: list[Stage]) -> None:
    """Parse every command line with its command's parser now, so a typo in the last stage's
    options shows before the first stage trains for hours."""
    from huayu.cli import COMMANDS as CLI, build_parser

    for stage in stages:
        for argv in filter(None, (stage.argv, stage.eval_argv)):
            name = " ".join(argv[:2]) if " ".join(argv[:2]) in CLI else argv[0]
            try:
                build_parser(name).parse_args(argv[len(name.split()):])
            except SystemExit:
                raise HuayuError(f"stage {stage.name}: bad options for huayu {name} (see above)") from None


def _call(stage: Stage, argv: list[str]) -> None:
    from huayu.cli import main

    print(f"stage {stage.name}: huayu {shlex.join(argv)}", flush=True)
    code = main(argv)  # its options were parsed already by check_arguments
    if code:
        raise HuayuError(f"stage {stage.name} failed (huayu {argv[0]} exited with {code}); fix it and run the "
                         "recipe again: the finished stages are skipped")


def execute(stage: Stage) -> None:
    """Run (or skip, or resume) one stage and its evaluation, then write its marker."""
    from huayu.train.loop import CHECKPOINTS

    marker = _marker(stage)
    if marker:
        print(f"stage {stage.name}: done, skipped")
    else:
        resume = stage.command in TRAINING and (stage.out / CHECKPOINTS).is_dir()
        if resume:
            print(f"stage {stage.name}: interrupted earlier, continuing from its checkpoints (--resume)")
        stage.out.mkdir(parents=True, exist_ok=True)
        _call(stage, stage.argv + (["--resume", "true"] if resume else []))
    if stage.eval_argv and (marker or {}).get("eval_hash") != stage.eval_hash:
        _call(stage, stage.eval_argv)
    elif marker:
        return  # nothing ran: the marker stands
    record = {"stage": stage.name, "command_line": shlex.join(stage.argv), "command": stage.argv,
              "hash": stage.hash, "eval_command": stage.eval_argv, "eval_hash": stage.eval_hash}
    tmp = stage.out / f".{MARKER}.tmp"  # written whole, then renamed: a kill never leaves half a marker
    tmp.write_text(json.dumps(record, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    tmp.replace(stage.out / MARKER)


def results(stages: list[Stage]) -> list[dict]:
    """One row per stage: its final train loss and, when it was evaluated, the eval metrics."""
    def read(path: Path) -> dict:
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}

    return [{"stage": s.name, "command": s.command, "train_loss": read(s.out / "train_result.json").get("train_loss"),
             **{col: read(s.out / "eval" / "metrics.json").get(key) if s.eval_argv else None
                for col, key in METRICS.items()}} for s in stages]


def markdown(rows: list[dict]) -> str:
    cell = lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(map(cell, r.values())) + " |" for r in rows]) + "\n"


def add_run_arguments(parser) -> None:
    parser.add_argument("recipe", help="recipe YAML (see recipes/README.md)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="VAR=VALUE",
                        help="override a variable of the recipe's vars:, e.g. --set data_root=/data")
    parser.add_argument("--dry-run", action="store_true", help="check the recipe and print the stages' commands")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def run_run(args) -> None:
    bad = [s for s in args.set if "=" not in s]
    if bad:
        raise HuayuError(f"--set expects VAR=VALUE, got {', '.join(bad)}")
    recipe = load_recipe(args.recipe, dict(s.split("=", 1) for s in args.set))
    stages = plan(recipe)
    check_output_dir(recipe["out"], "recipe run", args.overwrite)  # an earlier run of a recipe is continued
    check_markers(stages)
    check_arguments(stages)
    if args.dry_run:
        for stage in stages:
            print("\n".join(f"{stage.name}: huayu {shlex.join(a)}" for a in (stage.argv, stage.eval_argv) if a))
        return None
    out = Path(recipe["out"])
    claim_output_dir(out, "recipe run", args.overwrite)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, allow_unicode=True, sort_keys=False), encoding="utf-8")
    for stage in stages:
        execute(stage)
    rows = results(stages)
    (out / "recipe_results.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    (out / "recipe_results.md").write_text(markdown(rows), encoding="utf-8")
    print(markdown(rows), end="")
    return None
