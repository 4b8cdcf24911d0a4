"""Whole-or-nothing writes and the one JSON-lines reader."""

from __future__ import annotations

import pytest

from instructrec import files


class BadLine(Exception):
    def __init__(self, path, number, message):
        super().__init__(f"{path}:{number}: {message}")


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out" / "report.json"
    files.write_json(path, {"a": 1}, indent=1)
    assert path.read_text() == '{\n "a": 1\n}\n'
    with pytest.raises(RuntimeError):
        with files.atomic_file(path) as f:
            f.write("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == '{\n "a": 1\n}\n' and list(path.parent.iterdir()) == [path]


def test_jsonl_errors_name_the_line_and_a_torn_tail_is_told_apart(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"a": 2}\n{"a": 3')  # a writer killed inside the last line
    with pytest.raises(BadLine, match=r"x.jsonl:4: not valid JSON"):
        list(files.jsonl_objects(path, BadLine))
    assert list(files.jsonl_objects(path, BadLine, torn_tail="skip")) == [(1, {"a": 1}), (3, {"a": 2})]
    assert path.read_bytes().endswith(b'{"a": 3')  # skip reads only
    assert [v for _, v in files.jsonl_objects(path, BadLine, torn_tail="repair")] == [{"a": 1}, {"a": 2}]
    assert path.read_bytes() == b'{"a": 1}\n\n{"a": 2}\n'  # cut, ready for appending
    path.write_bytes(b'{"a": 1}\n[1, 2]\n{"a": 3}\n')  # a bad line inside the file is never skipped
    with pytest.raises(BadLine, match=r"x.jsonl:2: expected a JSON object, got list"):
        list(files.jsonl_objects(path, BadLine, torn_tail="skip"))


def test_repair_ends_a_whole_last_line_with_its_newline(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2}')
    assert [v for _, v in files.jsonl_objects(path, BadLine, torn_tail="repair")] == [{"a": 1}, {"a": 2}]
    assert path.read_bytes() == b'{"a": 1}\n{"a": 2}\n'
