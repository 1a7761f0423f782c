"""The README is a front page and docs/ holds the rest: the README stays short, every
relative link and anchor leads somewhere, every docs page is reachable from the README,
and the commands and files the pages name exist. Reads files only: no server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md"))
README_LIMIT = 10_000  # characters

FENCE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
MAKE = re.compile(r"(?:^|[\s;&|(])make\s+([a-z][a-z0-9-]*)", re.M)
REPO_PATH = re.compile(r"(?<![\w./-])((?:src/prunelab|tests)/[^\s`'\"),:;]*)")


def prose(text: str) -> str:
    """The text without its fenced code blocks (a `# comment` there is no heading, a
    `[x](y)` there is no link)."""
    return FENCE.sub("", text)


def code(text: str) -> list[str]:
    """What a reader would type: fenced blocks and inline code spans."""
    blocks = [m.group(0) for m in FENCE.finditer(text)]
    return blocks + INLINE_CODE.findall(prose(text))


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose(path.read_text()), re.M)}


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(prose(path.read_text())) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z0-9][a-z0-9-]*)\s*:(?!=)", (REPO / "Makefile").read_text(), re.M))


def test_the_readme_is_a_front_page():
    size = len(README.read_text())
    assert size <= README_LIMIT, f"README.md has {size:,} characters, over {README_LIMIT:,}: move detail to docs/"


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_leads_somewhere(page):
    broken = []
    for target in relative_links(page):
        file, _, anchor = target.partition("#")
        where = (page.parent / file).resolve() if file else page
        if not where.exists():
            broken.append(f"{target}: no such file")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            broken.append(f"{target}: no heading #{anchor} in {where.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / t.partition("#")[0]).resolve() for t in relative_links(README) if t.partition("#")[0]}
    unlinked = [p.name for p in PAGES if p.resolve() not in linked]
    assert PAGES and not unlinked, f"README.md links no docs page {unlinked}"


def test_every_make_target_the_readme_names_exists():
    named = {t for snippet in code(README.read_text()) for t in MAKE.findall(snippet)}
    assert {"run", "test"} <= named
    assert not named - make_targets(), f"README.md names make targets the Makefile lacks: {sorted(named - make_targets())}"


def test_extending_names_only_files_and_targets_that_exist():
    """Every src/prunelab/... and tests/... path in the recipes exists (a path with a
    <placeholder> is checked up to the folder before it), and so does every make target."""
    text = (DOCS / "extending.md").read_text()
    paths = {p.rstrip(".") for p in REPO_PATH.findall(text)}
    assert any(p.startswith("src/prunelab/") for p in paths) and any(p.startswith("tests/") for p in paths)
    missing = []
    for path in sorted(paths):
        concrete = path.split("<", 1)[0].rsplit("/", 1)[0] if "<" in path else path
        if not (REPO / concrete).exists():
            missing.append(path)
    assert not missing, f"docs/extending.md names paths that do not exist: {missing}"
    targets = {t for snippet in code(text) for t in MAKE.findall(snippet)}
    assert targets and not targets - make_targets(), f"unknown make targets: {sorted(targets - make_targets())}"


# A project run as a user types it: `mlflow run <project> -e <entry point> ...`.
MLFLOW_RUN = re.compile(r"(?:\S*/)?mlflow run \S+ -e \S+")


def mlflow_run_commands(text: str) -> list[str]:
    """Every `mlflow run <project> -e ...` command of a page, each on one line: in code
    blocks (fenced or indented, continued lines joined) and in inline code spans."""
    text = re.sub(r"\\\n\s*", " ", text)
    lines = [line.split(" #")[0].strip() for line in text.splitlines() if MLFLOW_RUN.match(line.strip())]
    spans = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose(text))]
    return lines + [span for span in spans if MLFLOW_RUN.match(span)]


def test_every_mlflow_run_command_names_the_study_experiment():
    """`mlflow run` makes its run in the experiment it is told (Default without one), and
    prunelab refuses a run outside the study's experiment: every command says which."""
    commands = {page: mlflow_run_commands(page.read_text()) for page in [README, *PAGES]}
    assert len(commands[README]) >= 2
    lacking = [f"{page.relative_to(REPO)}: {c}" for page, cs in commands.items() for c in cs if "--experiment-name" not in c]
    assert not lacking, "commands without --experiment-name: " + "; ".join(lacking)
