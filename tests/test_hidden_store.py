"""Hidden states stored one file per layer (ka2l.store.hidden): round trip, a layer read from its own
file alone, runs stored before (one .npy) opening and resuming as they are, Stage 1 and triage writing the
new layout with the same probes and maps as a single-file copy, and the size told and checked before a
run starts."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

from ka2l.config import TriageConfig
from ka2l.errors import Cancelled, StoreError
from ka2l.paths import arrays_dir
from ka2l.probing.stage1 import run_stage1, run_triage
from ka2l.store import queries as Q
from ka2l.store.arrays import create_array
from ka2l.store.db import connect
from ka2l.store.hidden import HiddenStates, estimate_bytes, format_bytes, hidden_dir, layer_file
from helpers import CancelAfter, import_pool, stage1_cfg


def _states(n=10, layers=4, dim=8, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, layers, dim)).astype(np.float16)


def _written(folder: Path, states: np.ndarray, layers=None) -> HiddenStates:
    n, n_layers, dim = states.shape
    store = HiddenStates.create(folder, n, layers or list(range(n_layers)), dim, meta={"run_id": 7, "model": "tiny"})
    half = n // 2
    store.write(list(range(half, n)), states[half:])  # out of order, as a resume writes
    store.write(list(range(half)), states[:half])
    store.flush()
    return store


def _mapped_files(folder: Path) -> set[str]:
    """Names of the files under ``folder`` this process has memory-mapped."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {Path(line.split()[-1]).name for line in lines if line.split()[-1].startswith(str(folder.resolve()))}


def test_round_trip_one_file_per_layer(tmp_path):
    states = _states()
    folder = tmp_path / "run-7-hidden"
    _written(folder, states).close()
    assert sorted(p.name for p in folder.iterdir()) == ["layer-000.npy", "layer-001.npy", "layer-002.npy", "layer-003.npy", "meta.json"]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["layers"] == [0, 1, 2, 3] and meta["shape"] == [10, 4, 8] and meta["dtype"] == "float16"
    assert (meta["run_id"], meta["model"]) == (7, "tiny")
    for l in range(4):  # each file is a plain (n, hidden) .npy of its layer
        np.testing.assert_array_equal(np.load(layer_file(folder, l)), states[:, l])

    store = HiddenStates.open(folder)
    assert store.shape == (10, 4, 8) and store.layers == (0, 1, 2, 3) and len(store) == 10 and store.dtype == np.float16
    assert not store.legacy and HiddenStates.exists(folder)
    np.testing.assert_array_equal(np.asarray(store), states)
    np.testing.assert_array_equal(store.layer(2), states[:, 2])
    np.testing.assert_array_equal(store[:, 3], states[:, 3])
    np.testing.assert_array_equal(store[[2, 5], 1], states[[2, 5], 1])
    np.testing.assert_array_equal(store[[2, 5]], states[[2, 5]])
    np.testing.assert_array_equal(store[3], states[3])
    np.testing.assert_array_equal(store[:, 1:3], states[:, 1:3])
    np.testing.assert_array_equal(store[:4, :, 5], states[:4, :, 5])
    with pytest.raises(StoreError, match="read-only"):
        store.write([0], states[:1])
    with pytest.raises(StoreError, match="not stored"):
        store.layer(4)
    again = HiddenStates.open(folder, mode="r+")
    with pytest.raises(StoreError, match=r"shape \(1, 3, 8\)"):
        again.write([0], states[:1, :3])
    with pytest.raises(StoreError, match="outside the 10 rows"):
        again.write([10], states[:1])


def test_a_layer_is_read_from_its_own_file_alone(tmp_path):
    states = _states()
    folder = tmp_path / "h"
    _written(folder, states).close()
    layer_file(folder, 1).write_bytes(b"not an array")  # damaged
    layer_file(folder, 3).unlink()  # lost
    store = HiddenStates.open(folder)
    np.testing.assert_array_equal(store.layer(2), states[:, 2])
    np.testing.assert_array_equal(store[:, 0], states[:, 0])
    with pytest.raises(StoreError, match="layer 3.*missing"):
        store.layer(3)
    with pytest.raises(StoreError, match="layer 1.*cannot be read"):
        store.layer(1)
    assert not HiddenStates.exists(folder), "a store missing a layer file is incomplete (its run recomputes it)"


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs /proc to see which files are mapped")
def test_reading_a_layer_maps_that_file_and_no_other(tmp_path):
    folder = tmp_path / "h"
    _written(folder, _states(seed=1)).close()
    assert _mapped_files(folder) == set()
    store = HiddenStates.open(folder)
    x = store.layer(2)
    assert _mapped_files(folder) == {"layer-002.npy"}
    assert float(np.abs(x.astype(np.float32)).sum()) > 0


def test_a_single_file_store_opens_with_identical_values_and_takes_writes(tmp_path):
    """Runs stored before per-layer files: (n, L+1, hidden) in one .npy, its sidecar naming layer 0
    (Stage 1) or the one layer kept (triage)."""
    states = _states()
    arr = create_array(tmp_path / "run-3-hidden.npy", states.shape, meta={"run_id": 3, "layer0": "embeddings"})
    arr[:] = states
    arr.flush()
    old = HiddenStates.open(tmp_path / "run-3-hidden.npy")
    assert old.legacy and old.shape == (10, 4, 8) and old.layers == (0, 1, 2, 3) and HiddenStates.exists(old.path)
    np.testing.assert_array_equal(np.asarray(old), states)
    for l in range(4):
        np.testing.assert_array_equal(old.layer(l), states[:, l])
        np.testing.assert_array_equal(old[:, l], states[:, l])
    np.testing.assert_array_equal(old[[1, 4], 2], states[[1, 4], 2])

    tri = create_array(tmp_path / "run-4-hidden.npy", (10, 1, 8), meta={"run_id": 4, "layers": [2]})
    tri[:] = states[:, 2:3]
    tri.flush()
    triage = HiddenStates.open(tmp_path / "run-4-hidden.npy")
    assert triage.layers == (2,)
    np.testing.assert_array_equal(triage.layer(2), states[:, 2])
    with pytest.raises(StoreError, match="Layer 0 is not stored"):
        triage.layer(0)

    w = HiddenStates.open(tmp_path / "run-3-hidden.npy", mode="r+")
    w.write([0], np.zeros((1, 4, 8), np.float16))
    w.flush()
    assert not np.load(tmp_path / "run-3-hidden.npy")[0].any(), "a resumed old run writes its own file"
    with pytest.raises(StoreError, match="missing"):
        HiddenStates.open(tmp_path / "run-9-hidden.npy")


def test_estimate_bytes_of_the_issue_example():
    size = estimate_bytes(10_000_000, 32, 4096)  # fp16
    assert size == 10_000_000 * 32 * 4096 * 2 == 2_621_440_000_000
    assert format_bytes(size) == "2.6 TB"
    assert estimate_bytes(5, 3, 7, "float32") == 5 * 3 * 7 * 4
    assert [format_bytes(b) for b in (0, 999, 81_920, 5_300_000_000)] == ["0 B", "999 B", "82 kB", "5.3 GB"]
    with pytest.raises(StoreError, match="whole number"):
        estimate_bytes(-1, 32, 4096)
    with pytest.raises(StoreError, match="int8"):
        estimate_bytes(1, 1, 1, "int8")


def test_stage1_writes_one_file_per_layer_with_the_probes_and_maps_of_a_single_file_copy(memo_model, capitals):
    from ka2l.probing.probes import probe_layers
    from ka2l.probing.report import build_report, format_report
    from ka2l.views import maps, tables

    import_pool(capitals)
    cfg = stage1_cfg(memo_model)
    run_id = run_stage1("caps", cfg)
    with connect() as db:
        run = Q.get_run(db, run_id)
        probe = Q.list_probes(db, run_id)[0]
        stored_layers = Q.probe_layers(db, probe["id"])
        bise = np.array([s["bise"] for s in Q.load_scores(db, run_id)])
        text = format_report(build_report(db, run_id))
    folder = Path(run["hidden_path"])
    assert folder == hidden_dir(run_id) and folder.is_dir()
    assert sorted(p.name for p in folder.glob("layer-*.npy")) == [f"layer-00{i}.npy" for i in range(4)]
    assert json.loads((folder / "meta.json").read_text())["layers"] == [0, 1, 2, 3]
    store = HiddenStates.open(folder)
    assert store.shape == (80, 4, 64) and np.abs(np.asarray(store, dtype=np.float32)).sum(axis=(1, 2)).min() > 0
    assert f"80 questions × 4 layers × 64 × float16 (2 B) = {format_bytes(80 * 4 * 64 * 2)}, one file per layer in {folder}" in text

    # the same states as one (n, L+1, hidden) file, as runs were stored before
    legacy_path = arrays_dir() / f"run-{run_id}-hidden.npy"
    arr = create_array(legacy_path, store.shape, meta={"run_id": run_id, "layer0": "embeddings"})
    arr[:] = np.asarray(store)
    arr.flush()
    legacy = HiddenStates.open(legacy_path)
    # the run's stored per-layer probe results are what the single file gives
    again = probe_layers(legacy, bise, cfg.probe)
    assert again.best_layer == probe["layer"]
    for got, want in zip(again.layers, stored_layers, strict=True):
        assert got.layer == want["layer"]
        assert got.val_auroc == pytest.approx(want["val_auroc"], abs=1e-9) and got.test_auroc == pytest.approx(want["test_auroc"], abs=1e-9)
    new = probe_layers(store, bise, cfg.probe, kind="logistic")
    old = probe_layers(legacy, bise, cfg.probe, kind="logistic")
    assert [vars(s) for s in new.layers] == [vars(s) for s in old.layers]
    np.testing.assert_array_equal(new.test_scores, old.test_scores)

    layer = probe["layer"]
    xy_new, p_new = maps.run_projection(run_id, layer, "pca"), tables.probe_scores(run, probe)
    maps.cache_path(run_id, layer, "pca").unlink()
    with connect() as db:
        Q.update_run(db, run_id, hidden_path=str(legacy_path))
        run_old = Q.get_run(db, run_id)
    np.testing.assert_array_equal(maps.run_projection(run_id, layer, "pca"), xy_new)
    np.testing.assert_array_equal(tables.probe_scores(run_old, probe), p_new)

    # triage keeps the probe's layer alone, in a folder holding that layer's file
    import_pool(capitals, name="fresh", rows=capitals[:20] + capitals[60:])
    t_id = run_triage("fresh", TriageConfig(probe_id=probe["id"], device="cpu"))
    with connect() as db:
        t_run = Q.get_run(db, t_id)
    assert sorted(p.name for p in Path(t_run["hidden_path"]).iterdir()) == [f"layer-{layer:03d}.npy", "meta.json"]
    np.testing.assert_allclose(HiddenStates.open(t_run["hidden_path"]).layer(layer)[:20].astype(np.float32),
                               store.layer(layer)[:20].astype(np.float32), atol=2e-2)


def test_a_run_stored_as_one_file_resumes_into_that_file(memo_model, capitals):
    """A run interrupted before per-layer storage existed (its states in one .npy, some rows done)
    resumes into that file: the missing rows are computed there, none is left as zeros, no folder appears."""
    import_pool(capitals, rows=capitals[:24])
    cfg = stage1_cfg(memo_model)
    with pytest.raises(Cancelled):
        run_stage1("caps", cfg, progress=CancelAfter("hidden states", 8))
    with connect() as db:
        run = Q.list_runs(db)[0]
        assert len(Q.hidden_done_ids(db, run["id"])) == 8
    folder = Path(run["hidden_path"])
    partial = np.asarray(HiddenStates.open(folder))
    legacy_path = arrays_dir() / f"run-{run['id']}-hidden.npy"
    arr = create_array(legacy_path, partial.shape, meta={"run_id": run["id"], "layer0": "embeddings"})
    arr[:] = partial  # rows 8.. are zeros, not marked done
    arr.flush()
    del arr
    shutil.rmtree(folder)
    with connect() as db:
        Q.update_run(db, run["id"], hidden_path=str(legacy_path))

    with pytest.raises(Cancelled):
        run_stage1("caps", cfg, progress=CancelAfter("answers", 8))
    with connect() as db:
        resumed = Q.get_run(db, run["id"])
        assert len(Q.hidden_done_ids(db, run["id"])) == 24
    assert resumed["hidden_path"] == str(legacy_path) and not folder.exists()
    kept = np.array(HiddenStates.open(legacy_path))
    assert kept.shape == (24, 4, 64) and np.abs(kept.astype(np.float32)).sum(axis=(1, 2)).min() > 0, "no row left as zeros"
    np.testing.assert_array_equal(kept[:8], partial[:8])

    with pytest.raises(Cancelled):  # a new run computes the same states into its own folder
        run_stage1("caps", cfg, progress=CancelAfter("answers", 1), resume=False)
    with connect() as db:
        fresh = Q.list_runs(db)[-1]
    np.testing.assert_allclose(np.asarray(HiddenStates.open(fresh["hidden_path"]), dtype=np.float32), kept.astype(np.float32), atol=2e-2)


def test_stage1_refuses_a_disk_too_small_before_loading_the_model(memo_model, capitals, monkeypatch):
    import ka2l.probing.stage1 as stage1
    import ka2l.store.hidden as hidden
    from ka2l.probing.storage import stage1_hidden_size

    import_pool(capitals)
    cfg = stage1_cfg(memo_model)
    size = stage1_hidden_size("caps", cfg)  # from the model's config alone: 3 decoder layers + embeddings, 64 wide
    assert (size.n_questions, size.n_layers, size.hidden_size, size.total) == (80, 4, 64, 80 * 4 * 64 * 2) and size.fits
    assert "80 questions × 4 layers × 64 × float16 (2 B) = 41 kB" in size.describe()

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(hidden.shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))

    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded when its states cannot be stored")

    monkeypatch.setattr(stage1, "load_model", no_load)
    assert not stage1_hidden_size("caps", cfg).fits
    with pytest.raises(StoreError) as exc:
        run_stage1("caps", cfg)
    msg = str(exc.value)
    assert "Not enough disk space" in msg and "41 kB" in msg and "1.0 kB free" in msg and "KA2L_DATA_DIR" in msg, msg
    with connect() as db:
        run = Q.list_runs(db)[0]
    assert run["status"] == "failed" and run["hidden_path"] is None and not hidden_dir(run["id"]).exists()


def test_probe_page_states_the_size_before_launch(memo_model, capitals):
    from ka2l import settings
    from helpers import open_page

    import_pool(capitals)
    settings.save({**settings.load(), "model": str(memo_model)})
    at = open_page("probe")
    notes = [c.value for c in at.caption if "Hidden states:" in c.value]
    assert len(notes) == 1 and "80 questions × 4 layers × 64 × float16 (2 B) = 41 kB, one file per layer" in notes[0], notes
