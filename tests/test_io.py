from concurrent.futures import ThreadPoolExecutor

import pytest

from autocode4math.io import DataError, JsonlAppender, read_done, read_json, read_jsonl, write_json, write_jsonl


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


def test_concurrent_writers_of_one_file_never_collide(tmp_path):
    # Seeds of one study run as separate processes and rewrite the shared base evaluation's metrics.json;
    # a fixed temporary name let one writer rename away the other's file (FileNotFoundError).
    path = tmp_path / "metrics.json"

    def write(i: int) -> None:
        for j in range(40):
            write_json(path, {"writer": i, "j": j, "pad": "x" * 20_000})
            write_jsonl(tmp_path / "rows.jsonl", [{"writer": i, "j": j}] * 50)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(8)))
    assert read_json(path)["pad"] == "x" * 20_000 and len(list(read_jsonl(tmp_path / "rows.jsonl"))) == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "rows.jsonl"]  # no temporary left
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"i": 0}])

    def rows():
        yield {"i": 1}
        raise RuntimeError("generator broke mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        write_jsonl(path, rows())
    with pytest.raises(TypeError):
        write_json(tmp_path / "x.json", {"bad": object()})
    assert [r["i"] for r in read_jsonl(path)] == [0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]
