import pytest

from autocode4math.io import DataError, JsonlAppender, read_done, read_jsonl


def test_malformed_line_names_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2\n')
    with pytest.raises(DataError, match=r"x.jsonl:3"):
        list(read_jsonl(p))


def test_non_object_line_is_an_error(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text("[1, 2]\n")
    with pytest.raises(DataError, match=r"x.jsonl:1: expected a JSON object"):
        list(read_jsonl(p))


def test_read_done_drops_torn_last_line_and_appending_continues(tmp_path):
    p = tmp_path / "out.jsonl"
    with JsonlAppender(p) as out:
        out.write({"i": 0})
        out.write({"i": 1})
    with p.open("a") as f:
        f.write('{"i": 2, "te')  # a kill mid-write
    assert [r["i"] for r in read_done(p)] == [0, 1]
    with JsonlAppender(p) as out:
        out.write({"i": 2})
    assert [r["i"] for r in read_jsonl(p)] == [0, 1, 2]
