"""The one JSON Lines reader behind prompt files, code tasks and bias pairs: file:line errors."""

import pytest

from llmctl.data.jsonl import read_jsonl
from llmctl.errors import DataError
from llmctl.evaluation import bias, codeexec


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"a": 1}\n\n  \n[2]\n')
    assert list(read_jsonl(f)) == [(1, {"a": 1}), (4, [2])]


@pytest.mark.parametrize("read", [codeexec._read_tasks, lambda f: bias.load_pairs([str(f)], [])], ids=["code tasks", "bias pairs"])
def test_a_malformed_line_names_file_and_line(tmp_path, read):
    f = tmp_path / "t.jsonl"
    f.write_text('\n{"task_id": broken\n')
    with pytest.raises(DataError, match=r"t\.jsonl:2: malformed JSON .*column"):
        read(f)


def test_a_code_task_that_is_not_an_object_is_named(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('["not", "a", "task"]\n')
    with pytest.raises(DataError, match=r"t\.jsonl:1: expected a JSON object"):
        codeexec._read_tasks(f)
