"""The configuration reference, generated from the schema so it cannot drift from the code.

The schema is the dataclasses of ``mopd_ray/config.py`` and the section modules it re-exports (``MOPDConfig`` and
what it holds). Each option's
description is the comment the code gives it: the ``# ...`` at the end of the field's line, or the comment
lines right above it, read from the module's source with ``ast`` and ``tokenize``. An open mapping whose
comment says ``name -> SomeConfig`` (``teachers.models``, ``teachers.pools``) is documented as that
dataclass under ``KEY.NAME``. The docs site builds its page with this module (docs/hooks/config_reference.py);
``python -m mopd_ray.config_reference`` prints the same Markdown.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import tokenize
import typing
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from . import config as schema

# an open mapping's comment names the dataclass of its entries: "name -> TeacherConfig"
_ENTRY_CLASS = re.compile(r"->\s*([A-Z]\w*Config)\b")
# the config groups of the root: the first segment of every key
ROOTS = tuple(f.name for f in dataclasses.fields(schema.MOPDConfig))


@dataclass(frozen=True)
class Option:
    key: str  # full key, with NAME / [i] where the user picks the name or index
    name: str  # the field's name in its dataclass
    type: str  # the annotation as written in config.py
    default: str  # the schema default, rendered
    description: str  # from the field's comments (empty when it has none)


@dataclass(frozen=True)
class Section:
    key: str  # the section's prefix, e.g. "learner" or "teachers.models.NAME"
    schema: type  # the dataclass
    doc: str  # the dataclass's docstring
    options: tuple  # Option, in field order


# the modules of the schema: mopd_ray/config.py and the sections it re-exports
SCHEMA_MODULES = (schema.__name__, "mopd_ray.config_base", "mopd_ray.config_teachers", "mopd_ray.config_demo")


def config_dataclasses() -> list:
    """Every dataclass of the schema's modules (SCHEMA_MODULES), module by module in source order."""
    found = [obj for _, obj in inspect.getmembers(schema, inspect.isclass)
             if dataclasses.is_dataclass(obj) and obj.__module__ in SCHEMA_MODULES]
    return sorted(found, key=lambda c: (SCHEMA_MODULES.index(c.__module__), inspect.getsourcelines(c)[1]))


@lru_cache(maxsize=None)
def _comments_by_line(path: str) -> tuple:
    """(comment text by line, lines holding only a comment) of a source file."""
    source = Path(path).read_text()
    text, alone = {}, set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text[tok.start[0]] = tok.string.lstrip("#").strip()
            if not tok.line[:tok.start[1]].strip():
                alone.add(tok.start[0])
    return text, frozenset(alone)


def field_comments(cls) -> dict:
    """Field name -> its description: the comment lines right above the field, then its trailing comment."""
    path = inspect.getsourcefile(cls)
    text, alone = _comments_by_line(path)
    tree = ast.parse(Path(path).read_text())
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    out = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above, line = [], stmt.lineno - 1
        while line in alone:
            above.insert(0, text[line])
            line -= 1
        trailing = [text[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in text and n not in alone]
        out[stmt.target.id] = " ".join(above + trailing).strip()
    return out


def field_types(cls) -> dict:
    """Field name -> its annotation as written in the source."""
    tree = ast.parse(inspect.getsource(cls))
    return {s.target.id: ast.unparse(s.annotation) for s in tree.body[0].body
            if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}


def _default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return MISSING


def _nested_class(cls, f: dataclasses.Field, comment: str):
    """(dataclass, suffix) when the field holds a section: a dataclass, a list of them, or an open mapping
    whose comment names its entries' dataclass; else (None, None)."""
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if dataclasses.is_dataclass(hint):
        return hint, ""
    if typing.get_origin(hint) is typing.Union and len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return args[0], ""
    if typing.get_origin(hint) is list and args and dataclasses.is_dataclass(args[0]):
        return args[0], "[i]"
    m = _ENTRY_CLASS.search(comment)
    if typing.get_origin(hint) is dict and m and dataclasses.is_dataclass(getattr(schema, m.group(1), None)):
        return getattr(schema, m.group(1)), ".NAME"
    return None, None


def render_value(value) -> str:
    """A default as it would be written in YAML / on the command line."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    if value is MISSING or value == "???":
        return "required"
    if dataclasses.is_dataclass(value):
        return "(section below)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(render_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {render_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def sections(cls=schema.MOPDConfig, prefix: str = "", instance=None) -> list:
    """The schema as sections, depth first from ``cls``; defaults taken from ``instance`` when given (a
    nested default may differ from its class's: demo.model)."""
    comments, types = field_comments(cls), field_types(cls)
    options, below = [], []
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(instance, f.name) if instance is not None else _default_of(f)
        nested, suffix = _nested_class(cls, f, comments.get(f.name, ""))
        options.append(Option(key, f.name, types.get(f.name, "?"), render_value(value), comments.get(f.name, "")))
        if nested is not None:
            sub = value if dataclasses.is_dataclass(value) else None
            below += sections(nested, key + suffix, sub)
    doc = inspect.getdoc(cls) or ""
    doc = "" if doc.startswith(cls.__name__ + "(") else doc  # dataclass's generated signature: no docstring
    own = [Section(prefix, cls, doc, tuple(options))] if prefix else []
    return own + below


def _key_regex(key: str, open_below: bool) -> re.Pattern:
    body = re.escape(key).replace(r"\.NAME", r"\.[^.\[\]]+").replace(r"\[i\]", r"(?:\[\d+\])?")
    return re.compile(body + (r"(?:\..+)?" if open_below else "") + "$")


def key_patterns() -> list:
    """A regex per option and section key; an open mapping without a schema of its own (teachers.routing,
    data.rewards, ...) takes any key below it."""
    secs = sections()
    sec_keys = {s.key for s in secs}
    pats = [_key_regex(k, False) for k in sec_keys]
    for sec in secs:
        for o in sec.options:
            mapping = re.match(r"(Optional\[)?Dict\[", o.type) is not None
            pats.append(_key_regex(o.key, mapping and not any(k.startswith(o.key + ".NAME") for k in sec_keys)))
    return pats


def is_option(key: str, patterns=None) -> bool:
    """Whether ``key`` (e.g. ``teachers.models.math.endpoint``, ``cascade.stages[0].teacher``) names an option
    or a section of the schema."""
    return any(p.match(key) for p in (patterns or key_patterns()))


def composed_defaults(conf_dir: str = schema.CONF_DIR) -> dict:
    """Key -> value (unresolved) of the config that conf/config.yaml composes: the default run."""
    cfg = OmegaConf.to_container(schema.compose_config(config_dir=conf_dir), resolve=False)
    flat = {}

    def walk(node, prefix):
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            flat[key] = v
            if isinstance(v, dict) and not key.startswith(("teachers.models.", "teachers.pools.")):
                walk(v, key)
    walk(cfg, "")
    return flat


def conf_groups(conf_dir: str = schema.CONF_DIR) -> dict:
    """Group -> [(option, the comment block that opens its file)] of conf/."""
    out = {}
    for group in sorted(p for p in Path(conf_dir).iterdir() if p.is_dir()):
        rows = []
        for f in sorted(group.glob("*.yaml")):
            head = []
            for ln in f.read_text().splitlines():
                if not ln.startswith("#"):
                    break
                if not ln.startswith("# @package"):
                    head.append(ln.lstrip("#").strip())
            rows.append((f.stem, " ".join(head).strip()))
        out[group.name] = rows
    return out


def _cell(text: str) -> str:
    """Table-cell text: Markdown's specials escaped outside code spans, pipes escaped everywhere."""
    parts = re.split(r"(`[^`]*`)", text)
    esc = [p if i % 2 else re.sub(r"([\\*_\[\]{}])", r"\\\1", p).replace("<", "&lt;").replace(">", "&gt;")
           for i, p in enumerate(parts)]
    return "".join(esc).replace("|", "\\|")


def _code(text: str) -> str:
    """A table cell in a code span: only the pipe needs escaping there."""
    return f"`{text.replace('|', '&#124;')}`"


def _section_markdown(sec: Section, composed: dict) -> list:
    lines = [f"## `{sec.key}` {{#{sec.key.replace('[i]', '').replace('.NAME', '').replace('.', '-')}}}", ""]
    lines += [f"`{sec.schema.__name__}`" + (f": {sec.doc}" if sec.doc else ""), ""]
    lines += ["| key | type | default | description |", "|---|---|---|---|"]
    for o in sec.options:
        desc = o.description
        run = composed.get(o.key, MISSING)
        if isinstance(run, dict) and run and o.default == "{}":  # teachers, routes: name the entries
            desc = (desc + " " if desc else "") + "Default run: entries " + ", ".join(f"`{k}`" for k in run) + "."
        elif run is not MISSING and not isinstance(run, dict) and render_value(run) != o.default:
            desc = (desc + " " if desc else "") + f"Default run: `{render_value(run).replace('|', '&#124;')}`."
        lines.append(f"| `{o.key}` | {_code(o.type)} | {_code(o.default)} | {_cell(desc)} |")
    return lines + [""]


def render_markdown(conf_dir: str = schema.CONF_DIR) -> str:
    """The whole reference page."""
    composed = composed_defaults(conf_dir)
    lines = ["# Configuration reference", "",
             "Generated from the schema, the dataclasses of `mopd_ray/config.py`, when the site is built "
             "(`mopd_ray/config_reference.py`): every option, its type as annotated, its default and the "
             "comment the code gives it. *Default run* marks a value that the group files picked by "
             "`conf/config.yaml` set differently (what `python -m mopd_ray.main` runs with no override). "
             "`NAME` stands for a name you choose (a teacher, a pool), `[i]` for a list index. Set any option "
             "on the command line as `KEY=VALUE`; `python -m mopd_ray.main run.dry_run=true` prints the "
             "resolved config and the plan.", "",
             "## Config groups {#config-groups}", "",
             "Files under `conf/`, chosen as `GROUP=OPTION` (e.g. `learner=zero3_gpu`); each overrides "
             "the schema's defaults. The description is the comment that opens the file.", "",
             "| group | option | description |", "|---|---|---|"]
    for group, rows in conf_groups(conf_dir).items():
        lines += [f"| `{group}` | `{stem}` | {_cell(doc)} |" for stem, doc in rows]
    lines.append("")
    for sec in sections():
        lines += _section_markdown(sec, composed)
    return "\n".join(lines)


def main() -> None:
    print(render_markdown())


if __name__ == "__main__":
    main()
