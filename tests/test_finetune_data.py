"""Fine-tune data: sources, the held-out split, the known mix, the dataset hash, and bad input refused."""

from __future__ import annotations

import json

import pytest

from ka2l.config import FinetuneConfig, to_dict
from ka2l.errors import ConfigError
from ka2l.finetune import data as D
from ka2l.store import queries as Q
from ka2l.store.db import connect
from helpers import import_pool, stage1_cfg


def stored_run(model, pool_id: int) -> int:
    """A finished Stage 1 run row naming ``model`` (the fine-tune reads its model and prompt from it)."""
    with connect() as db:
        run_id = Q.create_run(db, pool_id, "stage1", to_dict(stage1_cfg(model)), "h", str(model), {})
        Q.update_run(db, run_id, status="done")
    return run_id


def pairs(n: int):
    return [(f"What is the capital of land {i}?", [f"City{i}"]) for i in range(n)]


def gold(**kw) -> FinetuneConfig:
    return FinetuneConfig(source="gold", gold_set="all", device="cpu", **kw)


def test_gold_split_is_disjoint_deterministic_and_stable_as_data_grows(tiny_llama_dir):
    stored_run(tiny_llama_dir, import_pool(pairs(40)))
    ds = D.build("caps", gold(eval_share=0.25))
    train, held = {p.item_key for p in ds.train}, {p.item_key for p in ds.eval}
    assert not train & held and len(train | held) == 40 and 4 <= len(held) <= 16
    assert all(p.origin == "gold" and p.answer.startswith("City") for p in ds.train + ds.eval)
    again = D.build("caps", gold(eval_share=0.25))
    assert again.hash == ds.hash and [p.item_key for p in again.eval] == [p.item_key for p in ds.eval]
    assert D.build("caps", gold(eval_share=0.25, seed=1)).hash != ds.hash


def test_an_items_split_depends_on_its_own_key_so_growing_data_keeps_held_out_items_out(tmp_path, tiny_llama_dir):
    stored_run(tiny_llama_dir, import_pool(pairs(4)))

    def write(n):
        path = tmp_path / f"qa{n}.jsonl"
        path.write_text("\n".join(json.dumps({"question": f"Question number {i}?", "answer": f"A{i}"}) for i in range(n)))
        return D.build("caps", FinetuneConfig(source="file", file=str(path), eval_share=0.2, device="cpu"))

    small, big = write(30), write(90)
    assert {p.question for p in small.eval} <= {p.question for p in big.eval}
    assert not {p.question for p in small.eval} & {p.question for p in big.train}


def test_file_sources_csv_and_jsonl(tmp_path, tiny_llama_dir):
    stored_run(tiny_llama_dir, import_pool(pairs(4)))
    csv = tmp_path / "qa.csv"
    csv.write_text("Question,Answer,extra\nWho wrote Hamlet?,Shakespeare,x\nCapital of Peru?,Lima,y\nCapital of Chile?,Santiago,z\n,empty,w\n")
    ds = D.build("caps", FinetuneConfig(source="file", file=str(csv), device="cpu"))
    assert len(ds.train) + len(ds.eval) == 3 and ds.notes["dropped"]["empty"] == 1 and len(ds.eval) >= 1
    jl = tmp_path / "qa.jsonl"
    jl.write_text("\n".join(json.dumps({"question": q, "answer": a}) for q, a in [("Who wrote Hamlet?", "Shakespeare"), ("Capital of Peru?", "Lima")]))
    ds2 = D.build("caps", FinetuneConfig(source="file", file=str(jl), device="cpu"))
    assert {p.item_key for p in ds2.train + ds2.eval} <= {p.item_key for p in ds.train + ds.eval}


def test_bad_input_says_what_and_how(tmp_path, tiny_llama_dir):
    stored_run(tiny_llama_dir, import_pool(pairs(4)))
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,response\nq,a\n")
    with pytest.raises(ConfigError, match=r"no 'question' and no 'answer' column.*Name the columns"):
        D.build("caps", FinetuneConfig(source="file", file=str(bad), device="cpu"))
    one = tmp_path / "one.csv"
    one.write_text("question,answer\nWho wrote Hamlet?,Shakespeare\n")
    with pytest.raises(ConfigError, match="Only 1 .* at least 2"):
        D.build("caps", FinetuneConfig(source="file", file=str(one), device="cpu"))
    empty = tmp_path / "empty.csv"
    empty.write_text("question,answer\n")
    with pytest.raises(ConfigError, match="gave no .*Fill the question and answer columns"):
        D.build("caps", FinetuneConfig(source="file", file=str(empty), device="cpu"))
    with pytest.raises(ConfigError, match="does not exist"):
        D.build("caps", FinetuneConfig(source="file", file=str(tmp_path / "none.csv"), device="cpu"))
    # the run has no scores, so no question is unknown yet: the message points at gold_set 'all'
    with pytest.raises(ConfigError, match="gold_set 'all'"):
        D.build("caps", FinetuneConfig(source="gold", device="cpu"))
    with pytest.raises(ConfigError, match="source is 'file' but no file"):
        FinetuneConfig(source="file")


def test_no_stage1_run_names_the_fix(tiny_llama_dir):
    import_pool(pairs(4))
    with pytest.raises(Exception, match="probe"):
        D.build("caps", gold())


def test_known_mix_uses_the_models_own_answers_and_only_trains(memo_model, capitals):
    """A real Stage 1 run on the memorising model: its known questions join training with its answers."""
    from ka2l.probing.stage1 import run_stage1

    import_pool(capitals, rows=capitals[:16] + capitals[40:56])
    run_id = run_stage1("caps", stage1_cfg(memo_model, kind="logistic"))
    with connect() as db:
        scores = Q.load_scores(db, run_id)
        low = Q.load_answers(db, run_id)
    known = {s["question_id"] for s in scores if s["bise"] == 0}
    unknown = [s for s in scores if s["bise"] == 1]
    assert known and len(unknown) >= 2
    ds = D.build("caps", FinetuneConfig(source="gold", mix_known=3, device="cpu"))
    mixed = [p for p in ds.train if p.origin == "known"]
    assert len(mixed) == min(3, len(known)) and not [p for p in ds.eval if p.origin == "known"]
    for p in mixed:
        qid = int(p.item_key[2:])
        assert qid in known and p.answer == low[qid]["low"][0]["text"]
    assert {p.item_key for p in ds.train + ds.eval if p.origin == "gold"} == {f"q:{s['question_id']}" for s in unknown}
    assert D.build("caps", FinetuneConfig(source="gold", device="cpu")).hash != ds.hash  # the mix is part of the data
