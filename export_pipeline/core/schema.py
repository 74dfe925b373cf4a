"""Column types as trees: declared hints merged with what the data holds, and widening.

The schema-evolution policy (docs/schema.md) lives here as pure functions over DuckDB type
strings, so normalise (files -> Parquet) and load (Parquet -> table) apply the same rules:

- a declared type is a *hint*: it types the keys it names; every other key the data holds, at
  any depth (struct fields, list elements), is kept with the type DuckDB detected;
- numbers widen (BIGINT + DOUBLE -> DOUBLE), structs gain fields, lists widen their elements;
  anything else that disagrees becomes VARCHAR, or JSON when one side is nested, so a value is
  never rounded, dropped or turned NULL;
- nothing is ever typed NULL: an all-null value takes its declared type, else VARCHAR.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from export_pipeline.core.sql import quote_ident, sql_literal

NUMERIC_ORDER = (
    "BOOLEAN",
    "TINYINT",
    "SMALLINT",
    "INTEGER",
    "BIGINT",
    "HUGEINT",
    "FLOAT",
    "DOUBLE",
)
_NUMERIC_RANK = {t: i for i, t in enumerate(NUMERIC_ORDER)}
_INTEGERS = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT"}
_ALIASES = {
    "INT": "INTEGER",
    "INT4": "INTEGER",
    "INT8": "BIGINT",
    "LONG": "BIGINT",
    "INT2": "SMALLINT",
    "SHORT": "SMALLINT",
    "INT1": "TINYINT",
    "REAL": "FLOAT",
    "FLOAT4": "FLOAT",
    "FLOAT8": "DOUBLE",
    "DOUBLE PRECISION": "DOUBLE",
    "BOOL": "BOOLEAN",
    "STRING": "VARCHAR",
    "TEXT": "VARCHAR",
    "TIMESTAMPTZ": "TIMESTAMP WITH TIME ZONE",
}
# Unsigned integers widen like the signed ones one size up.
_UNSIGNED = {
    "UTINYINT": "SMALLINT",
    "USMALLINT": "INTEGER",
    "UINTEGER": "BIGINT",
    "UBIGINT": "HUGEINT",
}
# DuckDB's JSON reader stores these from strings; any string value fits them only if it parses,
# so a declared one of these over detected VARCHAR is trusted (a failing value widens later).
STRINGLY = {
    "VARCHAR",
    "UUID",
    "DATE",
    "TIME",
    "TIMESTAMP",
    "TIMESTAMP WITH TIME ZONE",
    "INTERVAL",
    "BLOB",
}


@dataclass(frozen=True)
class Struct:
    fields: tuple[tuple[str, Type], ...]

    def get(self, name: str) -> Type | None:
        for n, t in self.fields:
            if n == name:
                return t
        return None


@dataclass(frozen=True)
class List:
    element: Type


@dataclass(frozen=True)
class Scalar:
    text: str  # normalised upper-case DuckDB spelling (MAP/UNION/DECIMAL kept verbatim)


Type = Struct | List | Scalar

_TOKEN = re.compile(r'\s*(?:("(?:[^"]|"")*")|([(),\[\]])|([^\s(),\[\]"]+))')


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            if text[pos:].strip():
                raise ValueError(f"cannot parse type {text!r}")
            break
        out.append(m.group(0).strip())
        pos = m.end()
    return [t for t in out if t]


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.i = 0

    def peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> str:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def parse(self) -> Type:
        t = self.type_()
        if self.peek() is not None:
            raise ValueError(f"cannot parse type {self.text!r}")
        return t

    def type_(self) -> Type:
        head = self.take()
        if head.upper() == "STRUCT" and self.peek() == "(":
            self.take()
            fields: list[tuple[str, Type]] = []
            while self.peek() != ")":
                name = self.take()
                if name.startswith('"'):
                    name = name[1:-1].replace('""', '"')
                if self.peek() in (",", ")", "[", "(", None):
                    # DuckDB writes a field whose key is "" without a name: STRUCT(BIGINT).
                    # No type can be declared with such a field (the export is read key by key).
                    raise ValueError(f"a struct field without a name in {self.text!r}")
                fields.append((name, self.type_()))
                if self.peek() == ",":
                    self.take()
            self.take()
            base: Type = Struct(tuple(fields))
        else:
            words = [head]
            # multi-word names (TIMESTAMP WITH TIME ZONE) and parameters (DECIMAL(18,3), MAP(..))
            while (nxt := self.peek()) is not None and nxt not in (",", ")", "[", "]", "("):
                words.append(self.take())
            text = " ".join(words).upper()
            if self.peek() == "(":
                depth = 0
                raw = []
                while True:
                    tok = self.take()
                    raw.append(tok)
                    depth += tok == "("
                    depth -= tok == ")"
                    if depth == 0:
                        break
                text += _join_raw(raw)
            base = Scalar(_ALIASES.get(text, text))
        while self.peek() == "[":
            self.take()
            if self.peek() != "]":  # fixed-size ARRAY[n]: treat as a list
                self.take()
            self.take()
            base = List(base)
        return base


def _join_raw(raw: list[str]) -> str:
    out = ""
    for tok in raw:
        if tok in ("(", ")", ",", "[", "]") or out.endswith(("(", "[")):
            out += tok
        else:
            out += (" " if out and not out.endswith(",") else "") + tok
    return out.replace(",", ", ")


def parse(text: str) -> Type:
    return _Parser(text).parse()


def render(t: Type) -> str:
    if isinstance(t, Struct):
        return "STRUCT(" + ", ".join(f"{quote_ident(n)} {render(f)}" for n, f in t.fields) + ")"
    if isinstance(t, List):
        return render(t.element) + "[]"
    return t.text


def structure(t: Type) -> str:
    """The ``json_transform`` structure (JSON text) for a type."""

    def walk(node: Type) -> object:
        if isinstance(node, Struct):
            return {n: walk(f) for n, f in node.fields}
        if isinstance(node, List):
            return [walk(node.element)]
        return node.text

    return json.dumps(walk(t))


def from_structure(value: object) -> Type:
    """A type from ``json_group_structure`` output (objects, arrays, type names), spelled as
    DuckDB's JSON reader would type the same values (UBIGINT -> BIGINT)."""
    if isinstance(value, dict):
        if "" in value:
            # No struct field can be named "" (a DuckDB type cannot say it): a map keeps every
            # key. (Not JSON, which stands for a position null throughout, where a hint wins.)
            return Scalar("MAP(VARCHAR, JSON)")
        return Struct(tuple((k, from_structure(v)) for k, v in value.items()))
    if isinstance(value, list):
        return List(from_structure(value[0]) if value else Scalar("NULL"))
    text = _ALIASES.get(str(value).upper(), str(value).upper())
    return Scalar("BIGINT" if text == "UBIGINT" else text)


_STRUCTURE_NUMBERS = ("UBIGINT", "BIGINT", "DOUBLE")  # widening order of json_structure's


def merge_structure(a: object, b: object) -> object:
    """Two ``json_structure`` values merged as ``json_group_structure`` merges them: "NULL"
    gives way, objects merge their keys (``a``'s first), arrays their elements, numbers widen
    (UBIGINT < BIGINT < DOUBLE), and any other mix is "JSON". (The aggregate itself holds
    every row's parsed document: it ran out of memory on 50,000 CSV cells; distinct structures
    merged here hold only the few shapes there are.)"""
    if a == "NULL":
        return b
    if b == "NULL" or a == b:
        return a
    if isinstance(a, dict) and isinstance(b, dict):
        merged = dict(a)
        for key, value in b.items():
            merged[key] = merge_structure(a[key], value) if key in a else value
        return merged
    if isinstance(a, list) and isinstance(b, list) and a and b:
        return [merge_structure(a[0], b[0])]
    if a in _STRUCTURE_NUMBERS and b in _STRUCTURE_NUMBERS:
        return max(a, b, key=_STRUCTURE_NUMBERS.index)
    return "JSON"


def is_nested(t: Type) -> bool:
    if isinstance(t, (Struct, List)):
        return True
    return t.text == "JSON" or t.text.startswith(("MAP", "UNION"))


def _numeric(text: str) -> str | None:
    text = _UNSIGNED.get(text, text)
    return text if text in _NUMERIC_RANK else None


def map_scalars(t: Type, change: Callable[[Scalar], Type]) -> Type:
    """``t`` with each scalar, at any depth inside structs and lists, replaced by ``change``."""
    if isinstance(t, Struct):
        return Struct(tuple((n, map_scalars(f, change)) for n, f in t.fields))
    if isinstance(t, List):
        return List(map_scalars(t.element, change))
    return change(t)


def no_null(t: Type) -> Type:
    """Replace every NULL type (all values null) by VARCHAR, at any depth."""
    return map_scalars(t, lambda s: Scalar("VARCHAR") if _is_null(s) else s)


def fill_nulls(t: Type, hint: Type | None) -> Type:
    """``t`` with each NULL position (a column or struct field null in every row) of the
    declared ``hint``'s type there, where the declaration has that position."""
    if hint is None:
        return t
    if _is_null(t):
        return hint
    if isinstance(t, Struct) and isinstance(hint, Struct):
        return Struct(tuple((n, fill_nulls(f, hint.get(n))) for n, f in t.fields))
    if isinstance(t, List) and isinstance(hint, List):
        return List(fill_nulls(t.element, hint.element))
    return t


def _is_null(t: Type) -> bool:
    return isinstance(t, Scalar) and t.text in ("NULL", '"NULL"')


def _all_null_json(t: Type) -> bool:
    return isinstance(t, Scalar) and t.text == "JSON"


def apply_hint(hint: Type, detected: Type) -> Type:
    """The type to read a value as: the declared ``hint`` where the data fits it, extended by
    every field the data has and the hint lacks, widened where the data does not fit."""
    if _is_null(detected):
        return hint
    if isinstance(hint, Struct) and isinstance(detected, Struct):
        return _merge_structs(hint, detected, apply_hint)
    if isinstance(hint, List) and isinstance(detected, List):
        return List(apply_hint(hint.element, detected.element))
    if isinstance(hint, Scalar) and isinstance(detected, Scalar):
        if hint.text == detected.text:
            return hint
        h, d = _numeric(hint.text), _numeric(detected.text)
        if h and d:
            # DuckDB's JSON detection calls every integer BIGINT (json_group_structure: UBIGINT),
            # so a declared integer type is kept (a value too big for it drifts to the detected
            # type on read); a fraction where an integer is declared widens to the float.
            if h in _INTEGERS and d in _INTEGERS:
                return hint
            return hint if _NUMERIC_RANK[h] >= _NUMERIC_RANK[d] else Scalar(d)
        if detected.text in STRINGLY or (d and hint.text.startswith("DECIMAL")):
            # strings that should parse into the declared type (a failing one widens the
            # column to VARCHAR on read), integers into a declared DECIMAL
            return hint
        if detected.text == "JSON":
            # JSON from the full scan is either all-null (the hint fits) or mixed types
            # (then keep JSON: the hint would fail or round). Mixed is rare and costs a read.
            return hint if hint.text in ("VARCHAR", "JSON") else detected
        if hint.text == "VARCHAR":
            return hint
        return widen(hint, detected)
    # nested data where a scalar was declared, or the reverse: keep every value as JSON
    if isinstance(hint, Scalar) and hint.text in ("VARCHAR", "JSON"):
        return hint
    if _all_null_json(detected):
        return hint
    return Scalar("JSON")


def widen(a: Type, b: Type) -> Type:
    """The narrowest type holding every value of ``a`` and of ``b`` (table + new export)."""
    if a == b:
        return a
    if _is_null(a):
        return no_null(b)
    if _is_null(b):
        return no_null(a)
    if isinstance(a, Struct) and isinstance(b, Struct):
        return _merge_structs(a, b, widen)
    if isinstance(a, List) and isinstance(b, List):
        return List(widen(a.element, b.element))
    if isinstance(a, Scalar) and isinstance(b, Scalar):
        na, nb = _numeric(a.text), _numeric(b.text)
        if na and nb:
            if "BOOLEAN" in (na, nb) and na != nb:
                return Scalar("VARCHAR")
            return Scalar(na if _NUMERIC_RANK[na] >= _NUMERIC_RANK[nb] else nb)
        pair = {a.text, b.text}
        if pair == {"TIMESTAMP", "TIMESTAMP WITH TIME ZONE"}:
            return Scalar("TIMESTAMP WITH TIME ZONE")
        if pair == {"DATE", "TIMESTAMP"}:
            return Scalar("TIMESTAMP")
        if pair == {"DATE", "TIMESTAMP WITH TIME ZONE"}:
            return Scalar("TIMESTAMP WITH TIME ZONE")
        if "JSON" in pair:
            return Scalar("JSON")
        if is_nested(a) or is_nested(b):
            return Scalar("JSON")
        return Scalar("VARCHAR")
    return Scalar("JSON")


def added_fields(
    old: Type, new: Type, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], Type]] | None:
    """The struct fields ``new`` adds to ``old`` as (path, type), if that is *all* it changes.

    ``None`` when any existing type changes (then the column is retyped as a whole). A path
    steps into list elements with ``element``, as ``ALTER TABLE ... ADD COLUMN`` spells it.
    """
    if old == new:
        return []
    if isinstance(old, Struct) and isinstance(new, Struct):
        out: list[tuple[tuple[str, ...], Type]] = []
        names = [n for n, _ in old.fields]
        if [n for n, _ in new.fields[: len(names)]] != names:
            return None
        for name, fo in old.fields:
            fn = new.get(name)
            assert fn is not None
            sub = added_fields(fo, fn, (*path, name))
            if sub is None:
                return None
            out += sub
        out += [((*path, n), f) for n, f in new.fields[len(names) :]]
        return out
    if isinstance(old, List) and isinstance(new, List):
        return added_fields(old.element, new.element, (*path, "element"))
    return None


def changes(old: Type, new: Type, path: str) -> list[str]:
    """Human-readable differences, e.g. ``evses[].floor_level added`` (for metadata)."""
    if old == new:
        return []
    if isinstance(old, Struct) and isinstance(new, Struct):
        out: list[str] = []
        for name, fn in new.fields:
            fo = old.get(name)
            sub = f"{path}.{name}"
            out += [f"{sub} added ({render(fn)})"] if fo is None else changes(fo, fn, sub)
        return out
    if isinstance(old, List) and isinstance(new, List):
        return changes(old.element, new.element, f"{path}[]")
    return [f"{path} widened {render(old)} -> {render(new)}"]


def _merge_structs(a: Struct, b: Struct, combine: Callable[[Type, Type], Type]) -> Struct:
    """``a``'s fields in order, each combined with ``b``'s field of that name, then the fields
    only ``b`` has (never typed NULL): a struct never loses a field either side has."""
    fields = [
        (name, fa if (fb := b.get(name)) is None else combine(fa, fb)) for name, fa in a.fields
    ]
    known = {name for name, _ in a.fields}
    fields += [(name, no_null(fb)) for name, fb in b.fields if name not in known]
    return Struct(tuple(fields))


# The type changes DuckLake makes in place (``ALTER COLUMN ... SET DATA TYPE`` without a
# rewrite: the data files keep the narrower type and are read as the wider one), as checked on
# the ducklake extension for DuckDB 1.4.4. Any other change (BIGINT -> DOUBLE, -> VARCHAR/JSON,
# BIGINT -> HUGEINT, a guessed VARCHAR -> the data's type) needs the column rewritten.
LAKE_PROMOTIONS = {
    "TINYINT": frozenset({"SMALLINT", "INTEGER", "BIGINT"}),
    "SMALLINT": frozenset({"INTEGER", "BIGINT"}),
    "INTEGER": frozenset({"BIGINT"}),
    "UTINYINT": frozenset({"SMALLINT", "INTEGER", "BIGINT", "USMALLINT", "UINTEGER", "UBIGINT"}),
    "USMALLINT": frozenset({"INTEGER", "BIGINT", "UINTEGER", "UBIGINT"}),
    "UINTEGER": frozenset({"UBIGINT"}),
    "FLOAT": frozenset({"DOUBLE"}),
}
_INTEGER_ORDER = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT")


def promotes_in_place(old: Type, new: Type, *, lake: bool) -> bool:
    """Whether ``ALTER COLUMN ... SET DATA TYPE new`` (no ``USING``) keeps every value of
    ``old`` without rewriting the column.

    The DuckDB file: a wider integer. DuckLake (``lake``): :data:`LAKE_PROMOTIONS`, applied
    field by field through structs (which may also gain fields) and list elements.
    """
    if not lake:
        return (
            isinstance(old, Scalar)
            and isinstance(new, Scalar)
            and old.text in _INTEGER_ORDER
            and new.text in _INTEGER_ORDER
            and _INTEGER_ORDER.index(new.text) > _INTEGER_ORDER.index(old.text)
        )
    if old == new:
        return True
    if isinstance(old, Struct) and isinstance(new, Struct):
        # DuckLake matches fields by name: every old field must stay (a missing one is dropped)
        return all(
            (fn := new.get(name)) is not None and promotes_in_place(fo, fn, lake=True)
            for name, fo in old.fields
        )
    if isinstance(old, List) and isinstance(new, List):
        return promotes_in_place(old.element, new.element, lake=True)
    if isinstance(old, Scalar) and isinstance(new, Scalar):
        return new.text in LAKE_PROMOTIONS.get(old.text, ())
    return False


def holds_json(t: Type) -> bool:
    """Whether ``t`` is JSON or has JSON inside (a struct field, a list element)."""
    if isinstance(t, Struct):
        return any(holds_json(f) for _, f in t.fields)
    if isinstance(t, List):
        return holds_json(t.element)
    return t.text == "JSON"


def adds_json(old: Type | None, new: Type) -> bool:
    """Whether going from ``old`` (None: a new column) to ``new`` brings a JSON type that was
    not there: a new column, field or element type that is or holds JSON."""
    if old is None:
        return holds_json(new)
    if old == new:
        return False
    if isinstance(old, Struct) and isinstance(new, Struct):
        return any(adds_json(old.get(n), f) for n, f in new.fields)
    if isinstance(old, List) and isinstance(new, List):
        return adds_json(old.element, new.element)
    return holds_json(new)


def convert_sql(expr: str, old: Type, new: Type, _depth: int = 0) -> str:
    """SQL giving ``expr`` (of type ``old``) as type ``new``, which holds every value of it.

    A plain cast, except where JSON is the target: ``to_json`` (a cast would parse a VARCHAR
    as JSON text and fail on ``hello``), applied field by field through structs and element by
    element through lists, so a struct field or list element widened to JSON keeps its values.
    """
    if old == new:
        return expr
    if not holds_json(new):
        return f"CAST({expr} AS {render(new)})"
    if isinstance(new, Scalar):  # JSON
        return expr if old == new else f"to_json({expr})"
    if isinstance(old, Struct) and isinstance(new, Struct):
        fields = []
        for name, field_type in new.fields:
            was = old.get(name)
            value = (
                f"CAST(NULL AS {render(field_type)})"
                if was is None
                else convert_sql(
                    f"struct_extract({expr}, {sql_literal(name)})",
                    was,
                    field_type,
                    _depth + 1,
                )
            )
            fields.append(f"{quote_ident(name)} := {value}")
        return f"CASE WHEN {expr} IS NULL THEN NULL ELSE struct_pack({', '.join(fields)}) END"
    if isinstance(old, List) and isinstance(new, List):
        var = f"_e{_depth}"
        inner = convert_sql(var, old.element, new.element, _depth + 1)
        return f"list_transform({expr}, lambda {var}: {inner})"
    return f"CAST({expr} AS {render(new)})"
