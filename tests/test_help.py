"""--help at 80 columns: every option's name and help text whole, in the sections config.py declares; --version."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from if_query import __version__
from if_query.cli import app
from if_query.config import COMMANDS, GROUPS, cli_fields


def collapsed(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def help_at_80(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_is_whole_at_80_columns_in_its_section(command):
    text = help_at_80(command)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text
    headings = [line[:-1] for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert headings[-1] == "Other" and headings[:-1] == [g for g in GROUPS if g in headings]
    for spec in cli_fields(COMMANDS[command]):
        meta = spec.metadata
        if meta["argument"]:
            name = spec.name.removesuffix("s").upper()
        else:
            name = meta["flags"][0].split("/")[0] if meta["flags"] else "--" + spec.name.replace("_", "-")
        # the option's line lies in its own section: after its heading, before the next one
        section = text.split(f"\n{meta['group']}:\n", 1)[1].split("\n\n", 1)[0]
        assert re.search(rf"^  {re.escape(name)}\b", section, re.MULTILINE), (command, name)
        assert collapsed(meta["help"]) in collapsed(section), (command, name)


def test_the_command_list_shows_each_summary_whole():
    listing = help_at_80().split("Commands:")[1]
    for config_class in COMMANDS.values():
        assert collapsed(config_class.__doc__.strip().split("\n\n")[0]) in collapsed(listing)
    assert "..." not in listing
    for line in listing.splitlines():  # a summary wrapped in its docstring reads as one sentence, no indent inside
        text = re.sub(r"^  [a-z-]+  +", "", line).strip()
        assert "  " not in text, line


def test_version_and_the_console_script_at_80_columns():
    assert CliRunner().invoke(app, ["--version"]).output == f"if-query {__version__}\n"
    script = Path(sys.executable).parent / "fit-hessians"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, COLUMNS="80", HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr
    assert "  --eigendecomposition-dtype <str>\n" in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    for name in ("fit-hessians", "run-query"):  # the earlier tool's console scripts answer --version too
        alone = subprocess.run([str(Path(sys.executable).parent / name), "--version"], capture_output=True,
                               text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        assert (alone.returncode, alone.stdout) == (0, f"if-query {__version__}\n"), alone.stderr
    assert CliRunner().invoke(app, ["plan", "--version"]).output == f"if-query {__version__}\n"
