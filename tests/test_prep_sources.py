"""Input readers and resolution: text (line / blank-line), JSONL, Parquet, folders, globs,
`datasets` folders, fsspec URLs, resume points, and each bad-input case naming file+line."""

from __future__ import annotations

import json

import pytest

from data_prep.errors import PrepError
from data_prep.scan import STATUS_CODE, load_holdout, scan_unit, Holdout, HOLDOUT, EMPTY, OK
from data_prep.readers import read_unit
from data_prep.sources import ReadOptions, resolve_source


def items_of(spec: str, **opts):
    o = ReadOptions(**opts)
    return [it for u in resolve_source(spec, o).units for it in read_unit(u, o)]


def test_text_one_document_per_line(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first doc\n\n  \nsecond doc\n")
    items = items_of(str(f))
    assert [i.text.strip() for i in items] == ["first doc", "second doc"]
    assert items[1].where.endswith("a.txt:4") and items[1].line == 4


def test_text_blank_line_blocks(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("line one\nline two\n\n\nblock two\n")
    items = items_of(str(f), doc_split="blank_line")
    assert [i.text for i in items] == ["line one\nline two\n", "block two\n"]
    assert items[1].line == 5


def test_jsonl_text_and_id_fields(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"body": "hello", "key": 7}) + "\n" + json.dumps({"body": "x"}))
    items = items_of(str(f), text_field="body", id_field="key")
    assert [(i.id, i.text) for i in items] == [("7", "hello"), (f"{f}:2", "x")]


def test_parquet_with_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": [f"doc {i}" for i in range(10)]}), f, row_group_size=3)
    o = ReadOptions()
    (unit,) = resolve_source(str(f), o).units
    assert [i.text for i in read_unit(unit, o)] == [f"doc {i}" for i in range(10)]
    assert [i.text for i in read_unit(unit, o, start=7)] == ["doc 7", "doc 8", "doc 9"]


def test_datasets_saved_to_disk(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["a b", "c d", "e f"]}).save_to_disk(tmp_path / "ds")
    source = resolve_source(str(tmp_path / "ds"), ReadOptions())
    assert [u.kind for u in source.units] == ["hf_disk"]
    assert [i.text for i in read_unit(source.units[0], ReadOptions(), start=1)] == ["c d", "e f"]


def test_folder_and_glob_are_sorted_and_skip_hidden_and_other_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("b\n")
    (tmp_path / "sub" / "a.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / ".hidden.txt").write_text("h\n")
    (tmp_path / "README").write_text("not a corpus file\n")
    kinds = [(u.kind, u.label.rsplit("/", 1)[-1])
             for u in resolve_source(str(tmp_path), ReadOptions()).units]
    assert kinds == [("text", "b.txt"), ("jsonl", "a.jsonl")]
    assert [u.label.rsplit("/", 1)[-1] for u in
            resolve_source(str(tmp_path / "*.txt"), ReadOptions()).units] == ["b.txt"]


def test_fsspec_url_and_gzip(tmp_path):
    import gzip

    with gzip.open(tmp_path / "a.txt.gz", "wt") as f:
        f.write("zipped doc\n")
    items = items_of(f"file://{tmp_path}/a.txt.gz")
    assert [i.text.strip() for i in items] == ["zipped doc"]


@pytest.mark.parametrize("name,content,opts", [
    ("a.txt", "".join(f"doc {i}\n" for i in range(10)), {}),
    ("b.txt", "".join(f"doc {i}\nmore {i}\n\n\n" for i in range(10)), {"doc_split": "blank_line"}),
    ("c.jsonl", "".join(json.dumps({"text": f"doc {i}"}) + "\n\n" for i in range(10)), {}),
])
def test_resume_point_seeks_to_the_same_item(tmp_path, name, content, opts):
    f = tmp_path / name
    f.write_text(content)
    o = ReadOptions(**opts)
    (unit,) = resolve_source(str(f), o).units
    everything = list(read_unit(unit, o))
    scan = scan_unit(unit, o, Holdout(), docs_per_shard=4, on_error="raise")
    assert set(scan.resume_points) == {4, 8}
    for start in (4, 8):
        resumed = list(read_unit(unit, o, start, scan.resume_points[start]))
        assert [(i.text, i.line, i.where) for i in resumed] == \
            [(i.text, i.line, i.where) for i in everything[start:]]


# ---------------------------------------------------------------- bad input

def scan(spec: str, on_error: str = "raise", **opts):
    o = ReadOptions(**opts)
    return [scan_unit(u, o, Holdout(), 100, on_error) for u in resolve_source(spec, o).units]


def test_missing_path_names_it(tmp_path):
    with pytest.raises(PrepError, match="nope.txt.*does not exist"):
        resolve_source(str(tmp_path / "nope.txt"), ReadOptions())


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(PrepError, match="matches no file"):
        resolve_source(str(tmp_path / "*.jsonl"), ReadOptions())


def test_empty_file_raises_or_is_counted(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("")
    with pytest.raises(PrepError, match=r"empty.txt.*empty.*fix"):
        scan(str(f))
    (result,) = scan(str(f), on_error="skip")
    assert result.status.tolist() == [STATUS_CODE["empty_file"]]


def test_invalid_utf8_names_file_and_line(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"good line\nbad \xff\xfe line\nanother\n")
    with pytest.raises(PrepError, match=r"bad.txt:2: invalid UTF-8.*iconv"):
        scan(str(f))
    (result,) = scan(str(f), on_error="skip")
    assert result.status.tolist() == [OK, STATUS_CODE["invalid_utf8"], OK]


def test_jsonl_line_that_is_not_json(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": oops\n')
    with pytest.raises(PrepError, match=r"bad.jsonl:2: not valid JSON"):
        scan(str(f))
    (result,) = scan(str(f), on_error="skip")
    assert result.status.tolist() == [OK, STATUS_CODE["bad_json"]]


def test_jsonl_without_the_text_field(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"body": "ok"}\n')
    with pytest.raises(PrepError,
                       match=r"a.jsonl:1: no field .text. \(fields: body\).*prep.text_field"):
        scan(str(f))


def test_parquet_without_the_text_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "a.parquet"
    pq.write_table(pa.table({"body": ["x"]}), f)
    with pytest.raises(PrepError, match=r"a.parquet.*no column 'text'.*columns: body"):
        scan(str(f))
    (result,) = scan(str(f), on_error="skip")
    assert result.status.tolist() == [STATUS_CODE["missing_text_field"]]


def test_holdout_file_by_hash_and_id(tmp_path):
    from distill_common.textnorm import doc_hash

    f = tmp_path / "a.jsonl"
    f.write_text("\n".join(json.dumps({"id": f"d{i}", "text": f"Doc  number {i}."})
                           for i in range(5)) + "\n" + json.dumps({"text": "   "}) + "\n")
    holdout_file = tmp_path / "holdout.txt"
    holdout_file.write_text(f"# evaluation text\n{doc_hash('Doc number 1.')}\nd3\n")
    holdout = load_holdout(str(holdout_file))
    o = ReadOptions()
    (unit,) = resolve_source(str(f), o).units
    result = scan_unit(unit, o, holdout, 100, "raise")
    assert result.status.tolist() == [OK, HOLDOUT, OK, HOLDOUT, OK, EMPTY]
