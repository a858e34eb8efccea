"""The README and docs/ stay short, and every link, command, option and make target they name exists."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from fl_dplora.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_BYTES = 12_000

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
SPAN = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
COMMAND = re.compile(r"(?:^|(?<=[\s/(]))fl-dplora(?=\s)((?:\s+\S+)*)")
SEPARATORS = {"|", "||", "&&", ";", "&", ";;", "(", ")"}


def _rel(page: Path) -> str:
    return str(page.relative_to(REPO)) if page.is_relative_to(REPO) else page.name


def _code(text: str) -> list[str]:
    """Code as the reader sees it: each logical line of a fenced block (backslash continuations
    joined, shell comments kept for shlex to drop), and each inline code span (line breaks in a
    span are spaces)."""
    out = []
    for block in FENCE.finditer(text):
        body = block.group(0).split("\n", 1)[1].rsplit("\n", 1)[0]
        out += body.replace("\\\n", " ").splitlines()
    for span in SPAN.finditer(FENCE.sub("", text)):
        out.append(" ".join(span.group(2).split()))
    return out


def _prose(text: str) -> str:
    """The text without code, where a [x](y) is a link."""
    return SPAN.sub("", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    bad = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http(s):, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{_rel(page)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{_rel(page)}: {target} (no such heading)")
    return bad


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def command_problems(code_line: str, root: argparse.ArgumentParser) -> list[str]:
    """`fl-dplora SUB [SUBSUB] --opt ...` in one code line: SUB must be a subcommand and every
    --opt an option of it (up to the next shell separator). A line that shlex cannot split is
    ambiguous and skipped."""
    bad = []
    for m in COMMAND.finditer(code_line):
        try:
            lexer = shlex.shlex(m.group(1), posix=True, punctuation_chars=";&|()")
            lexer.whitespace_split = True
            words = list(lexer)
        except ValueError:
            continue
        words = words[: next((i for i, w in enumerate(words) if w in SEPARATORS or w == "<" or re.match(r"#|\d?>", w)), len(words))]
        if not words:
            continue
        parser, name = root, "fl-dplora"
        if not words[0].startswith("-"):
            subs = _subparsers(root)
            if words[0] not in subs:
                bad.append(f"{name} {words[0]}: no such subcommand (in `{code_line}`)")
                continue
            parser, name, words = subs[words[0]], f"fl-dplora {words[0]}", words[1:]
            nested = _subparsers(parser)
            if nested:  # e.g. bench: the next word picks one; a placeholder allows the options of any
                if words and words[0] in nested:
                    parser, name, words = nested[words[0]], f"{name} {words[0]}", words[1:]
                elif words and re.fullmatch(r"[a-z][a-z0-9-]*", words[0]):
                    bad.append(f"{name} {words[0]}: no such subcommand (in `{code_line}`)")
                    continue
        allowed = _options(parser)
        if parser is not root and name.count(" ") == 1 and _subparsers(parser) and (not words or words[0].startswith("-")):
            allowed |= {o for p in _subparsers(parser).values() for o in _options(p)}
        for w in words:
            if w.startswith("--") and len(w) > 2 and w.split("=", 1)[0] not in allowed:
                bad.append(f"{name} {w.split('=', 1)[0]}: no such option (in `{code_line}`)")
    return bad


def _make_targets() -> set[str]:
    targets = set()
    for line in (REPO / "Makefile").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\- ]+?)\s*::?(?!=)", line)
        if m and not line.startswith(("\t", "#")):
            targets |= {t for t in m.group(1).split() if not t.startswith(".")}
    return targets


def make_problems(code_line: str, targets: set[str]) -> list[str]:
    bad = []
    for m in re.finditer(r"(?:^|(?<=[\s;&|(]))make\s+([^\s;&|)#]+)", code_line):
        word = m.group(1)
        if "=" in word or word.startswith("-"):  # `make OUT=... run`: the target is later, skip it
            continue
        if word not in targets:
            bad.append(f"make {word}: no such Makefile target (in `{code_line}`)")
    return bad


# --- the checks themselves -------------------------------------------------------------------------

def test_readme_is_short():
    size = (REPO / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size:,} bytes (limit {README_MAX_BYTES:,}): move depth to docs/"


def test_relative_links_point_to_existing_files():
    bad = [b for page in PAGES for b in broken_links(page)]
    assert not bad, "\n".join(bad)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / t.partition("#")[0]).resolve() for t in LINK.findall(_prose((REPO / "README.md").read_text()))}
    missing = [_rel(p) for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


def test_commands_and_options_exist():
    root = build_parser()
    bad = [f"{_rel(page)}: {b}" for page in PAGES for line in _code(page.read_text()) for b in command_problems(line, root)]
    assert not bad, "\n".join(bad)


def test_make_targets_exist():
    targets = _make_targets()
    assert {"run", "test", "install"} <= targets
    bad = [f"{_rel(page)}: {b}" for page in PAGES for line in _code(page.read_text()) for b in make_problems(line, targets)]
    assert not bad, "\n".join(bad)


# --- the checks catch what they are meant to catch -------------------------------------------------

@pytest.mark.parametrize("line, problem", [
    ("fl-dplora evaluate --adaptor runs/x/adapter", "fl-dplora evaluate --adaptor"),
    (".venv/bin/fl-dplora simulate --num-client 5 --output-dir runs/x", "fl-dplora simulate --num-client"),
    ("fl-dplora evalute --run runs/x", "fl-dplora evalute"),
    ("fl-dplora bench prefix-cach --reps 2", "fl-dplora bench prefix-cach"),
    ("fl-dplora bench dp-overhead --rounds 3", "fl-dplora bench dp-overhead --rounds"),
    ("fl-dplora --versions", "fl-dplora --versions"),
])
def test_command_check_catches(line, problem):
    assert any(problem in b for b in command_problems(line, build_parser()))


@pytest.mark.parametrize("line", [
    'fl-dplora evaluate --run runs/default --eval-file test.csv --run-config "max-seq-len=128"',
    'fl-dplora predict --run runs/default "text one" "text two" | jq .answer',
    "fl-dplora export runs/default --output out --merge",
    "fl-dplora bench prefix-cache --layers 2 --reps 2",
    "fl-dplora experiment epsilon-sweep --only zero-shot-fin --verify",
    "fl-dplora --version",
    "cat ~/fl-dplora/runs/x/summary.json --not-checked",
    "fl-dplora simulate --num-clients 5  # --comment-is-not-an-option",
])
def test_command_check_accepts(line):
    assert command_problems(line, build_parser()) == []


def test_link_and_make_checks_catch(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# A heading, here\n")
    page.write_text("[ok](there.md) [ok](there.md#a-heading-here) [web](https://example.org/x)\n"
                    "[gone](missing.md) [bad anchor](there.md#nowhere) `[not a link](nope.md)`\n")
    assert broken_links(page) == ["page.md: missing.md (no such file)", "page.md: there.md#nowhere (no such heading)"]
    targets = _make_targets()
    assert make_problems("make run OUT=/abs/dir", targets) == []
    assert make_problems("make tests", targets)
