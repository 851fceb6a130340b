"""The RQ experiment end to end on the tiny memorising Llama: a real Stage 1 run, two strategies at one
budget, real LoRA fine-tunes and evaluations, a report whose comparisons are computed from the cells, and
a cancel after the first cell that resumes without redoing it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ka2l import job_plans
from ka2l.cli.main import main
from ka2l.config import EXPERIMENT_STRATEGIES, ExperimentConfig, FinetuneConfig, from_dict, to_dict
from ka2l.errors import Cancelled, ConfigError
from ka2l.finetune import data as D
from ka2l.finetune import evaluate as EV
from ka2l.finetune import experiment as X
from ka2l.finetune import experiment_report as R
from ka2l.finetune import selection as SEL
from ka2l.probing.stage1 import run_stage1
from ka2l.progress import PhaseTracker
from ka2l.store import evaluation as E
from ka2l.store import experiment as SX
from ka2l.store import finetune as SF
from ka2l.store import queries as Q
from ka2l.store.db import connect
from helpers import N_KNOWN, data_dir, import_pool, private_copy, stage1_cfg

FT = FinetuneConfig(source="gold", gold_set="all", device="cpu", dtype="float32", epochs=1.0, batch_size=4, grad_accum=1, max_length=96,
                    lr=2e-3, lr_scheduler="constant", eval_every=50, checkpoint_every=50, patience=0)


def cfg(**kw) -> ExperimentConfig:
    base = dict(strategies=("random", "ka2l-unknown"), budgets=(0.5,), seeds=(0,), test_share=0.3, bootstrap=200, eval_batch_size=8,
                finetune=FT)
    return ExperimentConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def stage1_store(tmp_path_factory, memo_model, capitals):
    """A finished Stage 1 run on 30 capitals, 15 the model memorised (known) and 15 it did not."""
    folder = tmp_path_factory.mktemp("experiment")
    with data_dir(folder):
        import_pool(capitals[N_KNOWN - 15 : N_KNOWN + 15])
        run_stage1("caps", stage1_cfg(memo_model))
    return folder


@pytest.fixture
def store(stage1_store, tmp_path, monkeypatch):
    return private_copy(stage1_store, tmp_path, monkeypatch)


class CancelAfter:
    """Progress that cancels as cell number ``cells + 1`` starts (as a job's cancel flag is checked at a stage)."""

    def __init__(self, cells: int):
        self.cells, self.stages = cells, []

    def stage(self, name, total=None, done=0):
        self.stages.append(name)
        if sum(s.endswith(": selecting") for s in self.stages) > self.cells:
            raise Cancelled("stop after a cell")

    def advance(self, n=1, message=None):
        pass

    def close(self):
        pass


def tuned_values(finetune_id: int, metric: str = "rouge_l") -> dict[str, float]:
    with connect() as db:
        return {r["item_key"]: r[metric] for r in E.answers(db, finetune_id, "tuned")}


def test_registry_and_config_agree_on_the_strategies():
    assert tuple(SEL.STRATEGIES) == EXPERIMENT_STRATEGIES
    with pytest.raises(ConfigError, match="patience"):
        cfg(finetune=FinetuneConfig(source="gold", patience=3))
    with pytest.raises(ConfigError, match="Choose one of: random"):
        cfg(strategies=("random", "uncertainty"))
    with pytest.raises(ConfigError, match="budgets"):
        cfg(budgets=(0.5, 1.5))
    assert from_dict(ExperimentConfig, json.loads(json.dumps(to_dict(cfg())))) == cfg()


def test_a_file_split_column_fixes_the_split_and_item_keys_key_the_rows(store, tmp_path):
    path = tmp_path / "cell.jsonl"
    rows = [{"item_key": f"q:{i}", "question": f"Q{i}?", "answer": f"A{i}", "split": "eval" if i < 2 else "train"} for i in range(6)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ds = D.build("caps", FinetuneConfig(source="file", file=str(path), device="cpu", eval_share=0.5))
    assert sorted(p.item_key for p in ds.eval) == ["q:0", "q:1"] and len(ds.train) == 4
    path.write_text("\n".join(json.dumps({**r, "split": "test" if i == 3 else r["split"]}) for i, r in enumerate(rows)))
    with pytest.raises(ConfigError, match="row\\(s\\) 4 have a split other than train or eval"):
        D.build("caps", FinetuneConfig(source="file", file=str(path), device="cpu"))


def test_cells_that_select_the_same_items_in_another_order_share_one_data_file(tmp_path, monkeypatch):
    """Every strategy at 100 % selects the whole pool, each in its own ranking; they must train one fine-tune, not seven."""
    monkeypatch.setenv("KA2L_DATA_DIR", str(tmp_path))
    rows = [{"item_key": f"question:{i}", "question": f"Q{i}?", "answer": f"A{i}", "split": "train"} for i in (3, 1, 2)]
    test = [{"item_key": "question:9", "question": "Q9?", "answer": "A9", "split": "eval"}]
    one, other = X._cell_file(1, rows + test), X._cell_file(1, test + rows[::-1])
    assert one == other and len(list(one.parent.glob("data-*.jsonl"))) == 1
    assert [json.loads(line)["item_key"] for line in one.read_text().splitlines()] == ["question:9", "question:1", "question:2", "question:3"]
    assert X._cell_file(1, rows[:2] + test) != one  # another selection is another file


def test_the_experiment_runs_reports_from_its_cells_and_resumes_after_a_cancel_and_a_failure(store, capsys, monkeypatch):
    c = cfg()
    with pytest.raises(Cancelled):
        X.run_experiment("caps", c, progress=CancelAfter(cells=1))
    with connect() as db:
        exp = SX.list_experiments(db)[0]
        first, second = SX.cells(db, exp["id"])
        n_finetunes = len(SF.list_finetunes(db))
        first_ft = SF.get_finetune(db, first["finetune_id"])
    assert exp["status"] == "interrupted" and first["status"] == "done" and second["status"] == "interrupted"
    assert n_finetunes == 1 and second["finetune_id"] is None

    # the test split: fixed, held out of every selection, and the eval split of every fine-tune
    test = set(exp["test_keys"])
    assert 5 <= len(test) <= 14 and exp["n_pool"] == 30 - len(test)
    assert first["n"] == X.budget_size(0.5, exp["n_pool"]) == len(first["selected"]) and not test & set(first["selected"])

    def broken(*a, **k):
        raise RuntimeError("evaluation died")

    with monkeypatch.context() as m, pytest.raises(RuntimeError):
        m.setattr(EV, "evaluate", broken)  # the second cell dies after its fine-tune finished
        X.run_experiment("caps", c)
    with connect() as db:
        failed = SX.get_cell(db, second["id"])
        exp_row = SX.get_experiment(db, exp["id"])
        trained = SF.get_finetune(db, failed["finetune_id"])
    assert failed["status"] == "failed" and "evaluation died" in failed["error"] and exp_row["status"] == "failed"
    assert trained["status"] == "done"

    recorder = CancelAfter(cells=99)
    eid = X.run_experiment("caps", c, progress=recorder)  # resumes: the finished cell is kept as it is
    assert eid == exp["id"]
    with connect() as db:
        again = {cell["id"]: cell for cell in SX.cells(db, eid)}
        finetunes = SF.list_finetunes(db)
        scores = {s["question_id"]: s["bise"] for s in Q.load_scores(db, exp["run_id"])}
        data = {f["id"]: SF.load_data(db, f["id"]) for f in finetunes}
    kept = again[first["id"]]
    assert (kept["finetune_id"], kept["finished_at"], kept["selected"]) == (first["finetune_id"], first["finished_at"], first["selected"])
    assert len(finetunes) == 2 and all(cell["status"] == "done" for cell in again.values())
    assert again[second["id"]]["finetune_id"] == trained["id"]  # the second cell's fine-tune was reused, not trained again
    reused = next(f for f in finetunes if f["id"] == trained["id"])
    assert (reused["step"], reused["seconds"], reused["adapter_dir"]) == (trained["step"], trained["seconds"], trained["adapter_dir"])
    resumed_ft = next(f for f in finetunes if f["id"] == first["finetune_id"])
    assert (resumed_ft["step"], resumed_ft["seconds"], resumed_ft["adapter_dir"]) == (first_ft["step"], first_ft["seconds"], first_ft["adapter_dir"])
    # its tuned answers were kept; the untuned model's answers were added beside them (the report's base row)
    assert {m: e["tuned"] for m, e in resumed_ft["evaluation"]["metrics"].items()} == {m: e["tuned"] for m, e in first_ft["evaluation"]["metrics"].items()}
    assert resumed_ft["evaluation"]["models"] == ["base", "tuned"] and "delta" in resumed_ft["evaluation"]["metrics"]["rouge_l"]
    for f in finetunes:
        assert {r["item_key"] for r in data[f["id"]] if r["split"] == "eval"} == test
        assert not {r["item_key"] for r in data[f["id"]] if r["split"] == "train"} & test
    unknown_cell = next(cell for cell in again.values() if cell["strategy"] == "ka2l-unknown")
    random_cell = next(cell for cell in again.values() if cell["strategy"] == "random")
    picked_unknown = [scores[int(k[2:])] for k in unknown_cell["selected"]]
    non_test_unknown = sum(b for q, b in scores.items() if f"q:{q}" not in test)
    assert sum(picked_unknown) == min(non_test_unknown, len(picked_unknown))  # the unknowns first

    # the report's comparison is computed from the cells' per-question scores
    rep = R.build_report(eid)
    u, r = tuned_values(unknown_cell["finetune_id"]), tuned_values(random_cell["finetune_id"])
    assert set(u) == set(r) == test
    (cmp,) = rep["rq2"]["comparisons"]
    assert (cmp["strategy"], cmp["versus"], cmp["budget"]) == ("ka2l-unknown", "random", 0.5)
    assert cmp["delta"]["value"] == pytest.approx(np.mean([u[k] - r[k] for k in test]))
    assert cmp["delta"]["lo"] <= cmp["delta"]["value"] <= cmp["delta"]["hi"]
    assert cmp["delta"]["excludes_zero"] == (cmp["delta"]["lo"] > 0 or cmp["delta"]["hi"] < 0)
    row = next(t for t in rep["table"] if t["strategy"] == "random")
    assert row["value"] == pytest.approx(np.mean(list(r.values()))) and row["n"] == random_cell["n"]
    # the untuned model on the same test split: a row, a flat line, and each cell's paired difference from it
    with connect() as db:
        base = {a["item_key"]: a["rouge_l"] for a in E.answers(db, first["finetune_id"], "base")}
    assert set(base) == test and rep["base"]["finetune_id"] == first["finetune_id"]
    assert rep["base"]["value"] == pytest.approx(np.mean(list(base.values())))
    assert row["vs_base"]["value"] == pytest.approx(np.mean([r[k] - base[k] for k in test]))
    assert {f["value"] for f in rep["frame"] if f["strategy"] == R.BASE_NAME} == {rep["base"]["value"]}
    assert rep["frame"] and {f["strategy"] for f in rep["frame"]} == {"random", "ka2l-unknown", R.BASE_NAME}
    assert not rep["rq1"]["available"] and not rep["rq3"]["available"]
    assert "budget 1 (all the data)" in rep["rq1"]["why"]  # 0.5 is this grid's largest budget, not all the data
    assert "did not include ka2l-augmented" in rep["rq3"]["why"]  # says why, not just "no cells"
    costs = {c["strategy"]: c for c in rep["costs"]}
    assert costs["ka2l-unknown"]["one_off_seconds"] > costs["random"]["one_off_seconds"] == 0  # SE sampling counts for KA2L
    assert costs["random"]["finetune_seconds"] > 0
    text = R.render_report(rep)
    assert f"{cmp['delta']['value']:.2f}" in text and "RQ2" in text and f"| {R.BASE_NAME} | 0 | 0 | {rep['base']['value']:.2f} |" in text

    assert X.run_experiment("caps", c) == eid  # a finished experiment is reused, nothing trains again
    with connect() as db:
        assert len(SF.list_finetunes(db)) == 2
    # another experiment (here: one strategy) whose cell selects the same pairs finds the finished fine-tune,
    # though its data file lies in its own folder
    other = X.run_experiment("caps", cfg(strategies=("random",)))
    with connect() as db:
        (cell,) = SX.cells(db, other)
        assert other != eid and cell["finetune_id"] == random_cell["finetune_id"] and len(SF.list_finetunes(db)) == 2
        db.execute("UPDATE finetunes SET config_hash = 'stored-before-the-key' WHERE id = ?", [random_cell["finetune_id"]])
    third = X.run_experiment("caps", cfg(strategies=("random",), bootstrap=150))  # a fine-tune stored under an older key is found too
    with connect() as db:
        (cell,) = SX.cells(db, third)
        assert cell["finetune_id"] == random_cell["finetune_id"] and len(SF.list_finetunes(db)) == 2

    # a background job's plan names the stages the run reports: every stage lands in a planned phase
    tracker = PhaseTracker(job_plans.plan("experiment", {"pool": "caps", "experiment": to_dict(c)}))
    planned = [p["name"] for p in tracker.phases]
    for name in recorder.stages:
        tracker.stage(name)
    assert [p["name"] for p in tracker.phases] == planned, "a stage matched no planned phase"
    assert any(p["name"] == "random @ 0.5 seed 0" and p["status"] != "pending" for p in tracker.phases)

    # the command line prints the same report
    assert main(["experiment-report", "--experiment", str(eid), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rq2"] == json.loads(json.dumps(R.build_report(eid)["rq2"]))
    assert main(["experiment-report", "--list"]) == 0
    listed = capsys.readouterr().out
    assert f"experiment {eid}: pool" in listed and "done · 2/2 cells done" in listed


def test_the_command_line_builds_the_config_and_refuses_bad_input(store, capsys):
    from ka2l.cli.experiment import config_from_args
    from ka2l.cli.main import build_parser

    args = build_parser().parse_args(["experiment", "--pool", "caps", "--strategies", "random", "coreset", "--budgets", "0.25", "1",
                                      "--seeds", "0", "1", "--preset", "cpu-small", "--epochs", "2", "--device", "cpu"])
    got = config_from_args(args)
    assert (got.strategies, got.budgets, got.seeds) == (("random", "coreset"), (0.25, 1.0), (0, 1))
    assert got.finetune.epochs == 2.0 and got.finetune.patience == 0 and got.finetune.lr == 2e-4  # the preset, early stopping off
    assert main(["experiment", "--pool", "caps", "--budgets", "0"]) == 2
    assert "budgets must be distinct shares in (0, 1]" in capsys.readouterr().err
    assert main(["experiment-report", "--experiment", "7"]) == 2
    assert "No experiment 7" in capsys.readouterr().err


def approve_candidates(pool_id: int, run_id: int, rows: list[dict]) -> list[int]:
    """Decoded candidates stored as Stage 2 stores them (a decoder, a generation batch), with decisions."""
    from ka2l.store import augment as SA

    with connect() as db:
        probe = Q.list_probes(db, run_id)[0]
        decoder = SA.create_decoder(db, {"probe_id": probe["id"], "run_id": run_id, "pool_id": pool_id, "layer": probe["layer"], "pooling": "mean",
                                         "backbone": "test", "config": {}, "config_hash": "d", "status": "done"})
        gen, _ = SA.start_generation(db, decoder, pool_id, {}, "g")
        SA.insert_candidates(db, [{"generation_id": gen, "pool_id": pool_id, "sample": i, "noise": 0.1, "raw_text": r["text"], "status": "kept",
                                   **r} for i, r in enumerate(rows)])
        return [c["id"] for c in SA.candidates(db, pool_id, status=None)]


def test_augmented_cells_take_approved_decoded_questions_but_none_that_paraphrase_a_test_question(store):
    from ka2l.progress import NullProgress

    c = cfg(strategies=("ka2l-augmented",), augmented_share=0.5)
    with connect() as db:
        pool_id = Q.get_pool(db, "caps")["id"]
        run = D.resolve_run(db, pool_id, 0)
        questions = Q.pool_questions(db, pool_id)
    keys = [f"q:{q['id']}" for q in questions]
    test = X.test_split(keys, c.test_share, c.test_seed)
    inside = [q for q in questions if f"q:{q['id']}" not in test]
    held = [q for q in questions if f"q:{q['id']}" in test]
    ids = approve_candidates(pool_id, run["id"], [
        {"source_question_id": inside[0]["id"], "text": "Which city is the capital there?", "decision": "approved", "p_unknown": 0.9},
        {"source_question_id": held[0]["id"], "text": "Paraphrase of a test question?", "decision": "approved", "p_unknown": 0.99},
        {"source_question_id": inside[1]["id"], "nearest_question_id": held[1]["id"], "text": "Close to a test question?",
         "decision": "approved", "p_unknown": 0.95},
        {"source_question_id": inside[2]["id"], "text": "Still waiting for review?", "decision": "pending", "p_unknown": 0.97}])
    sel_pool, inputs = X.load_inputs(pool_id, run, c, NullProgress())
    assert sel_pool.extra_keys == tuple(f"c:{i}" for i in ids[:3])  # approved ones only
    assert inputs["texts"][f"c:{ids[0]}"] == ("Which city is the capital there?", inside[0]["answers"][0])  # the source's gold answer
    picked = X.select_cell({"strategy": "ka2l-augmented", "n": 6, "seed": 0}, sel_pool, inputs, test)
    assert f"c:{ids[0]}" in picked and not {f"c:{i}" for i in ids[1:]} & set(picked) and not test & set(picked)
    assert len(picked) == 6


def test_prompt_entropy_is_one_forward_pass_stored_once_and_timed(store, monkeypatch):
    import torch

    from ka2l.config import Stage1Config
    from ka2l.models import llm
    from ka2l.store.experiment import prompt_entropies

    with connect() as db:
        pool_id = Q.get_pool(db, "caps")["id"]
        run = D.resolve_run(db, pool_id, 0)
        questions = Q.pool_questions(db, pool_id)
    stage1 = from_dict(Stage1Config, run["config"])
    got = X.ensure_prompt_entropies(run["id"], questions[:5], batch_size=2)
    lm = llm.load_model(stage1.model)
    prompt = llm.build_prompt(lm.tokenizer, questions[3]["question"], stage1.prompt)
    ids = lm.tokenizer(prompt, return_tensors="pt", add_special_tokens=not prompt.startswith(lm.tokenizer.bos_token or "\0"))
    with torch.no_grad():
        p = torch.softmax(lm.model(**ids).logits[0, -1].float(), -1)
    assert got[questions[3]["id"]] == pytest.approx(float(-(p * p.log()).sum()), rel=1e-4, abs=1e-5)  # padded batch = alone
    assert len({round(v, 6) for v in got.values()}) > 1

    def no_model(*a, **k):
        raise AssertionError("stored entropies were computed again")

    monkeypatch.setattr(llm, "load_model", no_model)
    assert X.ensure_prompt_entropies(run["id"], questions[:5]) == got  # resumable: nothing recomputed
    with connect() as db:
        assert prompt_entropies(db, run["id"]) == got
        assert Q.get_run(db, run["id"])["timings"]["prompt_entropy"]["n"] == 5


def planted_experiment(per_question: dict[tuple[str, float], list[float]], n: dict[float, int], seconds: dict[str, float]) -> int:
    """An experiment whose cells are done, with the given tuned ROUGE-L per test question, stored as the
    experiment stores them (no training: the report reads only rows)."""
    from ka2l.store.db import now

    n_test = len(next(iter(per_question.values())))
    c = cfg(strategies=tuple(dict.fromkeys(s for s, _ in per_question)), budgets=tuple(sorted({b for _, b in per_question})))
    with connect() as db:
        pool_id = Q.get_pool(db, "caps")["id"]
        run = D.resolve_run(db, pool_id, 0)
        questions = Q.pool_questions(db, pool_id)[:n_test]
        keys = [f"q:{q['id']}" for q in questions]
        eid = SX.create_experiment(db, {"pool_id": pool_id, "run_id": run["id"], "config": to_dict(c), "config_hash": "planted",
                                        "test_keys": keys, "n_pool": max(n.values()), "status": "done", "inputs": {"device": "cpu"}})
        SX.ensure_cells(db, eid, [{"strategy": s, "budget": b, "seed": 0, "n": n[b]} for s, b in per_question])
        for cell in SX.cells(db, eid):
            fid = SF.create_finetune(db, {"pool_id": pool_id, "run_id": run["id"], "config": {}, "config_hash": f"{cell['id']}",
                                          "model": "m", "data_source": "file", "dataset_hash": "d", "n_train": cell["n"], "n_eval": n_test,
                                          "status": "done"})
            SF.save_data(db, fid, [{"item_key": k, "split": "eval", "question": q["question"], "answer": "a", "origin": "file"}
                                   for k, q in zip(keys, questions)])
            values = per_question[(cell["strategy"], cell["budget"])]
            E.add_answers(db, fid, "tuned", [{"item_key": k, "question": "q", "gold": "a", "answer": "a", "correct": int(v > 50),
                                              "bleu": v, "rouge_l": v, "meteor": v, "bertscore": v} for k, v in zip(keys, values)])
            SX.update_cell(db, cell["id"], status="done", finetune_id=fid, finished_at=now())
            SX.add_cell_seconds(db, cell["id"], "finetune_seconds", seconds[cell["strategy"]] * cell["n"])
    return eid


def test_the_report_answers_rq1_to_rq3_from_the_cells(store):
    rng = np.random.default_rng(0)
    noise = {k: rng.normal(0, 2, 20) for k in range(4)}
    unknown_half = 50 + noise[2]
    planted = {("random", 0.5): 30 + noise[0], ("random", 1.0): 40 + noise[1], ("ka2l-unknown", 0.5): unknown_half,
               ("ka2l-unknown", 1.0): 40 + noise[3], ("ka2l-augmented", 0.5): unknown_half + np.tile([0.5, -0.5], 10)}
    eid = planted_experiment({k: list(v) for k, v in planted.items()}, {0.5: 10, 1.0: 20}, {"random": 1.0, "ka2l-unknown": 1.0,
                                                                                              "ka2l-augmented": 1.0})
    rep = R.build_report(eid)
    with connect() as db:
        timings = Q.get_run(db, rep["run_id"])["timings"]
    se_cost = sum(timings[k]["seconds"] for k in ("hidden", "answers", "scores", "probes"))

    rq1 = rep["rq1"]
    assert rq1["available"] and (rq1["ka2l"]["budget"], rq1["full"]["strategy"], rq1["full"]["budget"]) == (0.5, "random", 1.0)
    assert rq1["delta"]["value"] == pytest.approx(np.mean(planted[("ka2l-unknown", 0.5)] - planted[("random", 1.0)]))
    assert rq1["delta"]["excludes_zero"] and rq1["verdict"] == "better"
    assert rq1["annotation_ratio"] == 0.5 and rq1["finetune_compute_ratio"] == pytest.approx(0.5)
    assert rq1["compute_ratio"] == pytest.approx((se_cost + 10.0) / 20.0)  # the SE sampling and probes count against KA2L

    rq2 = {r["budget"]: r for r in rep["rq2"]["comparisons"]}
    assert set(rq2) == {0.5, 1.0} and all(r["versus"] == "random" for r in rq2.values())
    assert rq2[0.5]["verdict"] == "better" and rq2[0.5]["delta"]["value"] == pytest.approx(np.mean(unknown_half - planted[("random", 0.5)]))
    one = np.mean(planted[("ka2l-unknown", 1.0)] - planted[("random", 1.0)])
    assert rq2[1.0]["delta"]["value"] == pytest.approx(one)
    assert rep["rq2"]["wins"] == 1 + (rq2[1.0]["verdict"] == "better") and rep["rq2"]["losses"] == (rq2[1.0]["verdict"] == "worse")

    (rq3,) = rep["rq3"]["comparisons"]
    assert (rq3["strategy"], rq3["versus"], rq3["budget"]) == ("ka2l-augmented", "ka2l-unknown", 0.5)
    assert rq3["delta"]["value"] == pytest.approx(0.0, abs=1e-9) and not rq3["delta"]["excludes_zero"]
    assert rq3["verdict"] == "no difference the interval can tell from zero"

    frame = {(f["strategy"], f["budget"]): f for f in rep["frame"]}
    assert set(frame) == set(planted) and frame[("random", 0.5)]["value"] == pytest.approx(np.mean(planted[("random", 0.5)]))
    assert all(f["lo"] <= f["value"] <= f["hi"] for f in frame.values())
    costs = {c["strategy"]: c for c in rep["costs"]}
    assert costs["ka2l-unknown"]["annotations"] == 30 and costs["ka2l-unknown"]["one_off_seconds"] == pytest.approx(se_cost)
    text = R.render_report(rep)
    assert f"Difference {rq1['delta']['value']:.2f}" in text and "x0.50" in text and "RQ3" in text
    assert R.build_report(eid, metric="correct")["rq1"]["delta"]["value"] == pytest.approx(100 * np.mean(
        (planted[("ka2l-unknown", 0.5)] > 50).astype(int) - (planted[("random", 1.0)] > 50).astype(int)))


def test_a_cell_costs_its_fine_tunes_own_training_time_even_when_it_reused_it(store):
    """A cell that found its fine-tune trained (same data and settings in an earlier experiment) spends seconds on
    loading, not training: the cost side must still count the training, or reused cells look almost free."""
    planted = {("random", 0.5): [40.0] * 6, ("ka2l-unknown", 0.5): [45.0] * 6}
    eid = planted_experiment(planted, {0.5: 10}, {"random": 0.1, "ka2l-unknown": 0.1})  # 1 s of cell wall time each
    with connect() as db:
        cells = {c["strategy"]: c for c in SX.cells(db, eid)}
        SF.add_seconds(db, cells["random"]["finetune_id"], 321.0)  # trained for 321 s (before this experiment reused it)
    rep = R.build_report(eid)
    rows = {r["strategy"]: r for r in rep["table"]}
    costs = {c["strategy"]: c for c in rep["costs"]}
    assert rows["random"]["finetune_seconds"] == pytest.approx(321.0) and costs["random"]["finetune_seconds"] == pytest.approx(321.0)
    assert rows["ka2l-unknown"]["finetune_seconds"] == pytest.approx(1.0)  # no training time recorded: the cell's own seconds
