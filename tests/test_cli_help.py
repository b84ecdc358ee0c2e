"""`edgeconv-runtime --help` tells what the runtime can do (issue 24 §6): every backend and precision it knows,
from its registries, and `serve --help` shows each option's default."""
import argparse

import pytest

from edgeconv_runtime.backends import BACKENDS
from edgeconv_runtime.cli import build_parser
from edgeconv_runtime.manifest import RUNTIME_PRECISIONS


def _sub(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def _help(name: str) -> str:
    return " ".join(_sub(name).format_help().split())


def _option(name: str, flag: str) -> argparse.Action:
    return next(a for a in _sub(name)._actions if flag in a.option_strings)


@pytest.mark.parametrize("command", ["predict", "evaluate", "verify", "bench", "serve"])
def test_backend_help_names_every_registered_backend(command):
    help_text = _option(command, "--backend").help or ""
    assert "openvino-cpu" in BACKENDS  # the one the help used to leave out
    for name in BACKENDS:
        assert name in help_text, (command, name, help_text)


def test_bench_precision_help_names_every_runtime_precision():
    help_text = _option("bench", "--precision").help
    assert "bf16" in RUNTIME_PRECISIONS
    for p in RUNTIME_PRECISIONS:
        assert p in help_text, help_text


def test_serve_help_shows_the_defaults():
    text = _help("serve")
    for flag, shown in (("--port", "8080"), ("--max-batch", "32"), ("--max-delay-ms", "5.0"), ("--max-queue", "256"),
                        ("--max-body-mb", "10.0"), ("--timeout-s", "10.0"), ("--workers", "2"), ("--backend", "auto"),
                        ("--admit-wait-ms", "100.0"), ("--host", "127.0.0.1")):
        assert _option("serve", flag).default is not None
        assert f"(default {shown})" in text, (flag, text)
    assert "default None" not in text and "(default False)" not in text
    assert text.count("(default 40000000)") <= 1  # --max-pixels says its default once
