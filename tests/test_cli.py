"""The top-level ``nnunet-gmd`` command: cheap help, one error type, and ``python -m`` entry points."""
from __future__ import annotations

import subprocess
import sys

import pytest


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


def test_building_the_parser_imports_no_torch():
    # ``nnunet-gmd --help`` used to spend seconds importing torch through the bench and sentiment commands
    out = _run("-c", "import sys; from nnunet_gmd.cli import build_parser; build_parser(); "
                     "print(sorted(m for m in ('torch', 'nnunetv2', 'monai') if m in sys.modules))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("entry", ["nnunet_gmd", "nnunet_gmd.cli"])
def test_user_errors_are_one_line_through_either_module_entry(entry):
    # ``python -m nnunet_gmd.cli`` runs cli.py as __main__; UserError lives in nnunet_gmd.errors, so it is
    # still the class the commands raise and is caught there
    out = _run("-m", entry, "bench", "gmd", "--size", "0")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["nnunet-gmd bench: error: bench gmd: --size must be a positive "
                                               "integer, got 0"]
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("option", ["--fast-interval", "--sub-interval"])
def test_bench_amortisation_intervals_must_be_positive(option):
    out = _run("-m", "nnunet_gmd", "bench", "gmd", option, "0")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [f"nnunet-gmd bench: error: bench gmd: {option} must be a positive "
                                               "integer, got 0"]


def test_version_and_help_state_defaults():
    out = _run("-m", "nnunet_gmd", "--version")
    assert out.returncode == 0 and out.stdout.startswith("nnunet-gmd ")
    out = _run("-m", "nnunet_gmd", "bench", "gmd", "--help")
    assert out.returncode == 0
    assert "(default 5)" in out.stdout.replace("\n", " ") and "(default 32)" in out.stdout


def test_library_modules_do_not_import_the_command_line_layer():
    from pathlib import Path

    import nnunet_gmd

    root = Path(nnunet_gmd.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if str(p.relative_to(root)) not in ("cli.py", "__main__.py")
                 and "from nnunet_gmd.cli import" in p.read_text()]
    assert offenders == []


def test_every_sub_command_formats_its_help():
    """``sentiment train --help`` used to crash on a bare '%' in a help string."""
    import argparse

    from nnunet_gmd.cli import build_parser

    def walk(parser: argparse.ArgumentParser, path: str):
        yield path, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{path} {name}")

    seen = []
    for path, parser in walk(build_parser(), "nnunet-gmd"):
        assert parser.format_help(), path
        seen.append(path)
    assert {"nnunet-gmd sentiment train", "nnunet-gmd benchmark brats", "nnunet-gmd bench gmd"} <= set(seen)
