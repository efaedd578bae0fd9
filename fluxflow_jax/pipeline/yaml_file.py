"""Reading a YAML config with the line of every key, and numbers as YAML 1.2 reads them.

PyYAML follows YAML 1.1, where ``1e-5`` (no dot) is a string; a learning rate written that
way would then fail far from the file. The loader here resolves every YAML 1.2 float form
(``1e-5``, ``.5``, ``1_000.0``) as a number. Each mapping key's line is kept, so a config
error can say ``config.yaml:12``. Aliases are followed, but a document that expands to more
than ``MAX_VALUES`` values (an alias bomb: a few lines growing to gigabytes) is refused.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

KeyPath = tuple[Any, ...]  # mapping keys and list indices from the document root

_FLOAT = re.compile(r"""^[-+]?(?:
      [0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    | \.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    | [0-9][0-9_]*[eE][-+]?[0-9]+
    | \.(?:inf|Inf|INF)
    | \.(?:nan|NaN|NAN))$""", re.X)


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


MAX_VALUES = 100_000  # far beyond any config, far below what hurts


class YamlFileError(ValueError):
    """A file that is not readable YAML; the message names the file and line."""


def read_yaml(path: str | Path) -> tuple[Any, dict[KeyPath, int]]:
    """The document in ``path`` and ``{key path: 1-based line}`` of every mapping key and
    list item."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise YamlFileError(f"cannot read config {path}: {err}") from None
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise YamlFileError(f"{where}: not valid YAML: {problem}") from None
    if node is None:
        return None, {}
    builder = _Builder(_Loader(text))
    try:
        return builder.construct(node, ()), builder.lines
    except yaml.YAMLError as err:
        raise YamlFileError(f"{path}: {err}") from None
    finally:
        builder.constructor.dispose()


_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


class _Builder:
    """Builds the document from its node tree, noting each key's line and counting values."""

    def __init__(self, constructor: _Loader):
        self.constructor, self.lines, self.values = constructor, {}, 0

    def construct(self, node: yaml.Node, path: KeyPath) -> Any:
        self.values += 1
        if self.values > MAX_VALUES:
            raise yaml.YAMLError(f"line {node.start_mark.line + 1}: the document expands to "
                                 f"more than {MAX_VALUES:,} values through its aliases (*name); "
                                 "write the values out or use fewer aliases")
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.CollectionNode) and node.tag not in _PLAIN_TAGS:
            raise yaml.YAMLError(f"line {node.start_mark.line + 1}: unsupported tag {node.tag}")
        if isinstance(node, yaml.MappingNode):
            self.constructor.flatten_mapping(node)  # merge keys (<<)
            out = {}
            for key_node, value_node in node.value:
                key = self.constructor.construct_object(key_node, deep=True)
                self.lines[path + (key,)] = key_node.start_mark.line + 1
                out[key] = self.construct(value_node, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.construct(item, path + (index,))
                    for index, item in enumerate(node.value)]
        return self.constructor.construct_object(node, deep=True)
