"""The command line: help for every command, grouped by stage; errors as messages; import."""

from __future__ import annotations

import pytest

from ka2l.cli.main import build_parser, main
from ka2l.config import ProbeConfig, SamplingConfig, Stage1Config, config_hash, from_dict, to_dict
from ka2l.errors import ConfigError


def test_every_command_has_help(capsys):
    import argparse

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"import", "probe", "triage", "report", "pools", "runs", "setup-model", "decoder-train", "generate", "approved"} <= set(commands)
    top = parser.format_help()
    for name, sub in commands.items():
        description = (sub.description or "").strip()
        assert len(description.split()) >= 3, f"`{name} --help` has no description saying what the command does: {description!r}"
        assert "".join(description.split()) in "".join(sub.format_help().split()), f"`{name} --help` does not show its description"
        listed = [line for line in top.splitlines() if line.split()[:1] == [name]]
        assert len(listed) == 1 and listed[0].split(None, 1)[1] == description, f"{name} is not listed once, with its description, in --help"
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"{name} --{action.dest} has no help"
            if isinstance(action, argparse._SubParsersAction):  # nested commands (job run / cancel)
                helps = {a.dest: (a.help or "").strip() for a in action._choices_actions}
                assert set(helps) == set(action.choices) and all(len(h.split()) >= 3 for h in helps.values()), helps


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


def test_background_with_no_resume_is_refused_not_silently_resumed(capsys):
    from ka2l import jobs

    assert main(["probe", "--pool", "x", "--background", "--no-resume"]) == 2
    assert "--background always resumes a matching run" in capsys.readouterr().err
    assert main(["decoder-train", "--probe", "1", "--background", "--no-resume"]) == 2
    assert "drop --no-resume" in capsys.readouterr().err
    assert jobs.list_jobs() == [], "nothing was queued"
