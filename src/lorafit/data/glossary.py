"""Read and validate a domain glossary (YAML, JSON or CSV).

    domain: Embraer                 # optional
    terms:
      - term: ATP
        expansion: Available to Promise   # optional, for acronyms
        definition: Stock on hand minus overdue orders; what can be committed to customers.
        aliases: [A.T.P.]                 # optional
        category: Supply chain            # optional
        source: glossary.xlsx, sheet 1, row 4   # optional: where the entry came from

CSV files use the columns term, expansion, definition, aliases (separated by ';'), category.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lorafit.errors import LorafitError
from lorafit.shipped import resolve

FIELDS = ("term", "expansion", "definition", "aliases", "category", "source")


@dataclass(frozen=True)
class Term:
    term: str
    definition: str
    expansion: str | None = None
    aliases: tuple[str, ...] = ()
    category: str | None = None
    source: str | None = None  # where the entry came from (lorafit data extract writes it)


@dataclass(frozen=True)
class Glossary:
    terms: tuple[Term, ...]
    domain: str | None = None
    source: str = ""


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that keeps every scalar as the text the user wrote (``null``/``~`` aside)
    and remembers the line each mapping starts on (for error messages).

    YAML 1.1 would turn a definition of ``0737`` into 479, ``1:30`` into 90, ``0x10`` into 16
    and ``no``/``off`` into false: a glossary is text, so only the null resolver is kept.
    """

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag == "tag:yaml.org,2002:null"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node, deep=False):  # noqa: D401 - yaml API
        mapping = super().construct_mapping(node, deep=deep)
        mapping["__line__"] = node.start_mark.line + 1
        return mapping


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise LorafitError(f"{path}: glossary file not found")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # a BOM is harmless here
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise LorafitError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); re-save the file as UTF-8"
        ) from e


def _entries(path: Path, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        missing = {"term", "definition"} - set(reader.fieldnames or [])
        if missing:
            raise LorafitError(
                f"{path}:1: CSV header lacks column(s) {sorted(missing)}; expected {list(FIELDS)}"
            )
        rows, start = [], reader.line_num + 1  # a quoted cell may span lines: the row's first
        try:
            for row in reader:
                row = {k: (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k}
                if row.get("aliases"):
                    row["aliases"] = [a.strip() for a in row["aliases"].split(";") if a.strip()]
                row["__line__"] = start
                rows.append(row)
                start = reader.line_num + 1
        except csv.Error as e:  # e.g. a field over the csv module's size limit
            raise LorafitError(
                f"{path}:{start}: cannot read this CSV row ({e}); a cell this long is usually "
                "an unclosed quote: check the quotes on this line"
            ) from None
        return None, rows
    try:
        # _LineLoader is a SafeLoader subclass: no arbitrary objects
        doc = (
            json.loads(text, parse_int=str, parse_float=str)  # numbers keep their text too
            if suffix == ".json"
            else yaml.load(text, Loader=_LineLoader)
        )
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise LorafitError(f"{path}: cannot parse glossary: {e}") from e
    if isinstance(doc, list):
        return None, doc
    if not isinstance(doc, dict) or "terms" not in doc:
        raise LorafitError(
            f"{path}: expected a mapping with a 'terms:' list (and an optional 'domain:')"
        )
    domain = doc.get("domain")
    if domain is not None and not isinstance(domain, str):
        raise LorafitError(f"{path}: 'domain' must be text, got {type(domain).__name__}")
    terms = doc["terms"]
    if not isinstance(terms, list):
        raise LorafitError(f"{path}: 'terms' must be a list of entries")
    return domain, terms


def _text_field(entry: dict[str, Any], name: str, where: str, required: bool) -> str | None:
    value = entry.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise LorafitError(f"{where}: field '{name}' is missing or empty")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise LorafitError(f"{where}: field '{name}' must be text, got {type(value).__name__}")
    return " ".join(str(value).split())


@dataclass(frozen=True)
class Problem:
    """What is wrong with one glossary entry (``index`` -1: with the file as a whole)."""

    index: int
    line: int | None
    message: str  # names the file, line and field, and what to do


def _term(entry: Any, index: int, path: Path, seen: dict[str, str]) -> Term:
    if not isinstance(entry, dict):
        raise LorafitError(f"{path}: terms[{index}]: expected a mapping with term/definition")
    line = entry.get("__line__")
    where = f"{path}:{line}" if line else f"{path}: terms[{index}]"
    unknown = set(entry) - set(FIELDS) - {"__line__"}
    if unknown:
        raise LorafitError(
            f"{where}: unknown field(s) {sorted(unknown)}; allowed: {', '.join(FIELDS)}"
        )
    term = _text_field(entry, "term", where, required=True)
    definition = _text_field(entry, "definition", where, required=True)
    aliases_raw = entry.get("aliases") or []
    if isinstance(aliases_raw, str):
        aliases_raw = [aliases_raw]
    if not isinstance(aliases_raw, list) or not all(isinstance(a, str) for a in aliases_raw):
        raise LorafitError(f"{where}: field 'aliases' must be a list of text")
    key = term.casefold()
    if key in seen:
        raise LorafitError(
            f"{where}: term {term!r} is defined twice (first at {seen[key]}); "
            "merge the two definitions into one entry"
        )
    seen[key] = where
    return Term(
        term=term,
        definition=definition.rstrip(),
        expansion=_text_field(entry, "expansion", where, required=False),
        aliases=tuple(a.strip() for a in aliases_raw if a.strip()),
        category=_text_field(entry, "category", where, required=False),
        source=_text_field(entry, "source", where, required=False),
    )


def check_glossary(
    path: str | Path, text: str | None = None
) -> tuple[Glossary | None, list[Problem]]:
    """Every problem of a glossary, one per entry (the first found in it), instead of stopping
    at the first: what an editor shows next to each row. The glossary when there are none.
    ``text``: the file's content, checked before it is written anywhere (``path`` names it)."""
    path = resolve(path) if text is None else Path(path)
    try:
        domain, entries = _entries(path, _read_text(path) if text is None else text)
    except LorafitError as e:
        return None, [Problem(-1, None, str(e))]
    if not entries:
        return None, [Problem(-1, None, f"{path}: the glossary has no terms")]
    terms, problems, seen = [], [], {}
    for index, entry in enumerate(entries):
        try:
            terms.append(_term(entry, index, path, seen))
        except LorafitError as e:
            line = entry.get("__line__") if isinstance(entry, dict) else None
            problems.append(Problem(index, line, str(e)))
    if problems:
        return None, problems
    return Glossary(terms=tuple(terms), domain=domain, source=str(path)), []


def load_glossary(path: str | Path) -> Glossary:
    """Load and validate a glossary; errors name the file, line and field."""
    glossary, problems = check_glossary(path)
    if problems:
        raise LorafitError(problems[0].message)
    assert glossary is not None
    return glossary
