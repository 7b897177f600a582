"""The README and docs/ against the code: the README stays short and shows the two set-up commands CI
runs, every relative link lands on a file (and its anchor on a heading), and every ``python -m shedder …`` line names a command and
flags the CLI parser has (so a renamed flag fails here, not in a reader's shell)."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from shedder.cli import bench, build_parser, main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
#: Made by the browser journey (tests/test_browser.py) and committed beside the docs.
SCREENSHOT = "docs/img/studio.png"

APP_COMMAND = ("python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 -r requirements.txt && "
               ".venv/bin/streamlit run app/main.py")

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CLI_LINE = re.compile(r"python -m shedder((?: +[a-z][a-z0-9-]*)+)([^`\n#]*)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _test_command() -> str:
    """The test command .ci/run executes (its one line that makes the environment)."""
    lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python3 -m venv")]
    assert len(lines) == 1, lines
    return lines[0]


def _relative_links(page: Path) -> list[str]:
    return [target for target in LINK.findall(page.read_text(encoding="utf-8"))
            if not re.match(r"[a-z]+:", target) and not target.startswith("#")]


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # no headings in code
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def _parser_for(words: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The parser of the longest command prefix of ``words`` and the words it names (``bench scale``
    and ``bench gpu-check`` have parsers of their own, built by ``bench.scale_parser``)."""
    if words[:2] in (["bench", "scale"], ["bench", "gpu-check"]):
        return bench.scale_parser(words[1], main), words[:2]
    parser, used = build_parser(), []
    for word in words:
        sub = _subparsers(parser)
        if word not in sub:
            break
        parser, used = sub[word], used + [word]
    return parser, used


def _cli_mentions() -> list[tuple[str, list[str], list[str]]]:
    """(page, command words, flags) of every ``python -m shedder …`` in the README and docs/."""
    found = []
    for page in PAGES:
        for words, rest in CLI_LINE.findall(page.read_text(encoding="utf-8")):
            words = words.split()
            _, used = _parser_for(words)
            flags_text = " ".join(words[len(used):]) + rest
            found.append((page.name, words, FLAG.findall(flags_text)))
    return found


def test_readme_is_short():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 200


def test_readme_shows_the_two_setup_commands_ci_runs():
    text = README.read_text(encoding="utf-8")
    assert f"```bash\n{APP_COMMAND}\n```" in text
    assert f"```bash\n{_test_command()}\n```" in text


def test_readme_shows_the_studio_screenshot():
    assert f"]({SCREENSHOT})" in README.read_text(encoding="utf-8")
    if not (ROOT / SCREENSHOT).is_file():
        pytest.skip(f"{SCREENSHOT} not generated yet (the browser journey makes it)")
    assert (ROOT / SCREENSHOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    missing = [t for t in _relative_links(page)
               if not (page.parent / t.split("#")[0]).exists() and (page.parent / t).resolve() != ROOT / SCREENSHOT]
    assert not missing, f"{page.name}: {missing}"


def _wrong(mentions) -> list[str]:
    """The mentions naming a command, subcommand or flag the parser lacks."""
    wrong = []
    for page, words, flags in mentions:
        parser, used = _parser_for(words)
        if not used:
            wrong.append(f"{page}: python -m shedder {' '.join(words)} (no such command)")
        elif _subparsers(parser) and len(words) > len(used):
            wrong.append(f"{page}: python -m shedder {' '.join(words[:len(used) + 1])} (no such subcommand)")
        else:
            options = {s for action in parser._actions for s in action.option_strings}
            wrong += [f"{page}: python -m shedder {' '.join(used)} {flag} (no such flag)" for flag in flags
                      if flag not in options]
    return wrong


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_link_anchors_name_headings(page):
    wrong = []
    for target in _relative_links(page):
        path, _, anchor = target.partition("#")
        if anchor and path.endswith(".md") and anchor not in _anchors(page.parent / path):
            wrong.append(target)
    assert not wrong, f"{page.name}: {wrong}"


def test_anchor_rule():
    page = ROOT / "docs" / "hymba.md"
    assert "kinds-the-official-hybridhymba-pruning-masks" in _anchors(page) and "kv-sharing" in _anchors(page)


def test_every_documented_command_and_flag_exists():
    mentions = _cli_mentions()
    assert len(mentions) > 20  # the pattern still finds the docs' command lines
    assert not _wrong(mentions), "\n".join(_wrong(mentions))


def test_a_wrong_command_or_flag_is_caught():
    """The checker itself: a made-up command, subcommand or flag is reported, real ones are not."""
    assert _wrong([("x", ["bench", "search"], ["--race", "--kinds"]), ("x", ["bench", "scale"], ["--sizes"]),
                   ("x", ["plan", "convert", "plan"], ["--to"]), ("x", ["import-run"], ["--model"])]) == []
    assert len(_wrong([("x", ["frobnicate"], []), ("x", ["bench", "frobnicate"], []),
                       ("x", ["search"], ["--frobnicate"]), ("x", ["bench", "scale"], ["--kinds"])])) == 4
    assert FLAG.findall("--model M --kinds ssm,head x--no") == ["--model", "--kinds"]
