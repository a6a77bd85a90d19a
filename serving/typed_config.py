"""Turns a pydantic ValidationError into one sentence that names the key, the file, the line and the fix.

Every typed config of the project (the dataset spec, the environment files, sandbox settings, Beam
profiles, the proxy's settings) is a pydantic model; this module is the one place that words their
errors, so every config reports a mistake the same way: `<source>: <key.path>: <why>`.
It needs only pydantic (and PyYAML for line numbers), so the proxy's small image can use it.
"""

import typing
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import PydanticCustomError

Loc = Tuple[Any, ...]

_TYPE_NAMES = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str",
               "list_type": "list", "tuple_type": "list"}
# Text read as a value (environment variables): the words it may be.
_PARSING = {"bool_parsing": "true or false (1/0, yes/no, on/off)", "int_parsing": "a whole number",
            "int_from_float": "a whole number", "float_parsing": "a number"}
_MAPPING_TYPES = ("dict_type", "model_type", "model_attributes_type")


class StrictConfig(BaseModel):
    """The base of every typed config: unknown keys refused, no silent coercion ("1" is not 1, true is not 1)."""
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_absent(cls, raw: Any) -> Any:
        # `key:` with no value in YAML is None: treat it like the key left out (its default applies).
        return {k: v for k, v in raw.items() if v is not None} if isinstance(raw, dict) else raw


def at(key: str, message: str) -> PydanticCustomError:
    """An error a validator raises about one of its model's keys (dotted, e.g. 'missing.fill')."""
    # pydantic-core fills only {name} placeholders named in the context ({key} here) and leaves other
    # braces as they are, so a message may show {SPAN} or a JSON example unescaped.
    return PydanticCustomError("at", message, {"key": key})


def key_path(loc: Iterable[Any]) -> str:
    """('features', 'fare', 'type') -> 'features.fare.type'; list indices as [i]."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _bare(node: Any) -> Any:
    """Optional[X] and Annotated[X, ...] -> X."""
    while typing.get_origin(node) is typing.Annotated or (
            typing.get_origin(node) is typing.Union and type(None) in typing.get_args(node)):
        node = next(a for a in typing.get_args(node) if a is not type(None))
    return node


def _allowed_keys(model: type, loc: Loc) -> Optional[Iterable[str]]:
    """The keys the model accepts at `loc` (the parent of an unknown key), walking fields and containers."""
    node: Any = model
    for part in loc:
        node = _bare(node)
        origin, args = typing.get_origin(node), typing.get_args(node)
        if origin in (dict, list, tuple) and args:  # `part` is a key or an index into the container
            node = args[1] if origin is dict else args[0]
        elif isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(part) or next(
                (f for f in node.model_fields.values() if f.alias == part), None)
            if field is None:
                return None
            node = field.annotation
        else:
            return None
    node = _bare(node)
    if isinstance(node, type) and issubclass(node, BaseModel):
        return sorted(f.alias or n for n, f in node.model_fields.items())
    return None


def describe(error: ValidationError, model: type, source: str,
             lines: Optional[Mapping[Loc, int]] = None, prefix: Loc = ()) -> str:
    """The first error as '<source>: <key>: <why>' (and '(<source>:<line>)' where the YAML loader recorded it).

    `prefix` is where the validated block sits in its file (e.g. ('monitoring',)).
    """
    first = error.errors(include_url=False)[0]
    loc, kind, value, ctx = tuple(first["loc"]), first["type"], first.get("input"), first.get("ctx") or {}
    if kind == "at":
        loc += tuple(int(k) if k.isdigit() else k for k in ctx["key"].split(".") if k)
        why = first["msg"]
    elif kind == "missing":
        why = "is required"
    elif kind == "extra_forbidden":
        allowed = _allowed_keys(model, loc[:-1])
        why = f"unknown key (allowed: {', '.join(allowed)})" if allowed else "unknown key"
    elif kind == "literal_error":
        why = f"'{value}' is not one of {ctx['expected'].replace(chr(39), '')}"
    elif kind in ("greater_than", "greater_than_equal") and ctx.get("gt") == 0:
        why = f"must be positive, got {value!r}"
    elif kind == "greater_than_equal":
        why = f"must be at least {ctx['ge']:g}, got {value!r}"
    elif kind in ("less_than_equal", "less_than"):
        why = f"must be at most {ctx.get('le', ctx.get('lt')):g}, got {value!r}"
    elif kind in _PARSING:
        why = f"must be {_PARSING[kind]}, got {value!r}"
    elif kind == "json_invalid":
        why = f"not valid JSON ({ctx.get('error')}): {value!r}"
    elif kind == "string_pattern_mismatch":
        why = f"must match {ctx['pattern']}, got {value!r}"
    elif kind == "string_too_short":
        why = "must not be empty"
    elif kind == "finite_number":
        why = f"must be a finite number, got {value!r}"
    elif kind in _MAPPING_TYPES:
        why = f"must be a mapping, got {type(value).__name__}"
    elif kind in _TYPE_NAMES:
        why = f"must be {_TYPE_NAMES[kind]}, got {type(value).__name__} ({value!r})"
    elif kind == "value_error":
        why = str(ctx.get("error", first["msg"]))
    else:
        why = first["msg"]
    loc = tuple(prefix) + loc
    where = _line(lines, loc) if lines else None
    suffix = f" ({source}:{where})" if where else ""
    return f"{source + ': ' if source else ''}{key_path(loc) or '<top level>'}: {why}{suffix}"


def _line(lines: Mapping[Loc, int], loc: Loc) -> Optional[int]:
    for end in range(len(loc), 0, -1):  # the key itself, else the nearest parent the file has
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def yaml_with_lines(text: str) -> Tuple[Any, Dict[Loc, int]]:
    """Parses YAML (safe) and records the 1-based line of every key and list item by its path."""
    import yaml

    lines: Dict[Loc, int] = {}

    def walk(node, loc: Loc):
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (key_node.value,)
                lines[loc + key] = key_node.start_mark.line + 1
                walk(value_node, loc + key)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[loc + (i,)] = item.start_mark.line + 1
                walk(item, loc + (i,))

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        walk(root, ())
    return yaml.safe_load(text), lines
