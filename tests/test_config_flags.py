"""One Config reaches the CLI and the server: every field of Config is a flag of `agentos
serve` with Config's default, and ServerSettings hands every field to the engine under
the same name. Parsing only: no server starts and no model loads."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from agentos.api.app import ServerSettings
from agentos.cli import _parser, _serve_settings, main
from agentos.kernel.config import Config


def _command(name: str) -> argparse.ArgumentParser:
    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}


def _flag(f) -> str:
    # booleans on by default are turned off; the others are named as they are
    name = f.name.replace("_", "-")
    return f"--no-{name}" if f.default is True else f"--{name}"


def _serve(*argv: str) -> ServerSettings:
    return _serve_settings(_parser().parse_args(["serve", *argv]))


def test_every_config_field_is_a_serve_flag_with_its_default():
    flags = _flags(_command("serve"))
    missing = [_flag(f) for f in fields(Config) if _flag(f) not in flags]
    assert not missing, f"Config fields without an `agentos serve` flag: {missing}"
    for f in fields(Config):
        action = flags[_flag(f)]
        assert action.dest == f.name, (f.name, action.dest)
        assert action.default == f.default, (f.name, action.default, f.default)
        assert action.help, f"{_flag(f)} has no help"
        if f.metadata.get("choices"):
            assert tuple(action.choices) == tuple(f.metadata["choices"]), f.name


def test_serve_defaults_are_config_defaults():
    options = _serve().engine_options()
    assert options == {f.name: f.default for f in fields(Config)}


def test_engine_options_pass_every_field_by_its_name():
    config = Config(model="m", revision="v1", device="cuda:1", dtype="float16", block_size=32, kv_blocks=7,
                    host_blocks=0, max_batch_tokens=99, max_batch_size=5, max_model_len=123,
                    scheduler="fcfs", deterministic=True, prefix_cache=False, cuda_graphs=False,
                    store="redis://h:1/0", deployment="d", worker_id="w", seed=9)
    defaults = Config()
    changed = [f.name for f in fields(Config) if getattr(config, f.name) == getattr(defaults, f.name)]
    assert not changed, f"give these a value other than the default: {changed}"
    options = ServerSettings(config=config).engine_options()
    assert options == {f.name: getattr(config, f.name) for f in fields(Config)}
    assert Config(**options) == config  # what the engine is built from


def test_serve_max_batch_size_reaches_the_engine():
    assert _serve("--max-batch-size", "3").engine_options()["max_batch_size"] == 3


def test_serve_flags_parse_into_config_names():
    settings = _serve("--redis", "redis://127.0.0.1:1/0", "--no-prefix-cache", "--deterministic",
                      "--kv-blocks", "64", "--scheduler", "fcfs", "--port", "9001")
    options = settings.engine_options()
    assert options["store"] == "redis://127.0.0.1:1/0"  # --redis: the store's old spelling
    assert (options["prefix_cache"], options["deterministic"]) == (False, True)
    assert (options["kv_blocks"], options["scheduler"]) == (64, "fcfs")
    assert settings.port == 9001 and settings.redis_url == "redis://127.0.0.1:1/0"
    assert _serve("--store", "memory").redis_url is None


def test_worker_id_of_a_worker():
    assert _serve("--worker", "--port", "9002").engine_options()["worker_id"] == "127.0.0.1:9002"
    assert _serve("--worker", "--worker-id", "w1").engine_options()["worker_id"] == "w1"
    assert _serve("--worker-id", "w1").engine_options()["worker_id"] == "w1"
    assert _serve().engine_options()["worker_id"] == "main"


def test_run_takes_the_engine_flags():
    flags = _flags(_command("run"))
    for name in ("model", "device", "dtype", "block_size", "kv_blocks", "max_batch_size",
                 "scheduler", "prefix_cache"):
        f = next(f for f in fields(Config) if f.name == name)
        assert flags[_flag(f)].dest == name and flags[_flag(f)].default == f.default


@pytest.mark.parametrize("argv, message", [
    (["--scheduler", "lifo"], "invalid choice"),
    (["--dtype", "int8"], "invalid choice"),
    (["--device", "tpu"], "device must be cpu or cuda"),
    (["--block-size", "3"], "block_size must be a power of two"),
    (["--store", "http://x"], "store must be None"),
])
def test_bad_engine_options_are_a_clean_error(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_worker_needs_a_redis_store(capsys):
    assert main(["serve", "--worker", "--store", "memory"]) == 2
    assert "--worker needs" in capsys.readouterr().err


def test_system_route_hides_the_store_password():
    from agentos.api.routes.system import _public

    assert _public({"store": "redis://:secret@db:6379/0"})["store"] == "redis://***@db:6379/0"
    assert _public({"store": "redis://app:secret@db:6379"})["store"] == "redis://app:***@db:6379"
    assert _public({"store": "redis://db:6379"})["store"] == "redis://db:6379"
    assert _public({"store": None, "seed": 1}) == {"store": None, "seed": 1}
