"""``load_policies``: a policy file (YAML) into a ``PolicySet``, or an error that says where.

The YAML is read with ``yaml.safe_load`` (no object construction), then
validated by the models in ``settings``. For the error message the same text
is composed into YAML nodes, which know their lines, so a bad value is
reported as ``policies.yaml:12: payments.retry.max_attempts: ...``. A key
written twice in one mapping is refused too: YAML would silently keep the
last one. Merge keys (``<<: *defaults``) work as YAML defines them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from wirework.errors import ConfigurationError
from wirework.resilience.settings import PolicySet, TargetPolicies

_TEXT_ORIGIN = "<policies>"
_MERGE_TAG = "tag:yaml.org,2002:merge"


def load_policies(source: str | os.PathLike[str]) -> PolicySet:
    """Read a policy file, or policy YAML given as text.

    Args:
        source: a path (``Path``, or a one-line string ending in ``.yaml`` or
            ``.yml``), or else the YAML text itself.

    Raises:
        ConfigurationError: the file cannot be read, is not YAML, or breaks the
            schema; the message names the file, the line and the field.
    """
    text, origin = _read(source)
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{origin}:{mark.line + 1}" if mark is not None else origin
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigurationError(f"{where}: not valid YAML: {problem}") from exc
    if data is None:
        return PolicySet({})
    if not isinstance(data, dict):
        raise ConfigurationError(
            f"{origin}:1: the top level must map target names to their policies "
            f"(e.g. `payments:` then `timeout: 2`), not a {type(data).__name__}"
        )
    if root is not None:
        _refuse_duplicate_keys(root, origin, ())
    try:
        return PolicySet.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(error, root, origin) for error in exc.errors()]
        raise ConfigurationError("\n".join(problems)) from None


def _read(source: str | os.PathLike[str]) -> tuple[str, str]:
    if isinstance(source, str) and not (
        "\n" not in source and source.strip().endswith((".yaml", ".yml"))
    ):
        return source, _TEXT_ORIGIN
    path = Path(source)
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except FileNotFoundError:
        raise ConfigurationError(f"{path}: no such policy file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{path}: cannot read the policy file: {exc}") from exc


def _refuse_duplicate_keys(node: yaml.Node, origin: str, path: tuple[str, ...]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            if key.tag == _MERGE_TAG or not isinstance(key, yaml.ScalarNode):
                continue
            line = key.start_mark.line + 1
            if key.value in seen:
                field = ".".join((*path, key.value))
                raise ConfigurationError(
                    f"{origin}:{line}: {field}: written twice (first at line "
                    f"{seen[key.value]}); YAML would keep only this one, so remove one"
                )
            seen[key.value] = line
            _refuse_duplicate_keys(value, origin, (*path, str(key.value)))
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, origin, path)


def _describe(error: Any, root: yaml.Node | None, origin: str) -> str:
    loc: tuple[int | str, ...] = error["loc"]
    is_key = bool(loc) and loc[-1] == "[key]"
    names = tuple(str(part) for part in loc if part != "[key]")
    field = ".".join(names) or "(top level)"
    line = _line_of(root, names)
    where = f"{origin}:{line}" if line is not None else origin
    kind = error["type"]
    if is_key:
        message = (
            f"{names[-1]!r} is not a valid target name (letters, digits, '_', '.', '-', "
            f"starting with a letter or digit)"
        )
    elif kind == "extra_forbidden":
        known = _known_fields(names[1:-1])
        message = f"unknown field {names[-1]!r}; the fields here are: {', '.join(known)}"
    else:
        message = error["msg"]
        if kind != "missing" and not kind.startswith(("value_error", "assertion_error")):
            message += f" (got {_short(error['input'])})"
    return f"{where}: {field}: {message}"


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _line_of(root: yaml.Node | None, names: tuple[str, ...]) -> int | None:
    """The line of the deepest key along ``names`` that the YAML spells out (1-based)."""
    if root is None:
        return None
    node, line = root, root.start_mark.line + 1
    for name in names:
        if not isinstance(node, yaml.MappingNode):
            break
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == name:
                node, line = value, key.start_mark.line + 1
                break
        else:
            break
    return line


def _known_fields(names: tuple[str, ...]) -> list[str]:
    """The fields of the model found by following ``names`` down from ``TargetPolicies``."""
    model: type[BaseModel] = TargetPolicies
    for name in names:
        info = model.model_fields.get(name)
        inner = _model_in(info.annotation) if info is not None else None
        if inner is None:
            break
        model = inner
    return list(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):  # X | None
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None
