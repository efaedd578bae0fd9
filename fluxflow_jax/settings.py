"""Config keys declared once: a dataclass field carries its key's default, check, help text
and command-line flag, and the config reader's checks, the flags (``--help`` included) and
the key and flag tables of the docs are derived from it.

A key is declared as ``name: type = setting(default, check, help)``; the type is the field's
annotation, which also gives a flag's argparse type.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any, Callable

from fluxflow_jax.checks import Check

_KEY = "setting"


@dataclasses.dataclass(frozen=True)
class Setting:
    """What a field declares besides its type and default."""

    check: Check | None  # None: the reader handles the key itself
    help: str  # markdown: the docs' "meaning" column, plain text in --help
    flag: bool | str = False  # True: a flag named as the key; a string: that flag name
    aliases: tuple[str, ...] = ()  # older names, in the file and (with a flag) as flags
    default_text: str | None = None  # the docs' default column, where the value says little
    key: str | None = None  # the config key, where it differs from the field name


def setting(default: Any, check: Check | None, help: str, *, flag: bool | str = False,
            aliases: tuple[str, ...] = (), default_text: str | None = None,
            key: str | None = None) -> Any:
    """A dataclass field declaring one config key (see the module docstring)."""
    metadata = {_KEY: Setting(check, help, flag, aliases, default_text, key)}
    if isinstance(default, dict):  # a mutable default needs a factory
        return dataclasses.field(default_factory=lambda: dict(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Key:
    """One declared key of a config class."""

    name: str  # in the config
    field: str  # of the dataclass
    type: Any
    default: Any
    setting: Setting


def keys_of(cls: type) -> Iterator[Key]:
    """The keys ``cls`` declares, in field order."""
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        declared = item.metadata.get(_KEY)
        if declared is None:
            continue
        default = (item.default_factory() if item.default is dataclasses.MISSING
                   else item.default)
        yield Key(declared.key or item.name, item.name, hints[item.name], default, declared)


def checks_of(cls: type) -> dict[str, Check]:
    """key -> check, of the keys the reader checks one by one."""
    return {key.name: key.setting.check for key in keys_of(cls) if key.setting.check}


def field_checks(cls: type) -> dict[str, Check]:
    """field -> check, for ``checks.field_problems`` on an instance."""
    return {key.field: key.setting.check for key in keys_of(cls) if key.setting.check}


def aliases_of(cls: type) -> dict[str, str]:
    """alias -> key."""
    return {alias: key.name for key in keys_of(cls) for alias in key.setting.aliases}


# ----------------------------------------------------------------------------- flags

@dataclasses.dataclass(frozen=True)
class Flag:
    """A command-line flag setting ``section.key`` (``key`` empty: the section itself)."""

    name: str
    section: str
    key: str
    kind: Any  # a type, "flag" (store_true) or (type, "+") for a list
    help: str  # markdown

    @property
    def usage(self) -> str:
        """How it is given, e.g. ``--img_size VALUE``."""
        value = ("" if self.kind == "flag" else f" {METAVAR} [{METAVAR} ...]"
                 if isinstance(self.kind, tuple) else f" {METAVAR}")
        return f"--{self.name}{value}"


METAVAR = "VALUE"


def flags_of(section: str, cls: type) -> list[Flag]:
    """The flags of ``cls``'s keys, each alias of a key with a flag being one too."""
    out = []
    for key in keys_of(cls):
        flag = key.setting.flag
        if not flag:
            continue
        name = key.name if flag is True else flag
        kind = argparse_kind(key.type)
        out.append(Flag(name, section, key.name, kind, key.setting.help))
        out.extend(Flag(alias, section, key.name, kind, f"old name of `--{name}`")
                   for alias in key.setting.aliases if alias != name)
    return out


def flag_table(flags: list[Flag] | tuple[Flag, ...], anchors_in: str) -> str:
    """The markdown table ``| flag | sets | meaning |`` of ``flags``, for another page than
    ``anchors_in``, the one the helps' ``(#anchor)`` links point into."""
    rows = ["| flag | sets | meaning |", "|---|---|---|"]
    for flag in flags:
        target = f"`{flag.section}.{flag.key}`" if flag.key else f"top-level `{flag.section}`"
        meaning = flag.help.replace("](#", f"]({anchors_in}#")
        rows.append(f"| `{flag.usage}` | {target} | {meaning} |")
    return "\n".join(rows)


def argparse_kind(annotation: Any) -> Any:
    """The argparse type of a field annotation: bool is a switch, a tuple a list."""
    annotation = _without_none(annotation)
    if annotation is bool:
        return "flag"
    if typing.get_origin(annotation) is tuple:
        return (_item_type(typing.get_args(annotation)[0]), "+")
    return annotation


def _without_none(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return args[0] if len(args) == 1 else typing.Union[tuple(args)]
    return annotation


def _item_type(annotation: Any) -> Callable[[str], Any]:
    """A list item's parser; ``int | str``: an integer when the text is digits."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return _int_or_text
    return annotation


def _int_or_text(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def plain(markdown: str) -> str:
    """Help text for ``--help``: links and code marks dropped, ``%`` kept literal."""
    text = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", markdown).replace("`", "")
    return text.replace("%", "%%")


# ----------------------------------------------------------------------------- docs

def key_table(cls: type | None, extra: Mapping[str, str] = {}) -> str:
    """The markdown table of ``cls``'s keys (``| key | default | meaning |``); ``extra``:
    key -> meaning of keys the reader takes without a field (their default: null)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key in keys_of(cls) if cls else ():
        meaning = key.setting.help + "".join(f" (alias `{alias}`)"
                                             for alias in key.setting.aliases)
        shown = key.setting.default_text or default_text(key.default)
        rows.append(f"| `{key.name}` | {shown} | {meaning} |")
    rows.extend(f"| `{name}` | null | {meaning} |" for name, meaning in extra.items())
    return "\n".join(rows)


def default_text(value: Any) -> str:
    """A default as the docs write it: YAML words, code-marked strings, lists in brackets."""
    if value is None or isinstance(value, (bool, tuple, list, dict)):
        return json.dumps(value)
    if isinstance(value, str):
        return f"`{value}`" if value else '""'
    if isinstance(value, float):
        mantissa, exponent = f"{value:.0e}".split("e")
        short = f"{mantissa}e{int(exponent)}"  # 5e-4 rather than 0.0005
        if float(short) == value and len(short) < len(repr(value)):
            return short
    return repr(value)
