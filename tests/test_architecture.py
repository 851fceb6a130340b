"""The project's own rules, as tests: the layout by stage, import boundaries, no import cycles, no
import-time side effects, config help, and what pages may touch (ARCHITECTURE.md).

The whiteboard (one line per layer; a layer may import itself and the layers above it):

    base      config errors device paths progress jobs launcher metrics settings   store (jobs and settings keep their rows there)
    models    llm, embedded                                                 base
    pools     reader, sources, quizfiles                                    base
    store     db, migrations, queries, arrays, curation, per-stage tables   base (errors, paths), never jobs or settings
    probing   Stage 1                                                       base, models, pools, store
    augment   Stage 2                                                       ... and probing
    annotate  Stage 3a                                                      ... and augment
    finetune  Stage 3b                                                      ... and annotate
    scale     past one machine                                              ... and every stage
    views     what pages show                                               every stage, never ui or cli
    cli       the command line                                              everything but ui
    ui        the only Streamlit importer                                   everything but cli
    app.py, app_pages/*   streamlit, ka2l.ui, ka2l.config, ka2l.errors, ka2l.jobs
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from ka2l.config import ALL_CONFIGS, field_help
from ka2l.paths import PROJECT_ROOT

PKG = PROJECT_ROOT / "ka2l"
BASE = {"__init__", "__main__", "config", "errors", "device", "paths", "progress", "jobs", "job_plans", "launcher", "metrics", "settings"}
FOUNDATION = ["models", "pools", "store"]
STAGES = ["probing", "augment", "annotate", "finetune", "scale"]  # in the method's order: a stage may use earlier ones
TOP = ["views", "cli", "ui"]


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name: ka2l.probing.stage1 -> its file."""
    found = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def ka2l_imports(name: str, path: Path, module_level_only: bool = False) -> set[str]:
    """The ka2l modules `name` imports, relative imports resolved (a `from pkg import mod` names the module)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    nodes = tree.body if module_level_only else ast.walk(tree)
    known = modules()
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("ka2l"):
                continue
            subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known}
            found |= subs or {target}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ka2l")}
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in BASE:
        return "base"
    return parts[1]


def allowed_layers(of: str) -> set[str]:
    if of == "base":
        return {"base", "store"}
    if of == "store":
        return {"store", "ka2l", "ka2l.errors", "ka2l.paths"}
    if of in FOUNDATION:
        return {"base", of}
    if of in STAGES:
        return {"base", *FOUNDATION, *STAGES[: STAGES.index(of) + 1]}
    if of == "views":
        return {"base", *FOUNDATION, *STAGES, "views"}
    return {"base", *FOUNDATION, *STAGES, "views", of}  # cli and ui: everything but each other


def test_root_holds_only_base_modules_and_every_package_is_known():
    root = {p.stem for p in PKG.glob("*.py")}
    assert root == BASE, f"ka2l/ root should hold only the base modules; move {sorted(root - BASE)} into a package"
    packages = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(FOUNDATION + STAGES + TOP), f"unknown package(s) {packages - set(FOUNDATION + STAGES + TOP)}: add them to the rules"
    assert {"models", "pools", "probing", "augment", "store", "views", "cli", "ui"} <= packages


def test_layers_import_only_what_the_whiteboard_allows():
    mods = modules()
    assert len(mods) >= 40, "the rules must see every module"
    bad = []
    for name, path in mods.items():
        me = layer(name)
        if name == "ka2l.__main__":
            continue  # the entry point: `python -m ka2l` runs the command line
        # base's job runner dispatches to the stages, lazily inside functions; at import time base is self-contained
        deps = ka2l_imports(name, path, module_level_only=(me == "base"))
        bad += [f"{name} -> {d}" for d in deps if layer(d) not in allowed_layers(me) and d not in allowed_layers(me)]
    assert not bad, "imports against the layering rules:\n" + "\n".join(bad)


def test_the_rules_catch_a_violation(tmp_path):
    # the checker itself, on modules written to break the rules: a store module importing Stage 1, and
    # a Stage 1 module importing the ui (relative imports resolved as they would be in the package)
    bad_store = tmp_path / "bad_store.py"
    bad_store.write_text("from ..probing import stage1\nfrom .db import connect\n")
    found = ka2l_imports("ka2l.store.bad_store", bad_store)
    assert "ka2l.probing.stage1" in found and "ka2l.store.db" in found
    assert [d for d in found if layer(d) not in allowed_layers("store")] == ["ka2l.probing.stage1"]
    bad_stage = tmp_path / "bad_stage.py"
    bad_stage.write_text("def f():\n    from ..ui import data\n")
    found = ka2l_imports("ka2l.probing.bad_stage", bad_stage)
    assert found == {"ka2l.ui.data"} and layer("ka2l.ui.data") not in allowed_layers("probing")
    assert ka2l_imports("ka2l.probing.bad_stage", bad_stage, module_level_only=True) == set()


def test_no_import_cycles():
    mods = modules()
    graph = {n: {d for d in ka2l_imports(n, p, module_level_only=True) if d in mods and d != n} for n, p in mods.items()}
    for n in list(graph):  # importing a.b first imports package a
        graph[n] -= {n.rsplit(".", 1)[0]} if "." in n else set()
    seen, stack, cycles = set(), [], []

    def visit(n):
        if n in stack:
            cycles.append(stack[stack.index(n):] + [n])
            return
        if n in seen:
            return
        seen.add(n)
        stack.append(n)
        for d in sorted(graph[n]):
            visit(d)
        stack.pop()

    for n in sorted(graph):
        visit(n)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


# -- third-party boundaries ----------------------------------------------------------------------

def third_party(path: Path, module_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in (tree.body if module_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


ADAPTERS = {"label_studio_sdk": "ka2l.annotate.labelstudio", "peft": "ka2l.finetune", "trl": "ka2l.finetune",
            "ray": "ka2l.scale", "streamlit": "ka2l.ui", "vllm": "ka2l.models.vllm_backend"}


def test_each_sdk_is_imported_by_its_adapter_only():
    for name, path in modules().items():
        for lib in third_party(path) & set(ADAPTERS):
            assert name.startswith(ADAPTERS[lib]), f"{name} imports {lib}; only {ADAPTERS[lib]} may"


def test_vllm_is_imported_by_its_backend_alone_and_only_when_used():
    """vLLM takes seconds to import and its PyPI wheel is a CUDA build: ka2l.models.vllm_backend imports it
    inside the functions that build and drive the engine, never at module level."""
    backend = modules()["ka2l.models.vllm_backend"]
    assert "vllm" in third_party(backend) and "vllm" not in third_party(backend, module_level_only=True)


def test_light_modules_do_not_import_torch_at_import_time():
    heavy = {"torch", "transformers", "peft", "trl"}
    light = [n for n in modules() if layer(n) in {"base", "store", "pools", "views", "cli"}] + [
        "ka2l.probing.entropy", "ka2l.probing.report", "ka2l.augment.review", "ka2l.augment.candidates", "ka2l.augment.train", "ka2l.augment.steps",
        "ka2l.probing.runs"]
    mods = modules()
    for name in light:
        assert not third_party(mods[name], module_level_only=True) & heavy, name


TORCH_MODULES = {"ka2l.augment.decoder"}  # defines torch.nn modules, so importing it loads torch (nothing else does)


def test_importing_ka2l_has_no_side_effects(tmp_path):
    names = ", ".join(n for n in modules() if not n.startswith("ka2l.ui") and n not in TORCH_MODULES | {"ka2l.__main__"})
    code = (f"import sys, {names}; "
            "heavy = [m for m in ('torch', 'transformers', 'streamlit') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(PROJECT_ROOT), "KA2L_DATA_DIR": str(tmp_path / "d"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", "importing ka2l must not load torch/transformers/streamlit"
    assert not (tmp_path / "d").exists(), "importing ka2l must not touch the data folder"


def test_every_config_field_has_help():
    for cls in ALL_CONFIGS:
        for name, text in field_help(cls).items():
            assert text.strip(), f"{cls.__name__}.{name} has no help"


# -- pages ---------------------------------------------------------------------------------------

PAGES_DIR = PROJECT_ROOT / "app_pages"
HEAVY = {"torch", "transformers", "peft", "trl", "label_studio_sdk", "sqlite3", "sqlite_utils"}
PAGE_ALLOWED = {"ka2l.ui", "ka2l.config", "ka2l.errors", "ka2l.jobs"}


def page_files() -> list[Path]:
    files = sorted(PAGES_DIR.glob("*.py"))
    routed = set(re.findall(r'st\.Page\("app_pages/(\w+)\.py"', (PROJECT_ROOT / "app.py").read_text()))
    assert routed == {p.stem for p in files}, "every file in app_pages/ is a routed page, and every routed page exists"
    return files


def test_no_streamlit_pages_folder():
    # A folder named pages/ beside app.py switches Streamlit into its old multipage mode until some
    # session runs app.py: a page opened by URL right after a restart then runs without the app's
    # navigation and sidebar. The pages live in app_pages/ and are routed by st.navigation.
    assert not (PROJECT_ROOT / "pages").exists()


def test_pages_import_no_heavy_or_storage_libraries():
    for path in [PROJECT_ROOT / "app.py", *page_files()]:
        assert not third_party(path) & HEAVY, f"{path.name} imports {third_party(path) & HEAVY}"


def test_pages_reach_the_backend_only_through_allowed_modules():
    for path in [PROJECT_ROOT / "app.py", *page_files()]:
        found = ka2l_imports("app_pages." + path.stem, path)
        bad = {m for m in found if not any(m == a or m.startswith(a + ".") for a in PAGE_ALLOWED)}
        assert not bad, f"{path.name} imports {bad}; go through ka2l.ui instead"
        text = path.read_text()
        assert "import sqlite" not in text and "SELECT " not in text, f"{path.name} holds SQL"


def test_pages_hold_no_dataframe_logic():
    # filtering, joining and grouping belong in ka2l.views; a page only renders what it gets
    for path in page_files():
        text = path.read_text()
        for pattern in (r"\]\s*==\s*\(", r"\.str\.contains\(", r"\.groupby\(", r"\.merge\(", r"view\[view\["):
            assert not re.search(pattern, text), f"{path.name} filters frames itself ({pattern}); move it to ka2l.views"


def test_every_page_is_routed_and_tested():
    tests = (PROJECT_ROOT / "tests" / "test_app.py").read_text()
    for page in {p.stem for p in page_files()} - {"pool"}:
        assert f'"{page}"' in tests or f"app_pages/{page}.py" in tests, f"page {page} has no AppTest"
