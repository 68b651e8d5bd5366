"""CI runs exactly the README's test command."""
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    marker = next(i for i, line in enumerate(ci_lines) if "README-TEST-COMMAND" in line)
    command = ci_lines[marker + 1].strip()
    assert "pytest" in command
    readme_commands = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()]
    assert command in readme_commands
