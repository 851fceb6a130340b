"""The schema, as an ordered list of migrations. Never edit a shipped migration: append one.

Each migration runs inside one transaction together with the bump of ``PRAGMA user_version``, so
a crash mid-migration leaves the database at the previous version.
"""

from __future__ import annotations

import sqlite3

MIGRATIONS: list[str] = [
    # 1: pools, questions, Stage 1 runs and everything they produce, probes, predictions, jobs.
    """
    CREATE TABLE pools (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        source TEXT NOT NULL,
        created_at TEXT NOT NULL,
        n_questions INTEGER NOT NULL,
        has_answers INTEGER NOT NULL,
        report TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE questions (
        id INTEGER PRIMARY KEY,
        pool_id INTEGER NOT NULL REFERENCES pools(id) ON DELETE CASCADE,
        idx INTEGER NOT NULL,
        ext_id TEXT NOT NULL,
        question TEXT NOT NULL,
        answers TEXT NOT NULL DEFAULT '[]',
        metadata TEXT NOT NULL DEFAULT '{}',
        UNIQUE (pool_id, idx),
        UNIQUE (pool_id, ext_id)
    );
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        pool_id INTEGER NOT NULL REFERENCES pools(id) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        config TEXT NOT NULL,
        config_hash TEXT NOT NULL,
        model TEXT NOT NULL,
        status TEXT NOT NULL,
        stage TEXT,
        error TEXT,
        n_layers INTEGER,
        hidden_size INTEGER,
        hidden_path TEXT,
        threshold TEXT,
        versions TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        timings TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX runs_resume ON runs (pool_id, kind, config_hash, status);
    CREATE TABLE hidden_done (
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        question_id INTEGER NOT NULL REFERENCES questions(id) ON DELETE CASCADE,
        PRIMARY KEY (run_id, question_id)
    );
    CREATE TABLE answers (
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        question_id INTEGER NOT NULL REFERENCES questions(id) ON DELETE CASCADE,
        kind TEXT NOT NULL CHECK (kind IN ('low', 'sample')),
        sample_idx INTEGER NOT NULL,
        text TEXT NOT NULL,
        token_logprobs TEXT NOT NULL,
        seq_logprob REAL NOT NULL,
        PRIMARY KEY (run_id, question_id, kind, sample_idx)
    );
    CREATE TABLE clusters (
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        question_id INTEGER NOT NULL REFERENCES questions(id) ON DELETE CASCADE,
        cluster_ids TEXT NOT NULL,
        n_clusters INTEGER NOT NULL,
        judge_calls INTEGER NOT NULL,
        verdicts TEXT NOT NULL,
        PRIMARY KEY (run_id, question_id)
    );
    CREATE TABLE scores (
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        question_id INTEGER NOT NULL REFERENCES questions(id) ON DELETE CASCADE,
        se REAL NOT NULL,
        se_weighted REAL NOT NULL,
        regular_entropy REAL NOT NULL,
        mean_loglik REAL NOT NULL,
        correct INTEGER,
        bise INTEGER,
        PRIMARY KEY (run_id, question_id)
    );
    CREATE TABLE probes (
        id INTEGER PRIMARY KEY,
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        target TEXT NOT NULL,
        layer INTEGER NOT NULL,
        path TEXT NOT NULL,
        config TEXT NOT NULL,
        metrics TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE probe_layers (
        probe_id INTEGER NOT NULL REFERENCES probes(id) ON DELETE CASCADE,
        layer INTEGER NOT NULL,
        val_auroc REAL,
        test_auroc REAL,
        test_ci_low REAL,
        test_ci_high REAL,
        test_auroc_correct REAL,
        PRIMARY KEY (probe_id, layer)
    );
    CREATE TABLE predictions (
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        probe_id INTEGER NOT NULL REFERENCES probes(id) ON DELETE CASCADE,
        question_id INTEGER NOT NULL REFERENCES questions(id) ON DELETE CASCADE,
        p_unknown REAL NOT NULL,
        label INTEGER NOT NULL,
        layer INTEGER NOT NULL,
        PRIMARY KEY (run_id, probe_id, question_id)
    );
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        config TEXT NOT NULL,
        status TEXT NOT NULL,
        stage TEXT,
        done INTEGER NOT NULL DEFAULT 0,
        total INTEGER,
        message TEXT,
        pid INTEGER,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        result TEXT,
        created_at TEXT NOT NULL,
        started_at TEXT,
        finished_at TEXT
    );
    """,
    # 2: a per-run JSON summary (e.g. triage's distribution-shift check).
    """
    ALTER TABLE runs ADD COLUMN summary TEXT NOT NULL DEFAULT '{}';
    """,
    # 3: job progress timing and logs, app settings, the curation set.
    """
    ALTER TABLE jobs ADD COLUMN stage_started_at REAL;
    ALTER TABLE jobs ADD COLUMN stage_start_done INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN updated_at TEXT;
    ALTER TABLE jobs ADD COLUMN log_path TEXT;
    CREATE INDEX jobs_status ON jobs (status, id);
    CREATE TABLE settings (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE curation (
        pool_id INTEGER NOT NULL REFERENCES pools(id) ON DELETE CASCADE,
        question_id INTEGER NOT NULL REFERENCES questions(id) ON DELETE CASCADE,
        source TEXT NOT NULL,
        added_at TEXT NOT NULL,
        PRIMARY KEY (pool_id, question_id)
    );
    """,
    # 4: Stage 2: decoders, their loss curves, generation batches, candidates and review decisions.
    """
    CREATE TABLE decoders (
        id INTEGER PRIMARY KEY,
        probe_id INTEGER NOT NULL REFERENCES probes(id) ON DELETE CASCADE,
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        pool_id INTEGER NOT NULL REFERENCES pools(id) ON DELETE CASCADE,
        layer INTEGER NOT NULL,
        pooling TEXT NOT NULL,
        backbone TEXT NOT NULL,
        config TEXT NOT NULL,
        config_hash TEXT NOT NULL,
        status TEXT NOT NULL,
        step INTEGER NOT NULL DEFAULT 0,
        total_steps INTEGER,
        train_seconds REAL NOT NULL DEFAULT 0,
        n_train INTEGER,
        n_heldout INTEGER,
        path TEXT,
        metrics TEXT NOT NULL DEFAULT '{}',
        versions TEXT NOT NULL DEFAULT '{}',
        error TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE decoder_losses (
        decoder_id INTEGER NOT NULL REFERENCES decoders(id) ON DELETE CASCADE,
        step INTEGER NOT NULL,
        epoch INTEGER NOT NULL,
        loss REAL NOT NULL,
        PRIMARY KEY (decoder_id, step)
    );
    CREATE TABLE generations (
        id INTEGER PRIMARY KEY,
        decoder_id INTEGER NOT NULL REFERENCES decoders(id) ON DELETE CASCADE,
        pool_id INTEGER NOT NULL REFERENCES pools(id) ON DELETE CASCADE,
        config TEXT NOT NULL,
        config_hash TEXT NOT NULL,
        status TEXT NOT NULL,
        summary TEXT NOT NULL DEFAULT '{}',
        seconds REAL NOT NULL DEFAULT 0,
        error TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE candidates (
        id INTEGER PRIMARY KEY,
        generation_id INTEGER NOT NULL REFERENCES generations(id) ON DELETE CASCADE,
        pool_id INTEGER NOT NULL REFERENCES pools(id) ON DELETE CASCADE,
        source_question_id INTEGER NOT NULL REFERENCES questions(id) ON DELETE CASCADE,
        sample INTEGER NOT NULL,
        noise REAL NOT NULL,
        raw_text TEXT NOT NULL,
        text TEXT NOT NULL,
        status TEXT NOT NULL,
        drop_reason TEXT,
        p_unknown REAL,
        flagged_known INTEGER,
        nearest_question_id INTEGER REFERENCES questions(id) ON DELETE SET NULL,
        nearest_similarity REAL,
        vector BLOB,
        decision TEXT NOT NULL DEFAULT 'pending',
        edited_text TEXT,
        decided_at TEXT,
        created_at TEXT NOT NULL
    );
    CREATE INDEX candidates_queue ON candidates (pool_id, status, decision, id);
    CREATE INDEX candidates_generation ON candidates (generation_id, source_question_id);
    CREATE TABLE review_log (
        id INTEGER PRIMARY KEY,
        action_id INTEGER NOT NULL,
        pool_id INTEGER NOT NULL,
        candidate_id INTEGER NOT NULL REFERENCES candidates(id) ON DELETE CASCADE,
        before_decision TEXT NOT NULL,
        before_text TEXT,
        after_decision TEXT NOT NULL,
        after_text TEXT,
        at TEXT NOT NULL
    );
    CREATE INDEX review_log_action ON review_log (pool_id, action_id);
    """,
    # 5: whole-job progress: the job's phases with their stages (JSON), the overall fraction, the share
    #    already done when the worker started (resumed work) and when it started reporting.
    """
    ALTER TABLE jobs ADD COLUMN phases TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE jobs ADD COLUMN fraction REAL NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN credited REAL NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN progress_started_at REAL;
    """,
    # 6: a curator's edit of a candidate is re-probed: P(unknown) and the nearest pool question of the
    #    edited text, one row per (candidate, text), so an undone edit finds its values again.
    """
    CREATE TABLE candidate_edits (
        candidate_id INTEGER NOT NULL REFERENCES candidates(id) ON DELETE CASCADE,
        text TEXT NOT NULL,
        p_unknown REAL NOT NULL,
        flagged_known INTEGER NOT NULL,
        nearest_question_id INTEGER REFERENCES questions(id) ON DELETE SET NULL,
        nearest_similarity REAL,
        vector BLOB,
        probed_at TEXT NOT NULL,
        PRIMARY KEY (candidate_id, text)
    );
    """,
    # 7: the Label Studio round trip. A project ka2l created on a server (by URL; the token is never
    #    stored here), the link of each pushed question / candidate to its task (``item_key`` 'q:<question
    #    id>' or 'c:<candidate id>', also written into the task's data so a lost link can be rebuilt from
    #    the server), and every annotation pulled back, several per task allowed.
    """
    CREATE TABLE ls_projects (
        id INTEGER PRIMARY KEY,
        pool_id INTEGER NOT NULL REFERENCES pools(id) ON DELETE CASCADE,
        url TEXT NOT NULL,
        project_id INTEGER NOT NULL,
        title TEXT NOT NULL,
        label_config_hash TEXT NOT NULL,
        created_at TEXT NOT NULL,
        pushed_at TEXT,
        pulled_at TEXT,
        UNIQUE (url, project_id)
    );
    CREATE TABLE ls_tasks (
        project INTEGER NOT NULL REFERENCES ls_projects(id) ON DELETE CASCADE,
        item_key TEXT NOT NULL,
        question_id INTEGER REFERENCES questions(id) ON DELETE SET NULL,
        candidate_id INTEGER REFERENCES candidates(id) ON DELETE SET NULL,
        task_id INTEGER NOT NULL,
        rank INTEGER,
        question TEXT NOT NULL,
        pushed_at TEXT NOT NULL,
        PRIMARY KEY (project, item_key),
        UNIQUE (project, task_id)
    );
    CREATE TABLE ls_annotations (
        project INTEGER NOT NULL REFERENCES ls_projects(id) ON DELETE CASCADE,
        annotation_id INTEGER NOT NULL,
        task_id INTEGER NOT NULL,
        annotator TEXT,
        answer TEXT,
        cannot_answer INTEGER NOT NULL DEFAULT 0,
        skipped INTEGER NOT NULL DEFAULT 0,
        lead_time REAL,
        created_at TEXT,
        updated_at TEXT,
        pulled_at TEXT NOT NULL,
        PRIMARY KEY (project, annotation_id)
    );
    CREATE INDEX ls_annotations_task ON ls_annotations (project, task_id);
    """,
    # 8: Stage 3b. A LoRA fine-tune of a run's model on (question, answer) pairs: its config, data, split,
    #    progress (a loss row per logged step, train and eval), where its adapter lives; then both models'
    #    answers to the held-out questions with per-question metrics, and the Stage 1 re-run with the adapter.
    """
    CREATE TABLE finetunes (
        id INTEGER PRIMARY KEY,
        pool_id INTEGER NOT NULL REFERENCES pools(id) ON DELETE CASCADE,
        run_id INTEGER REFERENCES runs(id) ON DELETE SET NULL,
        config TEXT NOT NULL,
        config_hash TEXT NOT NULL,
        model TEXT NOT NULL,
        data_source TEXT NOT NULL,
        dataset_hash TEXT NOT NULL,
        n_train INTEGER NOT NULL,
        n_eval INTEGER NOT NULL,
        status TEXT NOT NULL,
        step INTEGER NOT NULL DEFAULT 0,
        total_steps INTEGER,
        best_eval_loss REAL,
        stopped_early INTEGER NOT NULL DEFAULT 0,
        adapter_dir TEXT,
        seconds REAL NOT NULL DEFAULT 0,
        versions TEXT NOT NULL DEFAULT '{}',
        evaluation TEXT,
        reprobe_run_id INTEGER REFERENCES runs(id) ON DELETE SET NULL,
        error TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        UNIQUE (pool_id, config_hash, dataset_hash)
    );
    CREATE TABLE finetune_log (
        finetune_id INTEGER NOT NULL REFERENCES finetunes(id) ON DELETE CASCADE,
        step INTEGER NOT NULL,
        split TEXT NOT NULL,
        loss REAL NOT NULL,
        lr REAL,
        tokens_per_s REAL,
        at TEXT NOT NULL,
        PRIMARY KEY (finetune_id, step, split)
    );
    CREATE TABLE finetune_data (
        finetune_id INTEGER NOT NULL REFERENCES finetunes(id) ON DELETE CASCADE,
        item_key TEXT NOT NULL,
        split TEXT NOT NULL,
        question TEXT NOT NULL,
        answer TEXT NOT NULL,
        origin TEXT NOT NULL,
        PRIMARY KEY (finetune_id, item_key)
    );
    CREATE TABLE finetune_answers (
        finetune_id INTEGER NOT NULL REFERENCES finetunes(id) ON DELETE CASCADE,
        model TEXT NOT NULL,
        item_key TEXT NOT NULL,
        question TEXT NOT NULL,
        gold TEXT NOT NULL,
        answer TEXT NOT NULL,
        correct INTEGER,
        bleu REAL,
        rouge_l REAL,
        meteor REAL,
        bertscore REAL,
        PRIMARY KEY (finetune_id, model, item_key)
    );
    """,
    # 9: the RQ1-RQ3 experiment. The next-token entropy of each prompt (the Entropy / BADGE baselines;
    #    Stage 1 does not keep logits), an experiment (its config, fixed test split, status) and one row
    #    per strategy x budget x seed cell: what it selected, its fine-tune, its metrics and seconds.
    """
    CREATE TABLE prompt_entropy (
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        question_id INTEGER NOT NULL REFERENCES questions(id) ON DELETE CASCADE,
        entropy REAL NOT NULL,
        PRIMARY KEY (run_id, question_id)
    );
    CREATE TABLE experiments (
        id INTEGER PRIMARY KEY,
        pool_id INTEGER NOT NULL REFERENCES pools(id) ON DELETE CASCADE,
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        config TEXT NOT NULL,
        config_hash TEXT NOT NULL,
        test_keys TEXT NOT NULL DEFAULT '[]',
        n_pool INTEGER NOT NULL DEFAULT 0,
        inputs TEXT NOT NULL DEFAULT '{}',
        status TEXT NOT NULL,
        error TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        UNIQUE (pool_id, run_id, config_hash)
    );
    CREATE TABLE experiment_cells (
        id INTEGER PRIMARY KEY,
        experiment_id INTEGER NOT NULL REFERENCES experiments(id) ON DELETE CASCADE,
        strategy TEXT NOT NULL,
        budget REAL NOT NULL,
        seed INTEGER NOT NULL,
        n INTEGER NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending',
        selected TEXT NOT NULL DEFAULT '[]',
        finetune_id INTEGER REFERENCES finetunes(id) ON DELETE SET NULL,
        metrics TEXT,
        select_seconds REAL NOT NULL DEFAULT 0,
        finetune_seconds REAL NOT NULL DEFAULT 0,
        eval_seconds REAL NOT NULL DEFAULT 0,
        error TEXT,
        started_at TEXT,
        finished_at TEXT,
        UNIQUE (experiment_id, strategy, budget, seed)
    );
    """,
    # 10: each evaluation answer says how it was made (``made_with``: temperature and seed, JSON) and which model
    #     scored its BERTScore, so a resumed or repeated evaluation never mixes settings, even when the first
    #     attempt was interrupted before its summary was written. NULL on rows stored before.
    """
    ALTER TABLE finetune_answers ADD COLUMN made_with TEXT;
    ALTER TABLE finetune_answers ADD COLUMN bertscore_model TEXT;
    """,
]


def current_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the database to the latest schema; returns the version reached."""
    version = current_version(conn)
    if version > len(MIGRATIONS):
        from ..errors import StoreError

        raise StoreError(f"Database schema version {version} is newer than this ka2l knows ({len(MIGRATIONS)}). Upgrade ka2l.")
    for number in range(version + 1, len(MIGRATIONS) + 1):
        # executescript would COMMIT implicitly; run statements one by one inside one transaction.
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _statements(MIGRATIONS[number - 1]):
                conn.execute(stmt)
            conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except Exception:
            conn.execute("ROLLBACK")
            raise
    return current_version(conn)


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
