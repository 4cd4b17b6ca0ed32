"""The documentation tells the truth: the commands README.md and RESULTS.md quote run
(`--only_check_args`: every check, no TensorFlow, nothing written), the default
flagfile holds every default, and every figure RESULTS.md links exists."""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags

from experiments import common, flagfile, reproduce, tables
from fedprune.config import OUTPUT_ONLY_FIELDS, ExperimentConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "RESULTS.md")
TIMEOUT_S = 300


def fenced_commands(text: str) -> list[tuple[str, int]]:
    """(command, expected exit status) of each `python -m experiments...` line in the
    fenced code blocks of a Markdown text.

    A `\\`-continued command is joined; a trailing `# comment` is dropped; a
    transcript line (`$ ...`) followed by a line starting `error:` is expected
    to exit 2. Commands holding a placeholder (`<...>`) are left out.
    """
    commands = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1].rstrip() + " " + lines[i].strip()
            i += 1
            match = re.match(r"\s*(?:\$ )?(?:\.venv/bin/)?(python -m experiments\.\S+.*)", line)
            if not match or "<" in match.group(1):
                continue
            command = re.sub(r"\s+#.*$", "", match.group(1)).strip()
            follows_error = i < len(lines) and lines[i].startswith("error:")
            commands.append((command, 2 if follows_error else 0))
    return commands


def test_fenced_commands_parser():
    text = ("```sh\npython -m experiments.run --a=1   # a comment\n"
            "python -m experiments.run --b \\\n    --c=2\n"
            ".venv/bin/python -m experiments.run --flagfile=runs/<run>/flags.txt\n```\n"
            "`python -m experiments.run --inline`\n"
            "```\n$ python -m experiments.run --d=1.2\nerror: --d=1.2: expected\n```\n")
    assert fenced_commands(text) == [("python -m experiments.run --a=1", 0),
                                     ("python -m experiments.run --b --c=2", 0),
                                     ("python -m experiments.run --d=1.2", 2)]


def quoted_commands() -> list[tuple[str, int]]:
    commands = [c for doc in DOCS for c in fenced_commands((REPO_ROOT / doc).read_text())]
    # The per-table grids that RESULTS.md's sections describe (rendered by reproduce.py).
    commands += [(c, 0) for number in tables.TABLES.names()
                 for c in reproduce.grid_commands(tables.TABLES[int(number)])]
    return list(dict.fromkeys(commands))


def _needs_workers(command: str) -> bool:
    return "--tff_workers=" in command  # checks that the addresses answer


@pytest.fixture(scope="module")
def checkout_without_runs(tmp_path_factory):
    """The repository as the commands see it, without its `runs/` folder.

    Every top-level entry is a symlink into the repository except `runs/`, so
    repository-relative paths (flagfiles) resolve, while a default output folder
    is new: a user's `make run` before `make test` (which fills
    runs/<default run>) cannot turn the quoted `python -m experiments.run` into
    "holds a run already".
    """
    root = tmp_path_factory.mktemp("checkout")
    for entry in REPO_ROOT.iterdir():
        if entry.name != "runs":
            (root / entry.name).symlink_to(entry)
    return root


@pytest.mark.parametrize("command, status", [
    pytest.param(c, s, marks=pytest.mark.skip(reason="needs running TFF workers"))
    if _needs_workers(c) else (c, s) for c, s in quoted_commands()])
def test_quoted_command_passes_only_check_args(command, status, checkout_without_runs):
    args = shlex.split(command)
    assert args[:2] == ["python", "-m"]
    done = subprocess.run([sys.executable, *args[1:], "--only_check_args"],
                          cwd=checkout_without_runs, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == status, done.stderr[-2000:]


def test_readme_and_results_quote_the_commands_this_test_runs():
    commands = [c for c, _ in quoted_commands()]
    assert "python -m experiments.reproduce --table=3" in commands
    assert ("python -m experiments.compare_schedules --flagfile=experiments/configs/table3.flags "
            "--flagfile=experiments/configs/table3_cnn_filter.flags "
            "--output_dir=runs/table3-cnn_filter") in commands
    assert len(commands) >= 10


def test_default_flagfile_holds_every_default_of_the_drivers():
    flag_values = flags.FlagValues()
    common.define_experiment_flags(flag_values)
    path = REPO_ROOT / "experiments" / "configs" / "digits_default.flags"
    lines = path.read_text().splitlines()
    given = [line for line in lines if line.startswith("--")]
    fields = dataclasses.fields(ExperimentConfig)
    defaults = {f.name: f.default for f in fields}
    for f in fields:  # the drivers' flags default to the config's fields
        value = flag_values[f.name].default
        assert (tuple(int(b) for b in value) if f.name == "block_size" else value) == \
            defaults[f.name], f.name
    # Output-only flags (--deploy) are left to the command line: a table's flagfiles,
    # which include this one, must not override them.
    assert sorted(given) == sorted(flagfile._flag_line(name, value)
                                   for name, value in defaults.items()
                                   if value is not None and name not in OUTPUT_ONLY_FIELDS)
    unset = [name for name, value in defaults.items() if value is None]
    assert f"# Unset by default (no value in a flagfile): {', '.join(f'--{n}' for n in unset)}." \
        in lines


MARKDOWN_IMAGE = re.compile(r"!\[[^\]]*\]\(\s*(?:<([^>]+)>|([^)\s]+))(?:\s+\"[^\"]*\")?\s*\)")
HTML_IMAGE = re.compile(r"<img\b[^>]*\bsrc=[\"']([^\"']+)[\"']", re.I)


def image_links(text: str) -> list[str]:
    """The local targets of a Markdown text's image links (`![alt](path)`, `<img src>`)."""
    targets = [a or b for a, b in MARKDOWN_IMAGE.findall(text)] + HTML_IMAGE.findall(text)
    return [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t)]


def test_image_links_parser():
    text = ('![acc](docs/figures/table1-accuracy_vs_round.png) and '
            '![x](<docs/figures/a b.pdf> "title") <img src="docs/figures/t.png" width=300> '
            '![remote](https://example.org/x.png) [not an image](docs/design.md)')
    assert image_links(text) == ["docs/figures/table1-accuracy_vs_round.png",
                                 "docs/figures/a b.pdf", "docs/figures/t.png"]


@pytest.mark.parametrize("doc", ["RESULTS.md", "README.md"])
def test_every_linked_figure_exists(doc):
    path = REPO_ROOT / doc
    links = image_links(path.read_text())
    missing = [t for t in links if not (path.parent / t).is_file()]
    assert links and not missing


def test_every_results_table_embeds_its_figures():
    text = (REPO_ROOT / "RESULTS.md").read_text()
    for number in re.findall(r"<!-- table(\d+):start -->", text):
        section = text.split(f"<!-- table{number}:start -->")[1]
        section = section.split(f"<!-- table{number}:end -->")[0]
        assert [t for t in image_links(section) if f"figures/table{number}-" in t], number
