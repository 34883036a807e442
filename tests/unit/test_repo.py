"""Repository-level promises: the README's commands are what CI runs."""

from __future__ import annotations

from pathlib import Path


def test_readme_test_command_is_what_ci_runs() -> None:
    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    blocks = [b.split("```", 1)[0].strip() for b in readme.split("```sh\n")[1:3]]
    assert blocks[0].endswith("protego testbed demo")
    ci = (root / ".ci" / "run").read_text()
    assert blocks[1] in ci.splitlines()
