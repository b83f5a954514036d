"""Settings: flags > MODELWORKER_* environment > TOML file > defaults, one validation for every source,
and errors that name the source. Also the CLI's argument handling and its GGUF subcommands."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from worker import __main__ as cli
from worker.logs import JsonFormatter, TextFormatter, fields
from worker.settings import Settings, SettingsError, build_settings, parse_bytes

MiB = 1024 * 1024


def test_defaults_follow_the_design_table() -> None:
    s = build_settings({}, {}, None)
    assert (s.host, s.port, s.metrics_port, s.device, s.dtype) == ("127.0.0.1", 50051, 9400, "auto", "auto")
    assert s.model_roots == (Path("models"),) and s.preload == ()
    assert (s.max_message_bytes, s.grace_seconds, s.auth_token) == (256 * MiB, 20.0, None)
    assert (s.tls_cert, s.tls_key, s.tls_client_ca) == (None, None, None)
    assert (s.log_level, s.log_format) == ("info", "text")
    assert s.memory_budget_bytes == 0 and s.max_tokens_per_request >= 1 and s.max_batch_size >= 1


def test_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text(
        '[modelworker]\nhost = "0.0.0.0"\nport = 1000\nmetrics-port = 1001\ngrace_seconds = 5\n'
        'model_roots = ["/srv/a", "/srv/b"]\npreload = { m1 = "one", m2 = "two" }\nlog_format = "json"\n'
    )
    env = {"MODELWORKER_PORT": "2000", "MODELWORKER_METRICS_PORT": "2001", "MODELWORKER_DTYPE": "bfloat16"}
    s = build_settings({"port": "3000", "auth_token": "t"}, env, config)
    assert (s.port, s.metrics_port, s.host, s.grace_seconds) == (3000, 2001, "0.0.0.0", 5.0)
    assert (s.dtype, s.auth_token, s.log_format) == ("bfloat16", "t", "json")
    assert s.model_roots == (Path("/srv/a"), Path("/srv/b"))
    assert s.preload == (("m1", "one"), ("m2", "two"))
    # The config file can also come from MODELWORKER_CONFIG; top-level keys work as well as a table.
    plain = tmp_path / "plain.toml"
    plain.write_text("port = 4000\n")
    assert build_settings({}, {"MODELWORKER_CONFIG": str(plain)}).port == 4000


def test_environment_forms() -> None:
    env = {
        "MODELWORKER_MODEL_ROOTS": os.pathsep.join(["/m1", "/m2"]),
        "MODELWORKER_PRELOAD": "a=llama, b=sub/qwen",
        "MODELWORKER_MAX_MESSAGE_BYTES": "64MiB",
        "MODELWORKER_MEMORY_BUDGET_BYTES": "2GB",
        "MODELWORKER_LOG_LEVEL": "DEBUG",
        "MODELWORKER_DEVICE": "cuda:1",
    }
    s = build_settings({}, env)
    assert s.model_roots == (Path("/m1"), Path("/m2"))
    assert s.preload == (("a", "llama"), ("b", "sub/qwen"))
    assert (s.max_message_bytes, s.memory_budget_bytes) == (64 * MiB, 2 * 10**9)
    assert (s.log_level, s.device) == ("debug", "cuda:1")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("1234", 1234),
        ("512k", 512_000),
        ("256MiB", 256 * MiB),
        ("1 GB", 10**9),
        ("2Gi", 2 * 1024**3),
    ],
)
def test_parse_bytes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "-1", "12 parsecs", "1.5GB", "MiB"])
def test_parse_bytes_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="byte size"):
        parse_bytes(text)


@pytest.mark.parametrize(
    ("flags", "env", "fragments"),
    [
        ({"port": "70000"}, {}, ["--port", "[0, 65535]", "70000"]),
        ({"port": "http"}, {}, ["--port: expected an integer, got 'http'"]),
        (
            {},
            {"MODELWORKER_MAX_BATCH_SIZE": "8x"},
            ["MODELWORKER_MAX_BATCH_SIZE: expected an integer, got '8x'"],
        ),
        ({}, {"MODELWORKER_DTYPE": "fp8"}, ["MODELWORKER_DTYPE", "fp8"]),
        ({}, {"MODELWORKER_LOG_FORMAT": "xml"}, ["MODELWORKER_LOG_FORMAT", "text, json"]),
        ({}, {"MODELWORKER_DEVICE": "tpu"}, ["MODELWORKER_DEVICE", "tpu"]),
        ({"grace_seconds": "-1"}, {}, ["--grace-seconds", ">= 0"]),
        ({"max_message_bytes": "1k"}, {}, ["--max-message-bytes", "65536"]),
        ({"max_batch_size": "0"}, {}, ["--max-batch-size", ">= 1"]),
        ({}, {"MODELWORKER_PRELOAD": "a=x,a=y"}, ["MODELWORKER_PRELOAD", "preloaded twice: a"]),
        ({}, {"MODELWORKER_PRELOAD": "justanid"}, ["MODELWORKER_PRELOAD", "ID=DIR"]),
        ({"tls_cert": "/etc/hostname"}, {}, ["tls_cert/tls_key", "both"]),
        ({"tls_client_ca": "/etc/hostname"}, {}, ["--tls-client-ca", "mutual TLS"]),
        ({"tls_cert": "/no/cert.pem", "tls_key": "/no/key.pem"}, {}, ["--tls-cert", "/no/cert.pem"]),
    ],
)
def test_bad_values_name_their_source(flags: dict, env: dict, fragments: list[str]) -> None:
    with pytest.raises(SettingsError) as exc:
        build_settings(flags, env)
    for fragment in fragments:
        assert fragment in str(exc.value), str(exc.value)


def test_bad_config_files(tmp_path: Path) -> None:
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("prot = 1\n")
    with pytest.raises(SettingsError, match=r"unknown\.toml: unknown setting 'prot'"):
        build_settings({}, {}, unknown)
    broken = tmp_path / "broken.toml"
    broken.write_text("port = \n")
    with pytest.raises(SettingsError, match=r"broken\.toml"):
        build_settings({}, {}, broken)
    with pytest.raises(SettingsError, match="missing.toml"):
        build_settings({}, {}, tmp_path / "missing.toml")
    typed = tmp_path / "typed.toml"
    typed.write_text('log_level = 3\nport = "x"\n')
    with pytest.raises(SettingsError, match="typed.toml: (log_level|port)"):
        build_settings({}, {}, typed)


def test_settings_are_frozen_and_redact_the_token() -> None:
    s = Settings(auth_token="hunter2")
    with pytest.raises(AttributeError):
        s.port = 1  # type: ignore[misc]
    assert "hunter2" not in str(s.redacted())


def test_cli_flags_reach_the_settings(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args(
        ["serve", "--port", "0", "--model-root", "/a", "--model-root", "/b", "--preload", "x=one",
         "--preload", "y=two", "--memory-budget-bytes", "1GiB", "--log-format", "json"]
    )  # fmt: skip
    s = cli.settings_from_args(args, env={"MODELWORKER_PORT": "9", "MODELWORKER_HOST": "::1"})
    assert (s.port, s.host) == (0, "::1")
    assert s.model_roots == (Path("/a"), Path("/b")) and s.preload == (("x", "one"), ("y", "two"))
    assert s.memory_budget_bytes == 1024**3 and s.log_format == "json"


def test_cli_without_a_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "serve" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["serve", "--bogus"], ["serve", "--port", "1", "extra"]])
def test_unknown_serve_arguments_print_serve_usage(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.startswith("usage: modelworker serve ") and "--max-batch-size" in err, err
    assert f"modelworker serve: error: unrecognized arguments: {argv[-1]}" in err


def test_unknown_top_level_arguments_print_top_level_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--bogus"])
    assert capsys.readouterr().err.startswith("usage: modelworker [-h]")


def test_gguf_commands_are_handed_to_the_importer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["import-gguf", str(tmp_path / "absent.gguf"), str(tmp_path / "out")])
    assert code == 1 and "modelworker import-gguf" in capsys.readouterr().err


def test_gguf_commands_without_the_importer(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(cli, "GGUF_MODULE", "registry.no_such_importer")
    assert cli.main(["prepare-demo", "models/x"]) == 2
    assert "GGUF import is not available" in capsys.readouterr().err


def test_log_formats() -> None:
    record = logging.LogRecord("modelworker.calls", logging.INFO, __file__, 1, "Load %s", ("ok",), None)
    for key, value in fields(method="Load", model="m", code="OK", duration_s=0.25, error="a b").items():
        setattr(record, key, value)
    text = TextFormatter().format(record)
    assert text.endswith('Load ok method=Load model=m code=OK duration_s=0.25 error="a b"'), text
    import json

    line = json.loads(JsonFormatter().format(record))
    assert (line["msg"], line["method"], line["duration_s"], line["level"]) == (
        "Load ok",
        "Load",
        0.25,
        "info",
    )
