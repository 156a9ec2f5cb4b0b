"""Configs as dataclasses: defaults in code, a YAML file as a partial override, CLI flags on top.

Every leaf field of a config tree becomes a flag `--section.field` and, when its name is unique in
the tree, the short alias `--field` (dashes or underscores). Unknown keys in YAML are errors, so a
typo never silently falls back to a default. The resolved config is written beside every output.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from huayu.errors import HuayuError


class ConfigError(HuayuError, ValueError):
    """A config file or override that does not fit the schema."""


def field_doc(help: str, **kwargs) -> Any:
    """A dataclass field whose help text is shown by `--help`."""
    metadata = {"help": help}
    if kwargs.pop("positional", False):
        metadata["positional"] = True
    if "aliases" in kwargs:  # further flags for the field, e.g. finetune-cls's --train for --data
        metadata["aliases"] = tuple(kwargs.pop("aliases"))
    if "default_factory" in kwargs:
        return dataclasses.field(default_factory=kwargs.pop("default_factory"), metadata=metadata)
    return dataclasses.field(default=kwargs.pop("default", None), metadata=metadata)


def _field_default(f, parent=None):
    """A field's default: its value in `parent` (the enclosing field's default instance, e.g. chat's
    sampling DecodingArgs) when given, else its own default or default factory."""
    if parent is not None:
        return getattr(parent, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _leaves(cls, prefix: str = "", parent=None):
    """Yield (dotted name, field, python type, default) for every non-dataclass field of `cls`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaves(tp, f"{prefix}{f.name}.", _field_default(f, parent))
        else:
            yield f"{prefix}{f.name}", f, tp, _field_default(f, parent)


def _base_type(tp):
    """Strip Optional[...] and return (base type, origin args)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return tp


def _str2bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _convert(name: str, tp, value):
    """Coerce a YAML or CLI value to the field's type, with an error naming the field."""
    if value is None:
        return None
    base = _base_type(tp)
    origin = typing.get_origin(base)
    try:
        if base is bool:
            return value if isinstance(value, bool) else _str2bool(value)
        if base in (int, float, str):
            if base is int and isinstance(value, float) and not value.is_integer():
                raise ValueError("not an integer")
            return base(value)
        if origin is list:
            (item,) = typing.get_args(base) or (str,)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v != ""]
            return [_convert(name, item, v) for v in value]
        if origin is dict:
            if isinstance(value, str):  # "a=b,c=d"
                value = dict(kv.split("=", 1) for kv in value.split(",") if kv)
            return {str(k): str(v) for k, v in dict(value).items()}
    except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
        raise ConfigError(f"config key '{name}': cannot read {value!r} as {base}: {exc}") from None
    return value


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add `--config` and one flag per leaf field of `cls` to `parser`."""
    parser.add_argument("--config", metavar="YAML", help="YAML file overriding the defaults")
    leaves = list(_leaves(cls))
    short_counts: dict[str, int] = {}
    for name, *_ in leaves:
        short = name.rsplit(".", 1)[-1]
        short_counts[short] = short_counts.get(short, 0) + 1
    for name, f, tp, default in leaves:
        help_text = f.metadata.get("help", "")
        if "(default" not in help_text:
            help_text = f"{help_text} (default: {default!r})"
        if f.metadata.get("positional"):
            many = typing.get_origin(_base_type(tp)) is list
            parser.add_argument(name, nargs="*" if many else "?", default=argparse.SUPPRESS, help=help_text)
            continue
        short = name.rsplit(".", 1)[-1]
        # the dashed short form first (what usage lines show), the full dotted name as an alias
        flags = [f"--{(short if short_counts[short] == 1 else name).replace('_', '-')}", f"--{name}"]
        flags = list(dict.fromkeys(flags + list(f.metadata.get("aliases", ()))))
        kwargs: dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS, help=help_text,
                                      metavar=short.upper())
        if _base_type(tp) is bool:
            kwargs.update(nargs="?", const=True, type=_str2bool, metavar="BOOL")
        elif typing.get_origin(_base_type(tp)) is list:
            kwargs.update(nargs="+")
        parser.add_argument(*flags, **kwargs)


def _nested_set(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def build_config(cls, overrides: dict, source: str = "config", base=None):
    """Build `cls` from a nested dict of overrides on top of `base` (default: the class defaults;
    a nested section starts from its field's default, e.g. chat's sampling DecodingArgs, so an
    override changes only what it names); unknown keys raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in (overrides or {}).items():
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{key}' (known: {', '.join(names)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{key}' must be a mapping")
            kwargs[key] = build_config(tp, value, f"{source}: {key}", _field_default(names[key], base))
        else:
            kwargs[key] = _convert(key, tp, value)
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def _yaml_tree(args: argparse.Namespace) -> dict:
    """The `--config` file's mapping ({} without one)."""
    yaml_path = getattr(args, "config", None)
    if not yaml_path:
        return {}
    try:
        loaded = yaml.safe_load(Path(yaml_path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{yaml_path}: cannot read config: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{yaml_path}: a config file must be a mapping")
    return loaded


def given_options(args: argparse.Namespace) -> set[str]:
    """The dotted names of the options the user set, by flag or in the `--config` file; the rest
    are defaults, which a command may take from elsewhere (e.g. the model's generation config)."""
    def names(tree: dict, prefix: str = "") -> set[str]:
        return {n for k, v in tree.items() for n in (names(v, f"{prefix}{k}.") if isinstance(v, dict)
                                                      else {f"{prefix}{k}"})}

    return {n for n in vars(args) if n != "config"} | names(_yaml_tree(args))  # argparse keeps only flags given


def config_from_args(cls, args: argparse.Namespace):
    """Resolve defaults <- YAML (`--config`) <- CLI flags into an instance of `cls`."""
    tree = _yaml_tree(args)
    yaml_path = getattr(args, "config", None)
    for name, *_ in _leaves(cls):
        if hasattr(args, name):
            _nested_set(tree, name, getattr(args, name))
    return build_config(cls, tree, source=yaml_path or "config")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), allow_unicode=True, sort_keys=False), encoding="utf-8")
    tmp.replace(path)
