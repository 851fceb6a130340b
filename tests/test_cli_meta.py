"""The command line (help, errors, import) and the project's own rules: import boundaries, config
help, no import-time side effects."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from ka2l.cli import build_parser, main
from ka2l.config import ALL_CONFIGS, ProbeConfig, SamplingConfig, Stage1Config, config_hash, field_help, from_dict, to_dict
from ka2l.errors import ConfigError
from ka2l.paths import PROJECT_ROOT


def test_every_command_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"import", "probe", "triage", "report", "pools", "runs", "setup-model"} <= set(commands)
    for name, sub in commands.items():
        assert sub.description or sub.format_help()
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"{name} --{action.dest} has no help"


def test_every_config_field_has_help():
    for cls in ALL_CONFIGS:
        for name, text in field_help(cls).items():
            assert text.strip(), f"{cls.__name__}.{name} has no help"


def test_config_round_trip_and_validation():
    cfg = Stage1Config(sampling=SamplingConfig(k=4, stop=("\n",)), probe=ProbeConfig(kind="logistic"))
    assert from_dict(Stage1Config, to_dict(cfg)) == cfg
    assert config_hash(cfg) == config_hash(from_dict(Stage1Config, to_dict(cfg)))
    assert config_hash(cfg) != config_hash(Stage1Config())
    with pytest.raises(ConfigError, match="has no setting colour. Allowed"):
        from_dict(SamplingConfig, {"colour": 1})
    with pytest.raises(ConfigError, match="k must be >= 2"):
        SamplingConfig(k=1)
    with pytest.raises(ConfigError, match="mlp, logistic, llama-mlp"):
        ProbeConfig(kind="svm")
    with pytest.raises(ConfigError, match="sum"):
        ProbeConfig(split=(0.5, 0.2, 0.1))


def test_cli_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert main(["import", str(tmp_path / "missing.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "p.csv").write_text("query\nwhat?\n")
    assert main(["import", str(tmp_path / "p.csv")]) == 2
    assert "Rename 'query' to 'question'" in capsys.readouterr().err
    assert main(["probe", "--pool", "nothing-here"]) == 2
    assert "No pool 'nothing-here'" in capsys.readouterr().err
    assert main(["report"]) == 2
    assert "No finished stage1 run" in capsys.readouterr().err
    assert main(["probe", "--pool", "x", "--k", "1"]) == 2
    assert "k must be >= 2" in capsys.readouterr().err
    assert main(["probe", "--pool", "x", "--config", str(tmp_path / "none.json")]) == 2
    assert "Cannot read --config" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{sampling: 3}")
    assert main(["probe", "--pool", "x", "--config", str(tmp_path / "bad.json")]) == 2
    assert "not valid JSON (line 1" in capsys.readouterr().err
    (tmp_path / "cfg.json").write_text('{"sampling": {"temprature": 0.5}}')
    assert main(["probe", "--pool", "x", "--config", str(tmp_path / "cfg.json")]) == 2
    assert "SamplingConfig has no setting temprature" in capsys.readouterr().err


def test_cli_import_and_pools(capsys):
    assert main(["import", "demo:elements", "--limit", "30", "--name", "el"]) == 0
    assert "imported pool 'el'" in capsys.readouterr().out
    assert main(["import", "demo:elements", "--limit", "30", "--name", "el", "--if-missing"]) == 0
    assert "already imported" in capsys.readouterr().out
    assert main(["import", "demo:elements", "--name", "el"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["pools"]) == 0
    assert "el" in capsys.readouterr().out


# -- architecture rules (ARCHITECTURE.md) --------------------------------------------------------

def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def module_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


PAGES_DIR = PROJECT_ROOT / "app_pages"


def page_files() -> list[Path]:
    files = sorted(PAGES_DIR.glob("*.py"))
    assert len(files) >= 7, f"expected the app's pages in {PAGES_DIR}"
    return files


def test_no_streamlit_pages_folder():
    # A folder named pages/ beside app.py switches Streamlit into its old multipage mode until some
    # session runs app.py: a page opened by URL right after a restart then runs without the app's
    # navigation and sidebar. The pages live in app_pages/ and are routed by st.navigation.
    assert not (PROJECT_ROOT / "pages").exists()


HEAVY = {"torch", "transformers", "peft", "label_studio_sdk", "sqlite3", "sqlite_utils"}


def test_pages_and_app_import_no_heavy_or_storage_libraries():
    for path in [PROJECT_ROOT / "app.py", *page_files()]:
        assert not imports_of(path) & HEAVY, f"{path.name} imports {imports_of(path) & HEAVY}"


def test_backend_never_imports_streamlit():
    for path in (PROJECT_ROOT / "ka2l").rglob("*.py"):
        if "ui" in path.relative_to(PROJECT_ROOT / "ka2l").parts:
            continue
        assert "streamlit" not in imports_of(path), f"{path} imports streamlit"


def test_light_modules_do_not_import_torch_at_import_time():
    light = ["config.py", "errors.py", "progress.py", "paths.py", "entropy.py", "pool.py", "report.py", "store/db.py",
             "store/queries.py", "store/migrations.py", "store/arrays.py", "store/stage2.py", "review.py", "candidates.py",
             "decoder_train.py", "metrics.py", "cli_augment.py"]
    for rel in light:
        assert not module_level_imports(PROJECT_ROOT / "ka2l" / rel) & {"torch", "transformers", "peft"}, rel


def test_importing_ka2l_has_no_side_effects(tmp_path):
    code = ("import sys, ka2l, ka2l.cli, ka2l.pipeline, ka2l.probes, ka2l.llm, ka2l.judges, ka2l.report, ka2l.candidates, "
            "ka2l.decoder_train, ka2l.review, ka2l.cli_augment, ka2l.metrics; "
            "heavy = [m for m in ('torch', 'transformers', 'streamlit') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(PROJECT_ROOT), "KA2L_DATA_DIR": str(tmp_path / "d"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", "importing ka2l must not load torch/transformers/streamlit"
    assert not (tmp_path / "d").exists(), "importing ka2l must not touch the data folder"


PAGE_ALLOWED = {"ka2l.ui", "ka2l.config", "ka2l.errors", "ka2l.store.queries", "ka2l.jobs"}


def ka2l_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ka2l":
            found |= {node.module} if node.module != "ka2l" else {f"ka2l.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "ka2l"}
    return found


def test_pages_reach_the_backend_only_through_allowed_modules():
    for path in [PROJECT_ROOT / "app.py", *page_files()]:
        bad = {m for m in ka2l_imports(path) if not any(m == a or m.startswith(a + ".") for a in PAGE_ALLOWED)}
        assert not bad, f"{path.name} imports {bad}; go through ka2l.ui instead"
        assert "import sqlite" not in path.read_text() and "SELECT " not in path.read_text(), f"{path.name} holds SQL"


def test_every_page_is_routed_and_tested():
    routed = set(__import__("re").findall(r'st\.Page\("app_pages/(\w+)\.py"', (PROJECT_ROOT / "app.py").read_text()))
    assert routed == {p.stem for p in page_files()}
    tests = (PROJECT_ROOT / "tests" / "test_app.py").read_text()
    for page in routed - {"pool"}:
        assert f'"{page}"' in tests or f"app_pages/{page}.py" in tests, f"page {page} has no AppTest"
