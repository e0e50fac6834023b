"""Data readers: every format detected, every kind of bad input refused with file:line:field."""

import json

import pytest
from conftest import run_cli, write_jsonl

from lorafit.data import formats
from lorafit.data.formats import read_dataset
from lorafit.errors import LorafitError


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"prompt": "Q?", "response": "A."}, "prompt/response"),
        ({"prompt": "Q?", "completion": "A."}, "prompt/completion"),
        (
            {
                "messages": [
                    {"role": "system", "content": "S"},
                    {"role": "user", "content": "Q?"},
                    {"role": "assistant", "content": "A."},
                ]
            },
            "messages",
        ),
        ({"instruction": "Q?", "input": "ctx", "output": "A."}, "alpaca"),
    ],
)
def test_formats_detected_and_converted(tmp_path, row, fmt):
    ds = read_dataset(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert ds.format == fmt
    ex = ds.examples[0]
    assert ex.answer == "A."
    assert ex.prompt[-1]["role"] == "user" and ex.prompt[-1]["content"].startswith("Q?")


def test_alpaca_json_array_and_multi_turn(tmp_path):
    f = tmp_path / "a.json"
    f.write_text(json.dumps([{"instruction": "Q?", "output": "A."}]))
    assert read_dataset(f).format == "alpaca"
    turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": "A."},
    ]
    ex = read_dataset(write_jsonl(tmp_path / "m.jsonl", [{"messages": turns}])).examples[0]
    assert len(ex.prompt) == 3 and ex.answer == "A."  # loss on the last answer only


def test_crlf_is_fine_and_duplicates_and_extra_fields_warn(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(
        b'{"prompt": "Q?", "response": "A.", "id": 1}\r\n{"prompt": "Q?", "response": "A."}\r\n'
    )
    ds = read_dataset(f)
    assert len(ds.examples) == 2 and ds.duplicates == 1
    assert any("duplicate" in w for w in ds.warnings)
    assert any("unknown field" in w and "id" in w for w in ds.warnings)


BAD = {
    "invalid_json_mid_file": (
        b'{"prompt": "a", "response": "b"}\n{"prompt": "a" "response"}\n'
        b'{"prompt": "c", "response": "d"}\n',
        ["bad.jsonl:2", "invalid JSON"],
    ),
    "truncated_last_line": (
        b'{"prompt": "a", "response": "b"}\n{"prompt": "c", "resp',
        ["bad.jsonl:2", "cut off"],
    ),
    "missing_field": (
        b'{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n',
        ["bad.jsonl:2", "unknown format"],
    ),
    "empty_response": (
        b'{"prompt": "a", "response": "  "}\n',
        ["bad.jsonl:1", "'response'", "empty"],
    ),
    "null_prompt": (b'{"prompt": null, "response": "b"}\n', ["bad.jsonl:1", "'prompt'", "null"]),
    "number_prompt": (b'{"prompt": 42, "response": "b"}\n', ["bad.jsonl:1", "'prompt'", "int"]),
    "list_response": (
        b'{"prompt": "a", "response": ["b"]}\n',
        ["bad.jsonl:1", "'response'", "list"],
    ),
    "unknown_format": (
        b'{"question": "a", "answer": "b"}\n',
        ["bad.jsonl:1", "unknown format", "prompt+response"],
    ),
    "mixed_formats": (
        b'{"prompt": "a", "response": "b"}\n{"instruction": "a", "output": "b"}\n',
        ["bad.jsonl:2", "mixed formats", "bad.jsonl:1"],
    ),
    "empty_file": (b"", ["bad.jsonl", "empty"]),
    "blank_lines_only": (b"\n\n  \n", ["bad.jsonl", "empty"]),
    "non_utf8": (
        b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n',
        ["bad.jsonl:2", "not UTF-8"],
    ),
    "bom": (b'\xef\xbb\xbf{"prompt": "a", "response": "b"}\n', ["bad.jsonl:1", "byte-order mark"]),
    "not_an_object": (b'["a", "b"]\n', ["bad.jsonl", "JSON object"]),
    "bad_role": (
        b'{"messages": [{"role": "bot", "content": "x"}]}\n',
        ["bad.jsonl:1", "messages[0]", "'role'"],
    ),
    "last_turn_not_assistant": (
        b'{"messages": [{"role": "user", "content": "x"}]}\n',
        ["bad.jsonl:1", "assistant"],
    ),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_refused_with_file_line_field(tmp_path, name):
    content, expected = BAD[name]
    f = tmp_path / "bad.jsonl"
    f.write_bytes(content)
    with pytest.raises(LorafitError) as e:
        read_dataset(f)
    for part in expected:
        assert part in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "name", ["invalid_json_mid_file", "bom", "mixed_formats", "empty_file", "non_utf8"]
)
def test_data_check_cli_exits_nonzero_and_writes_nothing(tmp_path, name):
    content, expected = BAD[name]
    f = tmp_path / "bad.jsonl"
    f.write_bytes(content)
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run_cli("data", "check", str(f))
    assert r.returncode == 2
    assert expected[0] in r.stderr.replace("\n", "")
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_missing_file(tmp_path):
    with pytest.raises(LorafitError, match="not found"):
        read_dataset(tmp_path / "nope.jsonl")


def test_data_check_reports_stats_and_warnings(tmp_path, embedded_dir):
    rows = [{"prompt": "What is ATP?", "response": "Available to Promise."}] * 2
    rows.append({"prompt": "Long?", "response": "word " * 300})
    f = write_jsonl(tmp_path / "ok.jsonl", rows)
    r = run_cli("data", "check", str(f), "--max-length", "128", env={"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert "prompt/response" in out and "1 duplicate row" in out
    assert "1 row(s) longer than 128 tokens" in out


def _write_many(path: str, marker: int) -> None:
    for i in range(300):
        formats.write_jsonl(path, [{"writer": marker, "i": i}])


def test_processes_writing_one_file_at_once_never_collide(tmp_path):
    """The ranks of a torchrun job write shared cache files: each writes through its own temp
    file, so no rename finds its temp file taken by the other (CI failed on that once)."""
    import multiprocessing

    target = str(tmp_path / "shared.jsonl")
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_write_many, args=(target, m)) for m in (1, 2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=120)
    assert [w.exitcode for w in writers] == [0, 0]
    assert json.loads((tmp_path / "shared.jsonl").read_text())["i"] == 299
    assert not list(tmp_path.glob(".*.tmp"))
