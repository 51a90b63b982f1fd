"""The README's set-up commands are the ones CI runs, so they cannot drift apart."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    return [l for l in lines if l.startswith("python3 -m venv .venv")]


def test_readme_has_exactly_two_setup_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    main, tests = commands
    assert "torch==2.13.0" in main and "lrt_platform.sweep sweep_specs/quickstart.yaml" in main
    assert "torch==2.13.0" in tests and "pytest" in tests


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in ci


def test_the_quickstart_spec_exists():
    assert (ROOT / "sweep_specs" / "quickstart.yaml").is_file()


def test_every_test_named_in_the_reliability_table_exists():
    import re

    text = (ROOT / "docs" / "RELIABILITY.md").read_text()
    named = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?(?:\[[\w-]+\])?`", text)
    assert len(named) >= 15
    for path, name in named:
        source = (ROOT / path).read_text()
        assert not name or re.search(rf"^def {name}\(", source, re.M), f"{path}::{name} is not a test"
