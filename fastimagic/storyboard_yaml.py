"""Reading a storyboard file: YAML with the line of every field, and one message per problem.

:func:`load_storyboard` reads the YAML, validates it against :mod:`fastimagic.storyboard` (the schema) and reports
every problem at once, one line each, as ``FILE:LINE FIELD.PATH: message``, raising :class:`StoryboardError`.

YAML is read with the safe loader only (``yaml.safe_load``'s constructors; tags that could build Python objects
are refused), plus one change: a number written without a dot such as ``1e-3`` is a float, as in YAML 1.2, and
not the string YAML 1.1 makes of it. Line numbers come from PyYAML's composed node tree, which also finds
duplicate keys and caps how far aliases may expand.
"""

from __future__ import annotations

import difflib
import os
import posixpath
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from fastimagic import config
from fastimagic.errors import InputError
from fastimagic.storyboard import Scene, Storyboard
from fastimagic.storyboard_values import describe_value, unknown_key

_MAX_YAML_NODES = 100_000  # anchors and aliases can make a small file expand to billions of values
_MAX_DIGITS = 40  # the longest number a storyboard needs is a seed (10 digits) or a float written out
_NUMBER_TAGS = {"tag:yaml.org,2002:int", "tag:yaml.org,2002:float"}


class StoryboardError(InputError):
    """The storyboard has problems. ``problems`` holds one ``FILE:LINE FIELD.PATH: message`` line for each."""

    def __init__(self, problems: list[str] | str):
        # Values from the file reach the messages: control characters are escaped so none can forge a line.
        self.problems = [config.printable(p) for p in ([problems] if isinstance(problems, str) else problems)]
        super().__init__("\n".join(self.problems))

    def __reduce__(self):  # keep the lines separate across pickling (orchestrators ship exceptions)
        return (type(self), (self.problems,))



# --- messages -------------------------------------------------------------------------------------------------


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if found := _model_in(arg):
            return found
    return None


def _keys_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys a person may write in the mapping at ``loc`` inside ``model``."""
    for part in loc:
        if isinstance(part, int):
            continue
        if model is Storyboard and part == "defaults":
            model = Scene
            continue
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        inner = _model_in(field.annotation) if field else None
        if inner is None:
            return []
        model = inner
    keys = [f.alias or n for n, f in model.model_fields.items()]
    return [*keys, "defaults"] if model is Storyboard else keys


def _explain(errors: list[dict], root: type[BaseModel], prefix: tuple = ()) -> list[tuple[tuple, str]]:
    """Pydantic errors as (location, sentence), leaving out 'is required' where a misspelt key already says it."""
    misspelt = set()
    for err in errors:
        if err["type"] == "extra_forbidden":
            parent = tuple(err["loc"][:-1])
            misspelt.update(
                (*parent, k) for k in difflib.get_close_matches(str(err["loc"][-1]), _keys_at(root, parent), n=1)
            )
    return [_located(e, root, prefix) for e in errors if not (e["type"] == "missing" and tuple(e["loc"]) in misspelt)]


def _located(err: dict, root: type[BaseModel], prefix: tuple = ()) -> tuple[tuple, str]:
    """One pydantic error as (location, sentence); ``root`` is the model the error's location starts from."""
    loc = tuple(err["loc"])
    if err["type"] == "invalid_key":  # the location ends with the offending key itself
        return (*prefix, *loc[:-1]), f"key {describe_value(loc[-1])} must be text; put it in quotes"
    return (*prefix, *loc), _message(err, root)


_BOUNDS = {
    "greater_than_equal": ("at least", "ge"),
    "greater_than": ("more than", "gt"),
    "less_than_equal": ("at most", "le"),
    "less_than": ("less than", "lt"),
}


def _message(err: dict, root: type[BaseModel]) -> str:
    kind, ctx, got = err["type"], err.get("ctx") or {}, describe_value(err.get("input"))
    if kind == "storyboard":
        return err["msg"]
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return unknown_key(err["loc"][-1], _keys_at(root, tuple(err["loc"][:-1])))
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be a whole number (got {got})"
    if kind in ("float_type", "float_parsing"):
        return f"must be a number (got {got})"
    if kind == "finite_number":
        return f"must be a finite number (got {got})"
    if kind == "string_type":
        hint = "; put it in quotes to mean the text" if isinstance(err.get("input"), (int, float)) else ""
        return f"must be text (got {got}){hint}"
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false (got {got})"
    if kind in _BOUNDS:
        word, key = _BOUNDS[kind]
        bound = ctx[key]
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
        return f"must be {word} {bound} (got {got})"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping of settings (got {got})"
    if kind in ("tuple_type", "list_type"):
        return f"must be a list (got {got})"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "recursion_loop":
        return "contains itself (a YAML alias inside its own anchor)"
    return err["msg"]


# --- YAML -----------------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, reading ``1e-3`` (no dot) as a float like YAML 1.2 instead of as text."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

_MERGE_TAG = "tag:yaml.org,2002:merge"
_SAFE_TAGS = {tag for tag in _Loader.yaml_constructors if tag} | {_MERGE_TAG, "tag:yaml.org,2002:value"}


def _format_path(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def _short_tag(tag: str) -> str:
    return "!!" + tag[len("tag:yaml.org,2002:") :] if tag.startswith("tag:yaml.org,2002:") else tag


class _TooBig(Exception):
    pass


class _Tree:
    """Walks the composed YAML: line of every field path, refused tags, duplicate keys."""

    def __init__(self, source: str):
        self.source = source
        self.lines: dict[tuple, int] = {}
        self.problems: list[tuple[int, str]] = []
        self.refused_tags = False
        self._seen: set[int] = set()
        self._visits = 0

    def visit(self, node: yaml.Node, path: tuple | None, on_path: frozenset = frozenset()) -> None:
        self._visits += 1
        if self._visits > _MAX_YAML_NODES:
            raise _TooBig
        if id(node) in on_path:  # a recursive alias
            return
        first = id(node) not in self._seen
        self._seen.add(id(node))
        line = node.start_mark.line + 1
        if path is not None:
            self.lines.setdefault(path, line)
        if first and node.tag not in _SAFE_TAGS:
            self.refused_tags = True
            tag = _short_tag(node.tag)
            self.problems.append((line, f"{self.source}:{line}: YAML tag '{tag}' is not allowed (plain YAML only)"))
        if first and isinstance(node, yaml.ScalarNode) and node.tag in _NUMBER_TAGS and len(node.value) > _MAX_DIGITS:
            self.refused_tags = True  # stop before construction: int() refuses 4300+ digits with a bare ValueError
            self.problems.append((line, f"{self.source}:{line}: a number of {len(node.value)} characters;"
                                        f" numbers here have at most {_MAX_DIGITS}"))
        on_path = on_path | {id(node)}
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.visit(item, None if path is None else (*path, i), on_path)
        elif isinstance(node, yaml.MappingNode):
            keys: dict[tuple[str, str], int] = {}
            merged = []
            for key, value in node.value:
                self.visit(key, None, on_path)
                if key.tag == _MERGE_TAG:
                    merged.append(value)
                    continue
                child = None
                if first and key.tag == "tag:yaml.org,2002:null":
                    self.refused_tags = True  # stop: a null key has no field name to report against
                    key_line = key.start_mark.line + 1
                    shown = key.value or "an empty key"
                    self.problems.append((key_line, f"{self.source}:{key_line}: key '{shown}' is YAML's null, not a"
                                                    " field name; write the field's name (or put it in quotes)"))
                    continue
                if isinstance(key, yaml.ScalarNode):
                    child = None if path is None else (*path, key.value)
                    key_line = key.start_mark.line + 1
                    if child is not None:
                        self.lines.setdefault(child, key_line)
                    if first and (key.tag, key.value) in keys:
                        where = _format_path(child) if child else key.value
                        self.problems.append(
                            (
                                key_line,
                                f"{self.source}:{key_line} {where}: duplicate key '{key.value}'"
                                f" (first at line {keys[key.tag, key.value]})",
                            )
                        )
                    keys.setdefault((key.tag, key.value), key_line)
                self.visit(value, child, on_path)
            for value in merged:  # merged keys count only where the mapping does not set them itself
                for part in value.value if isinstance(value, yaml.SequenceNode) else [value]:
                    self.visit(part, path, on_path)

    def line_of(self, loc: tuple) -> int:
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.lines:
                return self.lines[loc[:n]]
        return 1


def _yaml_problem(source: str, text: str, err: yaml.YAMLError) -> tuple[int, str]:
    if isinstance(err, yaml.MarkedYAMLError) and (err.problem_mark or err.context_mark):
        mark = err.problem_mark or err.context_mark
        what = err.problem or err.context or "not valid YAML"
        if err.problem and err.context:
            where = f" at line {err.context_mark.line + 1}" if err.context_mark else ""
            what = f"{err.problem} ({err.context}{where})"
        line = mark.line + 1
    else:
        position = getattr(err, "position", None)
        line = text[:position].count("\n") + 1 if isinstance(position, int) else 1
        what = str(err).splitlines()[0] if str(err) else "not valid YAML"
    return line, f"{source}:{line}: YAML syntax error: {what}"


def _parse(
    text: str, source: str, empty: str = "the storyboard is empty; it needs name, reference and scenes"
) -> tuple[Any, _Tree | None, list[tuple[int, str]]]:
    """YAML text -> (data, the walked node tree, problems). Data is None when the problems stop validation.
    ``empty``: what to say about a file with no YAML document."""
    try:
        loader = _Loader(text)  # checks the characters already
    except yaml.YAMLError as e:
        return None, None, [_yaml_problem(source, text, e)]
    try:
        root = loader.get_single_node()
        if root is None:
            return None, None, [(1, f"{source}:1: {empty}")]
        tree = _Tree(source)
        try:
            tree.visit(root, ())
        except _TooBig:
            if "*" in text:
                message = f"expands to more than {_MAX_YAML_NODES} values through aliases; write it out plainly"
            else:
                message = f"has more than {_MAX_YAML_NODES} values; a storyboard needs far fewer"
            return None, None, [(1, f"{source}:1: {message}")]
        if tree.refused_tags:
            return None, tree, tree.problems
        return loader.construct_document(root), tree, tree.problems
    except yaml.YAMLError as e:
        return None, None, [_yaml_problem(source, text, e)]
    except RecursionError:
        return None, None, [(1, f"{source}:1: the YAML is nested too deeply")]
    finally:
        loader.dispose()


def _folder_of(source: str) -> str:
    if source.startswith("s3://"):
        bucket, key = config.split_s3(source)
        folder = posixpath.dirname(key)
        return f"s3://{bucket}/{folder}" if folder else f"s3://{bucket}"
    return os.path.dirname(os.path.abspath(os.path.expanduser(source)))


def decode_storyboard(data: bytes, source: str) -> str:
    """Storyboard bytes as text: UTF-8, a BOM allowed; anything else is a :class:`StoryboardError` that says what
    the file is and how to fix it."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") or (len(data) > 1 and b"\x00" in data[:2]):
        raise StoryboardError([f"{source}: UTF-16 text; save the storyboard as UTF-8"])
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise StoryboardError([f"{source}: not UTF-8 text (bad byte at offset {e.start}); save it as UTF-8"]) from None


def load_storyboard(
    path: str | os.PathLike, *, text: str | None = None, overrides: Mapping[str, Any] | None = None,
    caps: Any = None,
) -> Storyboard:
    """Read and validate a storyboard; raise :class:`StoryboardError` listing every problem found.

    ``path`` is a local file, or (with ``text``) any name, typically the ``s3://`` URI the text was fetched from:
    it names the file in messages and relative paths resolve against its folder (local or s3). ``text``: the YAML
    itself, when the caller already has it. ``overrides``: top-level fields that replace the file's (a CLI's
    ``--output``, say; make relative paths absolute first, or they resolve against the storyboard's folder).
    ``source_text`` stays the file as written. Nothing is downloaded and no referenced file is opened here.
    ``caps``: an operator policy's :class:`~fastimagic.policy.Caps`, applied to seeds and keyframes while they are
    counted, before any is made (a storyboard's own max_seeds / max_keyframes cannot raise them).
    """
    source = os.fspath(path)
    try:
        base = _folder_of(source)
    except ValueError as e:
        raise StoryboardError([f"{source}: {e}"]) from None
    if text is None:
        if source.startswith("s3://"):
            raise StoryboardError([f"{source}: fetch the text first and pass it as text=; only local files are read"])
        from fastimagic.store import StoreError, read_local

        try:
            data = read_local(Path(source).expanduser(), max_bytes=config.DEFAULT_MAX_STORYBOARD_BYTES, shown=source)
        except StoreError as e:
            reason = str(e).removeprefix(f"{source}: ")
            raise StoryboardError([f"{config.printable(source)}: cannot read the storyboard: {reason}"]) from None
        text = decode_storyboard(data, source)

    data, tree, problems = _parse(text, source)
    board = None
    if tree is not None and not tree.refused_tags:
        if not isinstance(data, dict):
            got = describe_value(data)
            problems.append((1, f"{source}:1: the storyboard must be a mapping of settings (got {got})"))
        else:
            overrides = dict(overrides or {})
            try:
                limits = {"seeds": caps.seeds, "keyframes": caps.keyframes} if caps is not None else {}
                board = Storyboard.model_validate({**data, **overrides}, context={"base": base, "caps": limits})
            except ValidationError as e:
                for loc, message in _explain(e.errors(), Storyboard):
                    line, where = tree.line_of(loc), _format_path(loc)
                    if loc and loc[0] in overrides:  # not the file's fault: no line to point at
                        problems.append((0, f"{source}: overridden {where}: {message}"))
                    else:
                        problems.append((line, f"{source}:{line}{' ' + where if where else ''}: {message}"))
    if problems or board is None:
        ordered = [message for _, message in sorted(problems, key=lambda p: p[0])]
        raise StoryboardError(list(dict.fromkeys(ordered)))
    board._source = source
    board._source_text = text
    board._lines = dict(tree.lines) if tree is not None else {}
    board._overrides = dict(overrides or {})
    return board
