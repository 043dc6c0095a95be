"""Reading params.yaml: YAML 1.2's floats, a key given twice refused (as DVC refuses it), and errors
that name the file, the problem and its line."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from mnist_cnn.core.checks import ConfigError
from mnist_cnn.core.errors import one_line


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but floats as YAML 1.2 (and every other tool) reads them.

    PyYAML implements YAML 1.1, where ``1e-3`` (no dot) is a string; users write ``lr: 1e-3``.
    A key given twice in one mapping is refused, as DVC refuses the same file (PyYAML keeps the last).
    """

    def construct_document(self, node: yaml.Node) -> Any:
        # Checked on the file's own keys, before construction: merging rewrites anchored mappings in place.
        _refuse_duplicate_keys(node, set())
        return super().construct_document(node)


def _refuse_duplicate_keys(node: yaml.Node, seen: set[int]) -> None:
    """Each mapping's keys as written (``<<`` counts too: two merges in one mapping are refused, as DVC
    refuses them); an aliased node is checked once."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = (key_node.tag, key_node.value)
                if key in first_line:
                    raise yaml.constructor.ConstructorError(
                        problem=f"duplicate key {key_node.value!r} (first on line {first_line[key]})",
                        problem_mark=key_node.start_mark,
                    )
                first_line[key] = key_node.start_mark.line + 1
            _refuse_duplicate_keys(value_node, seen)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, seen)


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path) -> Any:
    path = Path(path)
    try:
        return yaml_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a params YAML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read params file ({getattr(exc, 'strerror', None) or exc})") from None
    except yaml.YAMLError as exc:
        # PyYAML's first line is the context ("while scanning ..."); the problem and its place say more.
        problem = getattr(exc, "problem", None) or one_line(exc)
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        # An unclosed quote or bracket is found at the end of the file; where it opened says more.
        start = getattr(exc, "context_mark", None)
        if start is not None and mark is not None and start.line != mark.line and exc.context:
            where += f"; {exc.context} at line {start.line + 1} column {start.column + 1}"
        raise ConfigError(f"{path}: not valid YAML ({problem}{where})") from None
