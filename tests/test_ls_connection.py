"""ka2l.annotate.connection: where the Label Studio URL and token come from, in which order, and that the
token is never shown, logged or put in an error message."""

from __future__ import annotations

import logging
import os
import stat

import pytest

from ka2l.annotate import connection
from ka2l.errors import ConfigError

TOKEN = "0f3c9a7d5e21b4c68a0d17e9f2b3c4d5e6f7a8b9"
OTHER = "b7e6d5c4b3a29180f7e6d5c4b3a29180abcdef12"


@pytest.fixture
def secrets_toml(tmp_path, monkeypatch):
    """A secrets.toml of the test's own (never the project's real one), empty until a test writes it;
    no connection from the caller's environment."""
    path = tmp_path / "streamlit" / "secrets.toml"
    path.parent.mkdir()
    monkeypatch.setattr(connection, "secrets_toml_path", lambda: path)
    monkeypatch.delenv(connection.ENV_URL, raising=False)
    monkeypatch.delenv(connection.ENV_TOKEN, raising=False)
    return path


def write_toml(path, url, token):
    path.write_text(f'[other]\nx = 1\n\n[label_studio]\nurl = "{url}"\ntoken = "{token}"\n')


def test_nothing_set_is_none_and_require_names_the_three_ways(secrets_toml):
    assert connection.load() is None
    with pytest.raises(ConfigError) as err:
        connection.require()
    message = str(err.value)
    for way in ("annotate serve", "Settings page", connection.ENV_URL, connection.ENV_TOKEN, "secrets.toml"):
        assert way in message


def test_save_writes_a_0600_file_in_a_0700_folder_atomically(secrets_toml):
    path = connection.save("http://127.0.0.1:8080/", TOKEN)
    assert path == connection.secrets_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in path.parent.iterdir()) == ["label_studio.json"]  # no temporary file left
    conn = connection.load()
    assert (conn.url, conn.token, conn.source) == ("http://127.0.0.1:8080", TOKEN, str(path))
    # saving again replaces it
    connection.save("http://127.0.0.1:9090", OTHER)
    assert connection.require().token == OTHER
    assert connection.forget() is True
    assert connection.load() is None and connection.forget() is False


def test_a_file_others_can_read_is_refused_without_showing_the_token(secrets_toml):
    path = connection.save("http://127.0.0.1:8080", TOKEN)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError) as err:
        connection.load()
    assert "chmod 600" in str(err.value) and "644" in str(err.value)
    assert TOKEN not in str(err.value)
    os.chmod(path, 0o600)
    assert connection.load().token == TOKEN


def test_environment_beats_secrets_toml_beats_the_file(secrets_toml, monkeypatch):
    connection.save("http://file:1", "f" * 40)
    assert connection.require().source.endswith("label_studio.json")
    write_toml(secrets_toml, "http://toml:2", "t" * 40)
    assert (connection.require().url, connection.require().source) == ("http://toml:2", "secrets.toml")
    monkeypatch.setenv(connection.ENV_URL, "http://env:3")
    monkeypatch.setenv(connection.ENV_TOKEN, "e" * 40)
    conn = connection.require()
    assert (conn.url, conn.token, conn.source) == ("http://env:3", "e" * 40, "environment")


def test_a_half_set_environment_or_table_says_what_is_missing(secrets_toml, monkeypatch):
    monkeypatch.setenv(connection.ENV_URL, "http://env:3")
    with pytest.raises(ConfigError, match=connection.ENV_TOKEN):
        connection.load()
    monkeypatch.delenv(connection.ENV_URL)
    secrets_toml.write_text(f'[label_studio]\ntoken = "{TOKEN}"\n')
    with pytest.raises(ConfigError, match="needs both `url` and `token`") as err:
        connection.load()
    assert TOKEN not in str(err.value)


def test_a_broken_secrets_toml_names_the_file_not_the_line_holding_the_token(secrets_toml):
    secrets_toml.write_text(f'[label_studio]\nurl = "http://x:1"\ntoken = "{TOKEN}\n')  # unterminated string
    with pytest.raises(ConfigError) as err:
        connection.load()
    assert str(secrets_toml) in str(err.value) and TOKEN not in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no parser message chained to it


def test_bad_url_or_token_is_refused_with_the_fix(secrets_toml):
    with pytest.raises(ConfigError, match="http:// or https://"):
        connection.save("127.0.0.1:8080", TOKEN)
    with pytest.raises(ConfigError, match="Account & Settings"):
        connection.save("http://127.0.0.1:8080", "  ")
    assert not connection.secrets_file().exists()


def test_the_token_shows_only_masked_never_in_repr_str_or_logs(secrets_toml, caplog):
    caplog.set_level(logging.DEBUG, logger="ka2l")
    connection.save("http://127.0.0.1:8080", TOKEN)
    conn = connection.require()
    assert conn.masked == "0f3c…a8b9" == connection.mask(TOKEN)
    for shown in (repr(conn), str(conn), f"{conn}", repr([conn])):
        assert TOKEN not in shown
    assert "0f3c…a8b9" in str(conn)
    os.chmod(connection.secrets_file(), 0o640)
    with pytest.raises(ConfigError):
        connection.load()
    connection.forget()
    assert "0f3c…a8b9" in caplog.text  # the save was logged, masked
    assert TOKEN not in caplog.text
    assert connection.mask("abc") == "…" and connection.mask(None) == "…"


def test_the_connection_is_frozen(secrets_toml):
    conn = connection.Connection("http://x:1", TOKEN, "test")
    with pytest.raises(AttributeError):
        conn.token = OTHER
