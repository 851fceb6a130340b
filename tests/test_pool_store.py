"""Pool import: every bad input gets a message naming the row or column, and nothing stored is lost.
Store: migrations from empty, WAL, refusal of foreign files."""

from __future__ import annotations

import io
import sqlite3

import pandas as pd
import pytest

from ka2l.errors import NotFound, PoolError, StoreError
from ka2l.pools.reader import parse_answers, read_pool
from ka2l.pools.sources import demo_pools, load_builtin
from ka2l.store import queries as Q
from ka2l.store.db import connect
from ka2l.store.migrations import MIGRATIONS


def write(tmp_path, name, content, mode="w"):
    p = tmp_path / name
    (p.write_bytes if mode == "wb" else p.write_text)(content)
    return p


def test_csv_jsonl_parquet_round_trip(tmp_path):
    csv = write(tmp_path, "a.csv", 'question,answer,topic\nCapital of France?,Paris|paris,geo\nWho wrote Hamlet?,"[""Shakespeare"", ""W. Shakespeare""]",lit\nNo gold?,,misc\n')
    pool = read_pool(csv)
    assert [r.question for r in pool.rows] == ["Capital of France?", "Who wrote Hamlet?", "No gold?"]
    assert pool.rows[0].answers == ("Paris", "paris") and pool.rows[1].answers == ("Shakespeare", "W. Shakespeare")
    assert pool.rows[2].answers == () and pool.rows[0].metadata == {"topic": "geo"}
    assert [r.ext_id for r in pool.rows] == ["1", "2", "3"]
    jl = write(tmp_path, "b.jsonl", '{"id": "x1", "question": "Q one?", "answers": ["A"], "n": 3}\n\n{"id": "x2", "question": "Q two?"}\n')
    pool = read_pool(jl)
    assert [r.ext_id for r in pool.rows] == ["x1", "x2"] and pool.rows[0].metadata == {"n": 3}
    pq = tmp_path / "c.parquet"
    pd.DataFrame({"question": ["Q1?", "Q2?"], "answer": [["a", "b"], None]}).to_parquet(pq)
    pool = read_pool(pq)
    assert pool.rows[0].answers == ("a", "b") and pool.rows[1].answers == ()


@pytest.mark.parametrize("name,content,mode,message", [
    ("empty.csv", "", "w", "is empty \\(0 bytes\\)"),
    ("blank.csv", "\n\n  \n", "w", "only whitespace"),
    ("nocol.csv", "prompt,answer\nWhat?,x\n", "w", "no 'question' column. Columns found: prompt, answer. Rename 'prompt' to 'question'"),
    ("bin.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00IHDR", "wb", "binary file"),
    ("latin.csv", "question\nCapital of C\xf4te d'Ivoire?\n".encode("latin-1"), "wb", "not valid utf-8-sig text: byte 0xf4 at line 2.*--encoding cp1252"),
    ("bad.jsonl", '{"question": "a?"}\n{"question": \n', "w", "line 2 is not valid JSON"),
    ("list.jsonl", '["a?"]\n', "w", "line 1 is a JSON list, expected an object"),
    ("x.xlsx", "whatever", "w", "unsupported file type '.xlsx'"),
    ("fake.parquet", "question\nhello?\n", "w", "not a readable Parquet file"),
])
def test_bad_inputs_get_clear_messages(tmp_path, name, content, mode, message):
    with pytest.raises(PoolError, match=message):
        read_pool(write(tmp_path, name, content, mode))


def test_bad_rows_are_named_and_nothing_is_imported_unless_skipped(tmp_path):
    p = write(tmp_path, "p.csv", "id,question\n1,What is up?\n2,\n3,what is  UP?\n1,Another?\n5," + "x" * 2100 + "\n6,Fine?\n")
    with pytest.raises(PoolError) as err:
        read_pool(p)
    msg = str(err.value)
    assert "4 of 6 rows are invalid, so nothing was imported" in msg
    assert "Row 2: column 'question' is empty" in msg
    assert "Row 3: duplicate of row 1" in msg
    assert "Row 4: id '1' is already used by row 1" in msg
    assert "Row 5: the question is 2100 characters" in msg
    pool = read_pool(p, skip_invalid=True)
    assert [r.question for r in pool.rows] == ["What is up?", "Fine?"] and len(pool.skipped) == 4


def test_huge_file_refused_by_size(tmp_path):
    p = write(tmp_path, "big.csv", "question\n" + "Why is the sky blue?\n" * 60000)
    with pytest.raises(PoolError, match="over the 1 MB limit.*--max-mb"):
        read_pool(p, max_mb=1)


def test_explicit_encoding_reads_legacy_files(tmp_path):
    p = write(tmp_path, "latin.csv", "question\nCapital of C\xf4te d'Ivoire?\n".encode("cp1252"), "wb")
    assert read_pool(p, encoding="cp1252").rows[0].question == "Capital of Côte d'Ivoire?"
    with pytest.raises(PoolError, match="Unknown encoding"):
        read_pool(p, encoding="klingon")


def test_parse_answers_variants():
    assert parse_answers('["a", "b", "a"]') == ("a", "b")
    assert parse_answers("x | y") == ("x", "y")
    assert parse_answers(None) == () and parse_answers(float("nan")) == () and parse_answers(7) == ("7",)


def test_migrations_from_empty_and_wal(tmp_path):
    with connect(tmp_path / "k.db") as db:
        assert db.conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert {"pools", "questions", "runs", "answers", "clusters", "scores", "probes", "probe_layers", "predictions", "jobs", "hidden_done"} <= set(db.table_names())
    with connect(tmp_path / "k.db") as db:  # reopening migrates nothing twice
        assert db.conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


def test_foreign_or_newer_database_refused(tmp_path):
    (tmp_path / "junk.db").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(StoreError, match="not a ka2l database"):
        connect(tmp_path / "junk.db").__enter__()
    conn = sqlite3.connect(tmp_path / "future.db")
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StoreError, match="newer than this ka2l"):
        connect(tmp_path / "future.db").__enter__()


def test_import_keeps_existing_pool_on_name_clash_and_failed_import(tmp_path):
    good = write(tmp_path, "g.csv", "question,answer\nQ1?,a\nQ2?,b\n")
    with connect() as db:
        pid = Q.insert_pool(db, read_pool(good, name="mine"))
        with pytest.raises(PoolError, match="already exists"):
            Q.insert_pool(db, read_pool(good, name="mine"))
        with pytest.raises(PoolError):
            Q.insert_pool(db, read_pool(write(tmp_path, "b.csv", "question\n\n"), name="other"))
        assert [p["name"] for p in Q.list_pools(db)] == ["mine"]
        qs = Q.pool_questions(db, pid)
        assert [q["answers"] for q in qs] == [["a"], ["b"]]
        assert Q.get_pool(db, "mine")["id"] == Q.get_pool(db, str(pid))["id"]
        with pytest.raises(NotFound, match="Pools: mine"):
            Q.get_pool(db, "nope")


def test_demo_pools_and_fanoutqa():
    assert {"capitals", "elements"} <= set(demo_pools())
    caps = load_builtin("demo:capitals")
    assert len(caps.rows) > 250 and all(r.answers for r in caps.rows)
    sao = next(r for r in caps.rows if "Príncipe" in r.question)
    assert "São Tomé" in sao.answers
    with pytest.raises(PoolError, match="No demo pool 'nope'"):
        load_builtin("demo:nope")
    fq = load_builtin("fanoutqa")
    assert len(fq.rows) > 1500 and all(r.answers for r in fq.rows)


@pytest.mark.parametrize("dtype", [object, "string", "string[pyarrow]", "category"])
def test_safe_csv_neutralises_every_text_column_whatever_its_dtype(dtype):
    from ka2l.views.export import to_safe_csv

    frame = pd.DataFrame({"question": pd.Series(["=1+1", "@SUM(A1)", "plain", None], dtype=dtype), "n": [1, -2, 3, 4]})
    frame["=cmd"] = pd.Series(["+x", "-y", "ok", "\tz"], dtype=dtype)
    out = pd.read_csv(io.BytesIO(to_safe_csv(frame)), dtype=str, keep_default_na=False)
    assert list(out.columns) == ["question", "n", "'=cmd"], "a formula-like header is neutralised too"
    assert list(out["question"]) == ["'=1+1", "'@SUM(A1)", "plain", ""]
    assert list(out["'=cmd"]) == ["'+x", "'-y", "ok", "'\tz"]
    assert list(out["n"]) == ["1", "-2", "3", "4"], "numbers stay numbers"


TRIVIAQA_ANSWER = {"aliases": ["Paris", "Paris, France", "City of Light"], "normalized_aliases": ["paris", "paris france", "city of light"],
                   "matched_wiki_entity_name": "", "normalized_matched_wiki_entity_name": "", "normalized_value": "paris",
                   "type": "WikipediaEntity", "value": "Paris"}


def test_gold_aliases_from_common_qa_exports_are_all_imported(tmp_path):
    import json

    rows = [{"id": "tqa1", "question": "Capital of France?", "answer": TRIVIAQA_ANSWER},  # TriviaQA (HF datasets)
            {"id": "nq1", "question": "Who wrote Hamlet?", "answer": ["William Shakespeare", "Shakespeare"]},  # NQ-open
            {"id": "a1", "question": "Largest planet?", "answer": "Jupiter", "aliases": ["planet Jupiter", "Jupiter"]},
            {"id": "a2", "question": "Year of the moon landing?", "answer": 1969}]
    pool = read_pool(write(tmp_path, "qa.jsonl", "".join(json.dumps(r) + "\n" for r in rows)))
    assert [r.answers for r in pool.rows] == [
        ("Paris", "Paris, France", "City of Light", "paris", "paris france", "city of light"),
        ("William Shakespeare", "Shakespeare"), ("Jupiter", "planet Jupiter"), ("1969",)]
    assert "aliases" not in pool.metadata_columns and all("aliases" not in r.metadata for r in pool.rows)
    with connect() as db:
        stored = Q.pool_questions(db, Q.insert_pool(db, pool))
    assert stored[0]["answers"] == list(pool.rows[0].answers) and stored[2]["answers"] == ["Jupiter", "planet Jupiter"]

    csv = tmp_path / "qa.csv"  # a CSV cell may hold aliases separated by '|' or the answer object as JSON
    pd.DataFrame({"question": ["Largest planet?", "Capital of France?"], "answer": ["Jupiter", json.dumps(TRIVIAQA_ANSWER)],
                  "aliases": ["planet Jupiter|Jove", ""]}).to_csv(csv, index=False)
    assert [r.answers for r in read_pool(csv).rows] == [("Jupiter", "planet Jupiter", "Jove"), pool.rows[0].answers]
    pq = tmp_path / "tqa.parquet"  # TriviaQA saved with pandas: the answer is a struct whose lists come back as arrays
    pd.DataFrame({"question": ["Capital of France?"], "answer": [TRIVIAQA_ANSWER]}).to_parquet(pq)
    assert read_pool(pq).rows[0].answers == pool.rows[0].answers


@pytest.mark.parametrize("answer,found", [
    ({"any_of": ["red", "blue"]}, "an object with keys any_of"),
    ({"text": ["a"], "answer_start": [3]}, "an object with keys text, answer_start"),
    ([{"text": "a"}], "a list holding an object"),
    (True, "a boolean"),
])
def test_answers_in_an_unknown_shape_are_refused_with_the_row_never_stringified(tmp_path, answer, found):
    import json

    rows = [{"question": "Fine?", "answer": "yes"}, {"question": "Colour of the sky?", "answer": answer}]
    path = write(tmp_path, "odd.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PoolError) as err:
        read_pool(path)
    msg = str(err.value)
    assert f"Row 2: column 'answer' holds {found}" in msg, msg
    assert "Accepted:" in msg and "TriviaQA" in msg and "list" in msg
    pool = read_pool(path, skip_invalid=True)
    assert [r.question for r in pool.rows] == ["Fine?"] and len(pool.skipped) == 1
