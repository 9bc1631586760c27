"""The documentation: the API reference lists every public name, every page is in the site's
navigation, and every relative link of README.md and docs/ leads to a file and a heading that
exist, on GitHub and on the MkDocs site alike.

The reference for "listed in the API reference" is the site itself: the test builds it with
``mkdocs build`` and reads the inventory that mkdocstrings writes (``objects.inv``, Sphinx's
format: https://sphobjinv.readthedocs.io/en/stable/syntax.html), one entry per object rendered.
Heading anchors follow the two renderers a link must work in: Python-Markdown's ``toc``
extension, which MkDocs uses (``markdown.extensions.toc.slugify``), and GitHub's, as
github-slugger implements it (https://github.com/Flet/github-slugger: lowercase, drop
punctuation, each space becomes a hyphen).
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import unicodedata
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DOCS = ROOT / "docs"
README = ROOT / "README.md"
# The acceptance bound of issue 13: a library README, not a report.
README_MAX_CHARS = 8000


def _public_modules() -> Iterator[str]:
    """Every module of the package whose dotted name has no private part, except the command
    line: its modules print (they are documented by ``deformconv COMMAND --help``)."""
    for path in sorted((SRC / "deformconv").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(part.startswith("_") for part in parts) or parts[:2] == ("deformconv", "cli"):
            continue
        yield ".".join(parts)


def _pages() -> list[Path]:
    """The Markdown pages of the site (docs/_griffe holds build code, not pages)."""
    return sorted(p for p in DOCS.rglob("*.md") if "_griffe" not in p.relative_to(DOCS).parts)


# --------------------------------------------------------------------------------------------
# The API reference


def _inventory(path: Path) -> list[str]:
    """Names of the Python objects in a Sphinx inventory (version 2: four header lines, then
    zlib-compressed lines ``name domain:role priority uri display-name``)."""
    with path.open("rb") as f:
        header = [f.readline() for _ in range(4)]
        body = zlib.decompress(f.read()).decode()
    assert header[0].startswith(b"# Sphinx inventory version 2"), header[0]
    return [m.group(1) for m in re.finditer(r"^(\S+)\s+py:\w+\s", body, re.MULTILINE)]


def _resolve(dotted: str) -> object | None:
    """The object a dotted name refers to: the longest importable module prefix, then
    attributes. ``deformconv.ops.dcnv3.dcnv3`` is the function of the module of that name."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return None
            obj = getattr(obj, attr)
        return obj
    return None


@pytest.fixture(scope="module")
def built_site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs", reason='the docs extra builds the site: pip install -e ".[docs]"')
    pytest.importorskip("mkdocstrings_handlers.python")
    site = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    # Not --strict: a docstring griffe cannot read fails CI's strict build, not this test.
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--quiet", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"mkdocs build failed:\n{result.stdout}\n{result.stderr}"
    return site


def test_public_modules_are_found() -> None:
    # The walk itself: the packages the README names are there, private and CLI modules are not.
    modules = set(_public_modules())
    expected = {"deformconv", "deformconv.ops", "deformconv.nn", "deformconv.tools"}
    assert expected | {"deformconv.compat.mmcv", "deformconv.compat.detectron2"} <= modules
    assert not any(part.startswith("_") for m in modules for part in m.split("."))
    assert not any(m.startswith("deformconv.cli") for m in modules)


@pytest.mark.slow
def test_the_api_reference_lists_every_name_of_every_public_module(built_site) -> None:
    documented: set[tuple[str, int]] = set()
    for name in _inventory(built_site / "objects.inv"):
        obj = _resolve(name)
        if obj is not None:
            documented.add((name.rsplit(".", 1)[-1], id(obj)))
    missing = []
    checked = 0
    for module_name in _public_modules():
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            checked += 1
            # A module in __all__ (deformconv.nn) is documented by its own page.
            if (name, id(getattr(module, name))) not in documented:
                missing.append(f"{module_name}.{name}")
    assert checked > 100  # the walk saw the package's public names
    assert not missing, (
        "not in the API reference (add the module to a docs/api/ page, or the name to the "
        f"members listed there): {', '.join(missing)}"
    )


def test_every_page_is_in_the_navigation_and_every_entry_exists() -> None:
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def entries(nav) -> Iterator[str]:
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            if isinstance(value, list):
                yield from entries(value)
            else:
                yield value

    listed = list(entries(config["nav"]))
    pages = {p.relative_to(DOCS).as_posix() for p in _pages()}
    assert sorted(set(listed) - pages) == [], "nav entries without a page"
    assert sorted(pages - set(listed)) == [], "pages missing from the nav of mkdocs.yml"
    assert len(listed) == len(set(listed)), "a page listed twice in the nav"


# --------------------------------------------------------------------------------------------
# Links

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1", re.DOTALL)
_INLINE_LINK = re.compile(
    r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)"
)
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.MULTILINE)
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", re.MULTILINE)


def _without_code(text: str) -> str:
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def _links(text: str) -> list[str]:
    prose = _without_code(text)
    return _INLINE_LINK.findall(prose) + _REFERENCE.findall(prose)


def _heading_text(markdown: str) -> str:
    """A heading's text as both renderers see it: links reduced to their text, markup gone."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", markdown)
    return re.sub(r"[`*]", "", text)


def _slug_mkdocs(text: str) -> str:
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _slug_github(text: str) -> str:
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def _anchors(page: Path) -> tuple[set[str], set[str]]:
    """The heading anchors of a page: (MkDocs', GitHub's). Repeated headings get suffixes,
    ``_1`` in Python-Markdown and ``-1`` on GitHub."""
    texts = [_heading_text(m.group(2)) for m in _HEADING.finditer(_FENCE.sub("", page.read_text()))]
    result = []
    for slug, suffix in ((_slug_mkdocs, "_"), (_slug_github, "-")):
        seen: dict[str, int] = {}
        anchors = set()
        for text in texts:
            base = slug(text)
            anchors.add(f"{base}{suffix}{seen[base]}" if base in seen else base)
            seen[base] = seen.get(base, 0) + 1
        result.append(anchors)
    return result[0], result[1]


def _broken_links(source: Path, root: Path = ROOT, docs: Path = DOCS) -> list[str]:
    problems = []
    for target in _links(source.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (source.parent / path_part).resolve() if path_part else source
        where = f"{source.relative_to(root)}: {target}"
        if not resolved.is_relative_to(root) or not resolved.is_file():
            problems.append(f"{where} (no such file)")
            continue
        if source.is_relative_to(docs) and not resolved.is_relative_to(docs):
            problems.append(f"{where} (outside docs/: the site cannot link it)")
            continue
        if anchor:
            if resolved.suffix != ".md":
                problems.append(f"{where} (anchor into a file that is not Markdown)")
                continue
            mkdocs_anchors, github_anchors = _anchors(resolved)
            if anchor not in mkdocs_anchors or anchor not in github_anchors:
                problems.append(f"{where} (no heading with this anchor on the site and on GitHub)")
    return problems


@pytest.mark.parametrize(
    "source", [README, *_pages()], ids=lambda p: p.relative_to(ROOT).as_posix()
)
def test_every_relative_link_resolves(source: Path) -> None:
    assert _broken_links(source) == []


def test_the_link_checker_finds_what_is_broken(tmp_path) -> None:
    # The checker must be able to fail: a page with one good link and four broken ones.
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "other.md").write_text("# Other page\n\n## The `cost` command\n")
    page = docs / "page.md"
    page.write_text(
        "# Page\n\n[good](other.md#the-cost-command) [external](https://example.org/x.md)\n"
        "[missing file](nothing.md) [missing anchor](other.md#nothing)\n"
        "![missing image](images/none.png) [outside](../README.md)\n"
        "```\n[in code](not-checked.md)\n```\n"
    )
    (tmp_path / "README.md").write_text("# Readme\n")
    problems = _broken_links(page, root=tmp_path, docs=docs)
    assert [p.split(": ", 1)[1].split(" (")[0] for p in problems] == [
        "nothing.md",
        "other.md#nothing",
        "images/none.png",
        "../README.md",
    ]


def test_slugs_follow_both_renderers() -> None:
    # Python-Markdown collapses runs of separators; GitHub keeps one hyphen per space.
    assert _slug_mkdocs(_heading_text("From InternImage / DCNv4")) == "from-internimage-dcnv4"
    assert _slug_github(_heading_text("From InternImage / DCNv4")) == "from-internimage--dcnv4"
    assert _slug_mkdocs(_heading_text("`deformconv cost`")) == "deformconv-cost"
    assert _slug_github(_heading_text("Performance, first call")) == "performance-first-call"


# --------------------------------------------------------------------------------------------
# The README


def test_the_readme_is_library_sized() -> None:
    assert len(README.read_text()) <= README_MAX_CHARS


def test_the_readme_holds_the_commands_ci_runs() -> None:
    # .ci/run runs the README's test command verbatim; the main job is the README's first one.
    readme = README.read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = 'pip install -e ".[test]" && python -m pytest'
    assert f"```\n{test_command}\n```" in readme
    assert f"\n{test_command}\n" in ci
    assert '```\npip install ".[demo]" && deformconv demo\n```' in readme
    assert 'pip install -e ".[docs]" && mkdocs serve' in readme
