"""Stage 3b evaluation on a tiny memorising Llama fine-tuned through ka2l's own LoRA job: one row per
held-out question per model, a summary with intervals naming the BERTScore model, resumable (nothing
answered twice, a cancel keeps its batches), the tuned side refused until training finished, and the CLI."""

from __future__ import annotations

import pytest

from ka2l.config import FinetuneConfig, to_dict
from ka2l.errors import Cancelled, ConfigError
from ka2l.finetune import evaluate as EV
from ka2l.finetune import textmetrics as T
from ka2l.store import evaluation as E
from ka2l.store import finetune as S
from ka2l.store import queries as Q
from ka2l.store.db import connect
from helpers import import_pool, stage1_cfg

BATCH = 4


def finetuned(model, capitals) -> int:
    """A finished fine-tune of ``model`` on 12 capitals' gold answers, half of them held out."""
    from ka2l.finetune.lora import finetune

    pool_id = import_pool(capitals[:12])
    with connect() as db:
        run_id = Q.create_run(db, pool_id, "stage1", to_dict(stage1_cfg(model)), "h", str(model), {})
        Q.update_run(db, run_id, status="done")
    cfg = FinetuneConfig(source="gold", gold_set="all", device="cpu", dtype="float32", epochs=2, batch_size=4, grad_accum=1,
                         max_length=128, eval_share=0.5, lr=5e-3, eval_every=2, checkpoint_every=50, patience=0)
    return finetune("caps", cfg)


def held_out(finetune_id: int) -> list[str]:
    with connect() as db:
        return [r["item_key"] for r in S.load_data(db, finetune_id, split="eval")]


class Recorder:
    """Progress that records stages and, when asked, cancels at the first batch of one stage."""

    def __init__(self, cancel_in: str | None = None):
        self.stages: list[tuple[str, int | None, int]] = []
        self.cancel_in = cancel_in

    def stage(self, name, total=None, done=0):
        self.stages.append((name, total, done))

    def advance(self, n=1, message=None):
        if self.cancel_in and self.stages[-1][0] == self.cancel_in and n:
            raise Cancelled("stop")

    def close(self):
        pass


def no_generation(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a stored answer was generated again")

    monkeypatch.setattr("ka2l.models.llm.generate_answers", refuse)


def test_one_row_per_heldout_question_per_model_a_summary_and_nothing_answered_twice(memo_model, capitals, monkeypatch):
    fid = finetuned(memo_model, capitals)
    keys = held_out(fid)
    progress = Recorder()
    summary = EV.evaluate(fid, progress, batch_size=BATCH, bootstrap=200)
    assert [s[0] for s in progress.stages] == ["preparing", "base answers", "tuned answers", "BERTScore", "summary"]
    with connect() as db:
        rows = E.answers(db, fid)
        stored = E.get_evaluation(db, fid)
        table = E.table(db, fid)
    for model in ("base", "tuned"):
        assert sorted(r["item_key"] for r in rows if r["model"] == model) == sorted(keys)
    assert len(rows) == 2 * len(keys) and summary["answered_now"] == {"base": len(keys), "tuned": len(keys)}
    for r in rows:  # every metric stored, and each is the metric of that answer
        assert r["correct"] == int(T.correct(r["answer"], r["gold"], r["question"]))
        assert r["rouge_l"] == pytest.approx(T.rouge_l(r["answer"], r["gold"]))
        assert r["bertscore"] is not None and 0 <= r["bertscore"] <= 100
    assert stored == summary and "all-MiniLM-L6-v2" in summary["bertscore_model"] and summary["temperature"] == 0.1
    for metric, entry in summary["metrics"].items():
        for model in ("base", "tuned", "delta"):
            e = entry[model]
            assert e["lo"] <= e["value"] <= e["hi"] and e["n"] == len(keys), (metric, model, e)
    base_correct = 100 * sum(r["correct"] for r in rows if r["model"] == "base") / len(keys)
    assert summary["metrics"]["correct"]["base"]["value"] == pytest.approx(base_correct)
    assert base_correct > 0  # the memorised capitals are answered right
    assert [t["item_key"] for t in table] == sorted(keys) and all(t["base_answer"] is not None and t["tuned_answer"] is not None for t in table)
    assert "BERTScore model: sentence-transformers/all-MiniLM-L6-v2" in EV.report(summary)

    no_generation(monkeypatch)
    again = EV.evaluate(fid, Recorder(), batch_size=BATCH, bootstrap=200)
    assert again["answered_now"] == {"base": 0, "tuned": 0}
    assert again["metrics"] == summary["metrics"]
    with connect() as db:
        assert len(E.answers(db, fid)) == len(rows)
    with pytest.raises(ConfigError, match=r"other settings \(temperature 0.1 -> 0.7; seed 0 -> 3\).*--fresh"):
        EV.evaluate(fid, Recorder(), temperature=0.7, seed=3, batch_size=BATCH, bootstrap=200)  # stored T=0.1 answers are not T=0.7's
    # another BERTScore model (here the same one named by its folder): the answers are kept, BERTScore alone is scored
    # again (a sentinel in the stored column shows it was), and every row names the model that scored it
    default_name, folder = summary["bertscore_model"], T.bertscore_model_dir()
    with connect() as db:
        E.set_scores(db, fid, "bertscore", [(r["model"], r["item_key"], -1.0) for r in rows], bertscore_model=default_name)
    rescored = EV.evaluate(fid, Recorder(), batch_size=BATCH, bootstrap=200, bertscore_model=str(folder))
    with connect() as db:
        after = E.answers(db, fid)
    assert rescored["answered_now"] == {"base": 0, "tuned": 0} and rescored["bertscore_model"] == T.bertscore_model_name(folder)
    assert [r["answer"] for r in after] == [r["answer"] for r in rows]
    assert [r["bertscore"] for r in after] == pytest.approx([r["bertscore"] for r in rows], abs=1e-4)
    assert {r["bertscore_model"] for r in after} == {T.bertscore_model_name(folder)} != {default_name}
    assert rescored["metrics"]["rouge_l"] == summary["metrics"]["rouge_l"]


def test_answers_of_an_interrupted_attempt_at_other_settings_are_not_mixed_with_new_ones(memo_model, capitals):
    """No summary is written before an evaluation finishes: the settings check used to read only the summary, so a
    cancelled first attempt at T=0.7 left answers that a T=0.1 evaluation then reused as its own."""
    fid = finetuned(memo_model, capitals)
    with pytest.raises(Cancelled):
        EV.evaluate(fid, Recorder(cancel_in="base answers"), temperature=0.7, batch_size=BATCH, bootstrap=50)
    with connect() as db:
        assert E.get_evaluation(db, fid) is None and E.answered_keys(db, fid, "base")
    with pytest.raises(ConfigError, match=r"other settings \(temperature 0.7 -> 0.1\).*--fresh"):
        EV.evaluate(fid, Recorder(), batch_size=BATCH, bootstrap=50)
    done = EV.evaluate(fid, Recorder(), temperature=0.7, batch_size=BATCH, bootstrap=50)  # the same settings resume
    assert done["answered_now"]["base"] == len(held_out(fid)) - BATCH


def test_a_cancel_keeps_its_batch_and_the_rerun_answers_only_the_rest(memo_model, capitals, monkeypatch):
    import ka2l.models.llm as llm

    fid = finetuned(memo_model, capitals)
    keys = held_out(fid)
    assert len(keys) > BATCH
    with pytest.raises(Cancelled):
        EV.evaluate(fid, Recorder(cancel_in="base answers"), batch_size=BATCH, bootstrap=50)
    with connect() as db:
        assert len(E.answered_keys(db, fid, "base")) == BATCH and not E.answered_keys(db, fid, "tuned")
        first = {r["item_key"]: r["answer"] for r in E.answers(db, fid, "base")}
    asked: list[int] = []
    real = llm.generate_answers
    monkeypatch.setattr(llm, "generate_answers", lambda lm, prompts, *a, **k: asked.append(len(prompts)) or real(lm, prompts, *a, **k))
    progress = Recorder()
    summary = EV.evaluate(fid, progress, batch_size=BATCH, bootstrap=50)
    assert ("base answers", len(keys), BATCH) in progress.stages
    assert summary["answered_now"] == {"base": len(keys) - BATCH, "tuned": len(keys)}
    assert sum(asked) == 2 * len(keys) - BATCH
    with connect() as db:
        assert {k: a for k, a in ((r["item_key"], r["answer"]) for r in E.answers(db, fid, "base")) if k in first} == first


def test_base_answers_while_training_runs_and_tuned_refused_until_it_finished(memo_model, capitals):
    fid = finetuned(memo_model, capitals)
    with connect() as db:
        S.update_finetune(db, fid, status="training")
    with pytest.raises(ConfigError, match="is training, so it has no tuned model.*--model base"):
        EV.evaluate(fid, batch_size=BATCH, bootstrap=50)
    with connect() as db:  # refused before any model answered
        assert not E.answered_keys(db, fid, "base")
    summary = EV.evaluate(fid, batch_size=BATCH, bootstrap=50, models=("base",))
    assert set(summary["metrics"]["meteor"]) == {"base"} and summary["answered_now"] == {"base": len(held_out(fid))}
    with pytest.raises(ConfigError, match="is training, so it has no tuned model.*Finish it first"):
        EV.evaluate(fid, batch_size=BATCH, bootstrap=50)
    with connect() as db:  # the base answers survive the refusal
        assert len(E.answered_keys(db, fid, "base")) == len(held_out(fid)) and not E.answered_keys(db, fid, "tuned")
    with pytest.raises(ConfigError, match="models must be some of base, tuned"):
        EV.evaluate(fid, models=("merged",))


def test_cli_evaluate_prints_the_summary_and_the_table(memo_model, capitals, capsys):
    from ka2l.cli.main import main

    fid = finetuned(memo_model, capitals)
    assert main(["evaluate", "--finetune", str(fid), "--bootstrap", "50", "--batch-size", str(BATCH), "--table", "-q"]) == 0
    out = capsys.readouterr().out
    assert f"fine-tune {fid}: {len(held_out(fid))} held-out questions" in out and "all-MiniLM-L6-v2" in out
    assert "METEOR" in out and "BERTScore" in out and out.count("  tuned: [") == len(held_out(fid))
    assert main(["evaluate", "--finetune", "999", "-q"]) == 2
    assert "No fine-tune 999" in capsys.readouterr().err
