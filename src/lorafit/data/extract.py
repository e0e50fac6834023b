"""From the documents people already have to a glossary they review: `lorafit data extract`.

    lorafit data extract terms.xlsx manual.pdf wiki.md --out glossary.yaml --domain aviation

Inputs: XLSX (every sheet), CSV, DOCX (tables and "Term – definition" paragraphs), PDF (the
text layer), Markdown (tables, definition lists, "**Term**: definition") and plain text.
- Tables: the header row is found among the first rows (below a title, in any column order)
  from common names (Term / Abbreviation / Acronym / Name; Definition / Meaning / Description;
  Expansion / Stands for; Category / Area), else from the content (short cells: the term,
  long ones: the definition). Multi-line cells are joined.
- Lines: "TERM – definition", "TERM: definition", "Term (ACR) is ...", "ACR (Term): ...".
Every term keeps where it came from (``source``: file, sheet and row, or page and line).
Nothing is merged silently: a term found twice is listed (same text: a duplicate; other text:
a conflict to resolve), and entries that look wrong (an empty cell, a definition that is only
a number, a term longer than its definition) are skipped and reported with their place.

The readers (openpyxl, python-docx, pypdf) are the optional extra ``lorafit[documents]``.
"""

from __future__ import annotations

import csv
import io
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lorafit.errors import LorafitError

HEADERS = {
    "term": ("term", "terms", "abbreviation", "abbr", "acronym", "name", "word", "keyword"),
    "definition": ("definition", "meaning", "description", "explanation", "definitions"),
    "expansion": ("expansion", "stands for", "full form", "long form", "full name"),
    "category": ("category", "area", "domain", "group", "type"),
}
DASH = r"\s+[-–—]\s+"
LINE_PATTERNS = (
    # "ATP – Stock on hand ..." / "ATP - ..." / "ATP — ..."
    re.compile(rf"^(?:[-*•]\s*)?\**(?P<term>[^:*–—]{{1,60}}?)\**{DASH}(?P<definition>.{{6,}})$"),
    # "ATP: Stock on hand ..." / "**ATP**: ..."
    re.compile(r"^(?:[-*•]\s*)?\**(?P<term>[^:*]{1,60}?)\**\s*:\s+(?P<definition>.{6,})$"),
    # "Available to Promise (ATP) is the quantity ..."
    re.compile(
        r"^(?P<expansion>[A-Z][A-Za-z][\w ,&/-]{2,60}?)\s+\((?P<term>[A-Z][A-Z0-9&/-]{1,10})\)"
        r"\s+(?:is|are|means|refers to)\s+(?P<definition>.{6,})$"
    ),
)
DOCUMENTS_EXTRA = "pip install 'lorafit[documents]'"


@dataclass
class Found:
    term: str
    definition: str
    source: str
    expansion: str | None = None
    category: str | None = None


@dataclass
class Extraction:
    terms: list[Found] = field(default_factory=list)
    duplicates: list[tuple[Found, Found]] = field(default_factory=list)  # (kept, same again)
    conflicts: list[tuple[Found, Found]] = field(default_factory=list)  # (kept, other text)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (where, why)
    per_file: dict[str, int] = field(default_factory=dict)
    columns: dict[str, dict[str, str]] = field(default_factory=dict)  # table -> field: header

    def add(self, found: Found) -> None:
        problem = _looks_wrong(found)
        if problem:
            self.skipped.append((found.source, problem))
            return
        for kept in self.terms:
            if kept.term.casefold() == found.term.casefold():
                same = _norm(kept.definition) == _norm(found.definition)
                (self.duplicates if same else self.conflicts).append((kept, found))
                return
        self.terms.append(found)


def _norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.casefold()))


def _clean(value) -> str:
    if value is None:
        return ""
    return " ".join(str(value).split())  # multi-line cells joined, spaces collapsed


def _looks_wrong(found: Found) -> str | None:
    if not found.term:
        return "empty term"
    if not found.definition:
        return f"{found.term}: empty definition"
    if re.fullmatch(r"[\d.,%\s/-]+", found.definition):
        return f"{found.term}: the definition is only a number ({found.definition})"
    if len(found.term) > len(found.definition):
        return f"{found.term[:40]}: the term is longer than its definition"
    if len(found.term.split()) > 8:
        return f"{found.term[:40]}: too long for a term (a sentence?)"
    return None


# --- tables ------------------------------------------------------------------------------


def _header_map(row: list[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for i, cell in enumerate(row):
        name = cell.casefold().strip(" :*")
        for key, names in HEADERS.items():
            if key not in found and name in names:
                found[key] = i
    return found


def _columns_from_content(rows: list[list[str]]) -> dict[str, int]:
    """No header: the column of short cells is the term, the one of long cells the definition."""
    widths = defaultdict(list)
    for row in rows:
        for i, cell in enumerate(row):
            if cell:
                widths[i].append(len(cell))
    means = {i: sum(w) / len(w) for i, w in widths.items() if len(w) >= max(1, len(rows) // 2)}
    if len(means) < 2:
        return {}
    term = min(means, key=means.get)
    definition = max(means, key=means.get)
    return {"term": term, "definition": definition} if term != definition else {}


def read_table(out: Extraction, rows: list[list[str]], where: str, first_row: int = 1) -> None:
    """Terms from one table; ``where`` names it (file and sheet), rows count from ``first_row``."""
    rows = [[_clean(c) for c in row] for row in rows]
    start, columns = 0, {}
    for i, row in enumerate(rows[:10]):
        header = _header_map(row)
        if "term" in header and "definition" in header:
            start, columns = i + 1, header
            break
    if not columns:
        columns = _columns_from_content([r for r in rows if any(r)])
        if not columns:
            out.skipped.append((where, "no term and definition columns found"))
            return
    header_row = rows[start - 1] if start else None
    out.columns[where] = {
        key: (header_row[i] if header_row else f"column {i + 1} (by its content)")
        for key, i in columns.items()
    }
    for number, row in enumerate(rows[start:], start=first_row + start):
        if not any(row):
            continue

        def cell(key: str, row=row) -> str:
            i = columns.get(key)
            return row[i] if i is not None and i < len(row) else ""

        out.add(
            Found(
                term=cell("term"),
                definition=cell("definition"),
                expansion=cell("expansion") or None,
                category=cell("category") or None,
                source=f"{where}, row {number}",
            )
        )


# --- lines -------------------------------------------------------------------------------


def read_lines(out: Extraction, lines: list[str], where: str) -> None:
    """Terms from running text, one per line that has a glossary shape."""
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#") or line.startswith("|"):
            continue
        for pattern in LINE_PATTERNS:
            match = pattern.match(line)
            if match:
                groups = match.groupdict()
                out.add(
                    Found(
                        term=_clean(groups["term"]).strip("*_` "),
                        definition=_clean(groups["definition"]),
                        expansion=_clean(groups.get("expansion")) or None,
                        source=f"{where}, line {number}",
                    )
                )
                break


def _markdown(out: Extraction, text: str, where: str) -> None:
    lines = text.split("\n")
    table, start = [], 0
    for number, line in enumerate(lines + [""], start=1):
        if line.strip().startswith("|"):
            if not table:
                start = number
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-{3,}:?", c) for c in cells if c):
                table.append(cells)
            continue
        if table:
            read_table(out, table, f"{where}, table at line {start}", first_row=start)
            table = []
    # definition lists: "Term", then ": definition" on the next line (tables were read above)
    plain = ["" if line.strip().startswith("|") else line for line in lines]
    for i in range(len(lines) - 1):
        term, nxt = lines[i].strip(), lines[i + 1]
        if term and not term.startswith((":", "#", "|")) and nxt.startswith(": "):
            plain[i], plain[i + 1] = f"{term}: {nxt[2:].strip()}", ""
    read_lines(out, plain, where)


# --- formats -----------------------------------------------------------------------------


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise LorafitError(
            f"reading this file needs the optional package {module!r}: {DOCUMENTS_EXTRA}"
        ) from None


def _xlsx(out: Extraction, path: Path) -> None:
    openpyxl = _need("openpyxl")
    try:
        book = openpyxl.load_workbook(path, data_only=True)
    except Exception as e:  # noqa: BLE001 - zip/XML errors of a damaged file
        raise LorafitError(
            f"{path}: cannot read this Excel file ({type(e).__name__}); open and save it "
            "again in Excel or LibreOffice, or export the sheet as CSV"
        ) from None
    for sheet in book.worksheets:
        rows = [list(r) for r in sheet.iter_rows(values_only=True)]
        read_table(out, rows, f"{path.name}, sheet {sheet.title}")


def _docx(out: Extraction, path: Path) -> None:
    docx = _need("docx")
    try:
        document = docx.Document(str(path))
    except Exception as e:  # noqa: BLE001
        raise LorafitError(
            f"{path}: cannot read this Word file ({type(e).__name__}); save it again as .docx"
        ) from None
    for n, table in enumerate(document.tables, start=1):
        rows = [[cell.text for cell in row.cells] for row in table.rows]
        read_table(out, rows, f"{path.name}, table {n}")
    read_lines(out, [p.text for p in document.paragraphs], f"{path.name}, paragraph")


def _pdf(out: Extraction, path: Path) -> None:
    pypdf = _need("pypdf")
    try:
        reader = pypdf.PdfReader(str(path))
        if reader.is_encrypted and not reader.decrypt(""):
            raise LorafitError(
                f"{path}: the PDF is password-protected; save an unprotected copy and extract that"
            )
        pages = [page.extract_text() or "" for page in reader.pages]
    except LorafitError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged or unsupported PDF
        raise LorafitError(f"{path}: cannot read this PDF ({type(e).__name__}: {e})") from None
    if not any(page.strip() for page in pages):
        raise LorafitError(
            f"{path}: the PDF has no text layer (a scan?): run OCR on it first (e.g. ocrmypdf) "
            "or copy the glossary into a text file"
        )
    for number, text in enumerate(pages, start=1):
        read_lines(out, text.split("\n"), f"{path.name}, page {number}")


def _text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise LorafitError(f"{path}: not UTF-8 text; save it as UTF-8 and try again") from None


def extract(files: list[Path], out: Extraction | None = None) -> Extraction:
    """Read every file (all of them are checked before anything is written)."""
    out = out or Extraction()
    for path in map(Path, files):
        if not path.is_file():
            raise LorafitError(f"{path}: no such file")
        before = len(out.terms)
        suffix = path.suffix.lower()
        if suffix in (".xlsx", ".xlsm"):
            _xlsx(out, path)
        elif suffix == ".docx":
            _docx(out, path)
        elif suffix == ".pdf":
            _pdf(out, path)
        elif suffix == ".csv":
            rows = list(csv.reader(io.StringIO(_text(path))))
            read_table(out, rows, path.name)
        elif suffix in (".md", ".markdown"):
            _markdown(out, _text(path), path.name)
        elif suffix == ".txt":
            read_lines(out, _text(path).split("\n"), path.name)
        else:
            raise LorafitError(
                f"{path}: lorafit cannot read {suffix or 'files without an extension'}; it reads "
                ".xlsx, .csv, .docx, .pdf, .md and .txt (save the document in one of these)"
            )
        out.per_file[path.name] = len(out.terms) - before
    return out


def glossary_yaml(found: Extraction, domain: str | None) -> str:
    """The glossary in lorafit's format, each term with its source; conflicts as comments."""
    lines = ["# Extracted by `lorafit data extract`: review it, then `lorafit data generate`."]
    for kept, other in found.conflicts:
        lines.append(f"# CONFLICT {kept.term}: {other.source} says: {other.definition}")
    terms = []
    for f in found.terms:
        entry = {"term": f.term}
        if f.expansion:
            entry["expansion"] = f.expansion
        entry["definition"] = f.definition
        if f.category:
            entry["category"] = f.category
        entry["source"] = f.source
        terms.append(entry)
    doc = ({"domain": domain} if domain else {}) | {"terms": terms}
    return (
        "\n".join(lines)
        + "\n"
        + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=100)
    )
