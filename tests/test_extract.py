"""`lorafit data extract`: documents the tests build themselves (an XLSX with two sheets and a
merged title above its header, a DOCX with a table and paragraphs, a PDF with a glossary
appendix, a Markdown page) each turn into the exact glossary expected, with provenance; bad
input is a clear error and writes nothing; the extracted glossary generates and trains."""

import json

import pytest
import yaml
from conftest import run_cli

from lorafit.data.extract import extract
from lorafit.data.glossary import load_glossary
from lorafit.errors import LorafitError

ATP = "Stock on hand minus overdue orders that can still be committed to customers."
MRO = "Shops and services that keep aircraft and their components airworthy."
AOG = "An aircraft grounded for lack of a part, the most urgent priority."
MMBE = "Stock Overview, the SAP transaction that shows stock across plants."


def _terms(glossary_file) -> dict[str, dict]:
    doc = yaml.safe_load(glossary_file.read_text())
    return {t["term"]: t for t in doc["terms"]}


@pytest.fixture
def xlsx(tmp_path):
    from openpyxl import Workbook

    book = Workbook()
    sheet = book.active
    sheet.title = "KPIs"
    sheet["A1"] = "After-sales glossary (internal)"  # a title row, merged across the table
    sheet.merge_cells("A1:C1")
    sheet.append([])
    sheet.append(["Category", "Definition", "Abbreviation"])  # any column order
    sheet.append(["Planning", ATP, "ATP"])
    sheet.append(
        [
            "Segments",
            "Shops and services that keep aircraft\nand their components airworthy.",
            "MRO",
        ]
    )
    sheet.append(["", "", ""])
    sheet.append(["Planning", "42", "OTD"])  # a definition that is only a number
    other = book.create_sheet("SAP")
    other.append(["Term", "Meaning"])
    other.append(["MMBE", MMBE])
    other.append(["ATP", "Available to promise, a different text."])  # a conflict
    path = tmp_path / "terms.xlsx"
    book.save(path)
    return path


def test_xlsx_sheets_headers_below_a_title_and_multiline_cells(xlsx, tmp_path):
    out = tmp_path / "g.yaml"
    r = run_cli("data", "extract", str(xlsx), "--out", str(out), "--domain", "aviation")
    assert r.returncode == 0, r.stderr
    terms = _terms(out)
    assert set(terms) == {"ATP", "MRO", "MMBE"}
    assert terms["ATP"]["definition"] == ATP and terms["ATP"]["category"] == "Planning"
    assert terms["MRO"]["definition"] == MRO  # the two lines of the cell joined
    assert terms["ATP"]["source"] == "terms.xlsx, sheet KPIs, row 4"
    assert terms["MMBE"]["source"] == "terms.xlsx, sheet SAP, row 2"
    text = " ".join(r.stdout.split())
    assert "conflict ATP" in text and "sheet SAP, row 3" in text
    assert "the definition is only a number (42)" in text and "row 7" in text
    assert "term = Abbreviation" in text and "definition = Definition" in text
    assert load_glossary(out).domain == "aviation"  # a valid glossary, source fields and all


def test_docx_table_and_paragraphs(tmp_path):
    import docx

    document = docx.Document()
    document.add_paragraph("Glossary of the repair shop")
    document.add_paragraph(f"AOG – {AOG}")
    document.add_paragraph("Available to Promise (ATP) is the stock that can still be promised.")
    table = document.add_table(rows=1, cols=2)
    table.rows[0].cells[0].text, table.rows[0].cells[1].text = "Term", "Description"
    row = table.add_row().cells
    row[0].text, row[1].text = "MRO", MRO
    path = tmp_path / "manual.docx"
    document.save(path)
    found = extract([path])
    terms = {f.term: f for f in found.terms}
    assert set(terms) == {"AOG", "ATP", "MRO"}
    assert terms["AOG"].definition == AOG
    assert terms["ATP"].expansion == "Available to Promise"
    assert terms["MRO"].source == "manual.docx, table 1, row 2"


def _pdf(path, pages: list[list[str]], password: str | None = None):
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("helvetica", size=11)
    for lines in pages:
        pdf.add_page()
        for line in lines:
            pdf.cell(0, 8, line, new_x="LMARGIN", new_y="NEXT")
    if password:
        pdf.set_encryption(owner_password="owner", user_password=password)
    pdf.output(str(path))
    return path


def test_pdf_glossary_appendix(tmp_path):
    path = _pdf(
        tmp_path / "manual.pdf",
        [
            ["1 Introduction", "This manual describes the after-sales process of the shop."],
            ["Appendix A: Glossary", f"AOG: {AOG}", f"MMBE - {MMBE}"],
        ],
    )
    terms = {f.term: f for f in extract([path]).terms}
    assert set(terms) == {"AOG", "MMBE"}, terms
    assert terms["MMBE"].definition == MMBE
    assert terms["AOG"].source.startswith("manual.pdf, page 2, line")


def test_markdown_tables_definition_lists_and_bold_terms(tmp_path):
    path = tmp_path / "wiki.md"
    path.write_text(
        "# Shop wiki\n\n| Acronym | Stands for | Meaning |\n|---|---|---|\n"
        f"| ATP | Available to Promise | {ATP} |\n\n"
        f"MRO\n: {MRO}\n\n**AOG**: {AOG}\n"
    )
    terms = {f.term: f for f in extract([path]).terms}
    assert set(terms) == {"ATP", "MRO", "AOG"}
    assert terms["ATP"].expansion == "Available to Promise"
    assert terms["MRO"].definition == MRO and terms["AOG"].definition == AOG
    assert terms["MRO"].source == "wiki.md, line 7"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("scan.pdf", None, "no text layer"),
        ("locked.pdf", "password", "password-protected"),
        ("broken.xlsx", b"PK\x03\x04 not really a workbook", "cannot read this Excel file"),
        ("slides.pptx", b"x", "cannot read .pptx"),
        ("notes.md", "Nothing that looks like a glossary here.", "no term/definition pairs"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, name, content, message):
    path = tmp_path / name
    if name == "scan.pdf":
        _pdf(path, [[""]])
    elif name == "locked.pdf":
        _pdf(path, [[f"AOG: {AOG}"]], password="secret")
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    out = tmp_path / "g.yaml"
    r = run_cli("data", "extract", str(path), "--out", str(out))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert str(path.name) in r.stderr or "no term/definition" in r.stderr
    assert not out.exists()


def test_the_extracted_glossary_generates_and_trains(xlsx, tmp_path, tiny_model_dir):
    out = tmp_path / "g.yaml"
    assert run_cli("data", "extract", str(xlsx), "--out", str(out)).returncode == 0
    r = run_cli("data", "generate", str(out), "--out", str(tmp_path / "data"))
    assert r.returncode == 0, r.stderr
    r = run_cli(
        "train",
        "--data",
        str(tmp_path / "data" / "train.jsonl"),
        "--output",
        str(tmp_path / "run"),
        *("--set", f"model.name={tiny_model_dir}", "--set", "train.max_steps=2"),
        *("--set", "data.replay=0", "--set", "tracking.enabled=false"),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "completed"


def test_a_missing_reader_names_the_extra(monkeypatch, xlsx):
    import sys

    monkeypatch.setitem(sys.modules, "openpyxl", None)  # as if not installed
    with pytest.raises(LorafitError, match=r"lorafit\[documents\]"):
        extract([xlsx])
