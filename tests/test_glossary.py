import json
from pathlib import Path

import pytest

from lorafit.data.glossary import load_glossary
from lorafit.errors import LorafitError

ROOT = Path(__file__).resolve().parents[1]
AVIATION = ROOT / "data" / "glossaries" / "aviation.yaml"
SEED_TERMS = ("EEC", "APU", "MM03", "AHEAD", "EPEP", "BER")


def test_shipped_glossary_is_large_and_covers_the_seed_questions():
    g = load_glossary(AVIATION)
    names = {t.term for t in g.terms}
    assert len(g.terms) >= 60
    assert set(SEED_TERMS) <= names
    categories = {t.category for t in g.terms}
    assert len(categories) >= 5
    assert g.domain


def test_json_and_csv_glossaries(tmp_path):
    j = tmp_path / "g.json"
    j.write_text(json.dumps({"domain": "x", "terms": [{"term": "A", "definition": "Letter a."}]}))
    assert load_glossary(j).terms[0].definition == "Letter a."
    c = tmp_path / "g.csv"
    c.write_text("term,expansion,definition,aliases\nATP,Available to Promise,Stock.,A.T.P.;atp\n")
    t = load_glossary(c).terms[0]
    assert t.expansion == "Available to Promise" and t.aliases == ("A.T.P.", "atp")


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "terms:\n  - term: A\n    definition: x\n  - term: a\n    definition: y\n",
            ["g.yaml:4", "defined twice", "g.yaml:2"],
        ),
        ("terms:\n  - term: A\n    definition: x\n  - term: B\n", ["g.yaml:4", "'definition'"]),
        ("terms:\n  - term: A\n    definition: ''\n", ["g.yaml:2", "'definition'"]),
        ("terms:\n  - term: [1]\n    definition: x\n", ["g.yaml:2", "'term' must be text"]),
        ("terms:\n  - term: A\n    definition: x\n    colour: red\n", ["unknown field", "colour"]),
        ("terms: []\n", ["no terms"]),
        ("just text\n", ["terms:"]),
        ("terms: [\n", ["cannot parse"]),
    ],
)
def test_bad_glossaries_name_file_line_field(tmp_path, text, expected):
    f = tmp_path / "g.yaml"
    f.write_text(text)
    with pytest.raises(LorafitError) as e:
        load_glossary(f)
    for part in expected:
        assert part in str(e.value)


def test_non_utf8_glossary(tmp_path):
    f = tmp_path / "g.yaml"
    f.write_bytes(b"terms:\n  - term: caf\xe9\n    definition: x\n")
    with pytest.raises(LorafitError, match=r"g\.yaml:2: not UTF-8"):
        load_glossary(f)
