"""The documents a user reads: their tables render, their links resolve, and every pointer into the design
notes names a section that exists."""

import re
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/design.md", "benchmarks/results/README.md"]
# What a user can read: the documents, and the code whose docstrings and help texts they see.
USER_VISIBLE = [*DOCS, "pyproject.toml", *(str(p.relative_to(ROOT)) for folder in
                                          ("moonvit", "kernels", "integration", "benchmarks")
                                          for p in sorted((ROOT / folder).glob("*.py")))]


def _cells(line: str) -> list[str]:
    """A table row's cells as GitHub splits them: on every pipe not escaped by a backslash."""
    inner = line.strip()
    inner = inner[1:] if inner.startswith("|") else inner
    inner = inner[:-1] if inner.endswith("|") and not inner.endswith("\\|") else inner
    return re.split(r"(?<!\\)\|", inner)


def _tables(path: str):
    """(first line number, source lines, header cells rendered, body rows rendered) per table."""
    text = (ROOT / path).read_text()
    lines = text.splitlines()
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    tables = []
    for i, token in enumerate(tokens):
        if token.type != "table_open":
            continue
        end = next(j for j in range(i, len(tokens)) if tokens[j].type == "table_close")
        inner = tokens[i:end]
        header_cells = sum(t.type == "th_open" for t in inner)
        body_rows = sum(t.type == "tr_open" for t in inner) - 1
        start, stop = token.map
        tables.append((start + 1, lines[start:stop], header_cells, body_rows))
    return tables


@pytest.mark.parametrize("path", DOCS)
def test_tables_render_with_one_width(path):
    tables = _tables(path)
    assert tables, f"{path} has no table"
    for first_line, rows, header_cells, body_rows in tables:
        header, delimiter, *body = rows
        width = len(_cells(header))
        assert header_cells == width, (path, first_line, "the header did not render as one")
        assert len(_cells(delimiter)) == width, (path, first_line)
        assert body_rows == len(body), (path, first_line, "a source row is not a table row")
        for offset, row in enumerate(body, start=2):
            where = f"{path}:{first_line + offset}"
            assert len(_cells(row)) == width, (where, f"{len(_cells(row))} cells under a {width}-cell header")
            assert not re.fullmatch(r"[\s|:-]+", row), (where, "a second delimiter row: two headers")


@pytest.mark.parametrize("path", DOCS)
def test_no_table_repeats_its_header(path):
    """The README's encoder table once had a second header row, of another width, under the first."""
    for first_line, rows, _, _ in _tables(path):
        header = [c.split(" (")[0] for c in _cells(rows[0])]
        for offset, row in enumerate(rows[1:], 1):
            assert [c.split(" (")[0] for c in _cells(row)][:2] != header[:2], (f"{path}:{first_line + offset}",
                                                                               "a second header row")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("path", DOCS)
def test_links_resolve(path):
    text = (ROOT / path).read_text()
    anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links or path != "docs/design.md"
    for link in links:
        if link.startswith(("http://", "https://")):
            continue
        if link.startswith("#"):
            assert link[1:] in anchors, (path, link)
        else:
            assert ((ROOT / path).parent / link.split("#")[0]).exists(), (path, link)


def _design_sections() -> set[str]:
    headings = re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", (ROOT / "docs/design.md").read_text(), flags=re.M)
    return set(headings)


def test_design_notes_have_numbered_sections():
    sections = _design_sections()
    assert {"1", "2", "3", "4", "2.1", "2.2", "2.3", "2.4", "3.2", "3.5", "4.2", "8", "9", "9.1", "10", "11",
            "12"} <= sections, sorted(sections)


def test_pointers_into_the_design_notes_name_real_sections():
    sections = _design_sections()
    pointers = 0
    for path in USER_VISIBLE:
        text = " ".join((ROOT / path).read_text().split())
        for match in re.finditer(r"design\.md\)?,? sections? ([\d.]+)(?: and ([\d.]+))?", text):
            for number in filter(None, match.groups()):
                pointers += 1
                assert number.rstrip(".") in sections, (path, match.group(0))
    assert pointers >= 10


@pytest.mark.parametrize("path", USER_VISIBLE)
def test_no_pointer_outside_the_repository(path):
    text = (ROOT / path).read_text()
    for outside in ("DESIGN.md", "../shared", "/work/"):
        assert outside not in text, (path, outside)


# --- The README, for its readers -------------------------------------------------------------------------

README_SECTIONS = ["Two commands", "Supported models", "Using it in vLLM", "Python API", "Benchmarks", "How it works",
                   "Troubleshooting", "More", "License"]
MODELS = ["Kimi-VL-A3B-Instruct", "Kimi-VL-A3B-Thinking", "-Thinking-2506", "Kimi-K2.5", "Kimi-K2.6", "Kimi-K3",
          "Kimi-K3.1"]
# Where the messages a user meets come from: the code, and the CI's vLLM override file.
SOURCES = [*(p for folder in ("moonvit", "kernels", "integration", "benchmarks") for p in (ROOT / folder).glob("*.py")),
           *(ROOT / ".ci").iterdir()]


def _sections(path: str) -> dict[str, str]:
    """Level-2 heading -> its text, in order."""
    parts = re.split(r"^## (.+)$", (ROOT / path).read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_readme_sections_in_reading_order():
    assert list(_sections("README.md")) == README_SECTIONS


def test_readme_opens_with_every_supported_model():
    intro = (ROOT / "README.md").read_text().split("\n## ")[0]
    for model in ("Kimi-VL", "Kimi-K2.5", "K2.6", "K3", "K3.1", "vLLM"):
        assert model in intro, model


def test_supported_models_table_names_every_model_and_what_it_runs():
    (table,) = _tables_in(_sections("README.md")["Supported models"])
    header, _, *rows = table
    assert [c.strip() for c in _cells(header)] == ["model", "checkpoint architecture", "images", "video chunks",
                                                   "vLLM releases", "encoder CUDA graphs", "refused"]
    models = " ".join(_cells(row)[0] for row in rows)
    for model in MODELS:
        assert model in models, model
    assert all(all(c.strip() for c in _cells(row)) for row in rows), "an empty cell"


def test_speedups_over_vllm_only_in_the_benchmarks_section():
    """A figure against vLLM belongs next to its table, device and date."""
    for name, text in _sections("README.md").items():
        claims = re.findall(r"faster than|\b\d+(?:\.\d+)?x\b", text)
        if name == "Benchmarks":
            assert claims and len(_tables_in(text)) == 1
            prose = [p for p in text.strip().split("\n\n") if not p.startswith("|")]
            assert len(prose) <= 2 and "benchmarks/results/" in text
        else:
            assert not claims, (name, claims)
    assert "Targets of this round" not in (ROOT / "README.md").read_text()


def test_troubleshooting_quotes_messages_the_code_prints():
    (table,) = _tables_in(_sections("README.md")["Troubleshooting"])
    sources = "\n".join(p.read_text() for p in SOURCES if p.is_file())
    quoted = 0
    for row in table[2:]:
        for span in re.findall(r"`([^`]+)`", _cells(row)[0]):
            for fragment in (f.strip() for f in span.split("...")):
                if len(fragment) >= 12:
                    quoted += 1
                    assert fragment in sources, fragment
    assert quoted >= 10


def _tables_in(text: str) -> list[list[str]]:
    """The source lines of each table in `text`."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def test_readme_lists_every_design_section():
    """The README's "More" names each top-level section of the design notes, and no other."""
    (entry,) = [item for item in _sections("README.md")["More"].split("\n- ") if "(docs/design.md)" in item]
    listed = set()
    for first, last in re.findall(r"sections? (\d+)(?: to (\d+))?", " ".join(entry.split())):
        listed.update(range(int(first), int(last or first) + 1))
    headings = re.findall(r"^## (\d+)\. ", (ROOT / "docs/design.md").read_text(), flags=re.M)
    assert sorted(listed) == [int(n) for n in headings]


def _repository_text_files():
    """The repository's text files, .ci's included, without hidden folders and build outputs."""
    for path in sorted(ROOT.rglob("*")):
        parts = path.relative_to(ROOT).parts
        hidden = any(p.startswith(".") and p != ".ci" for p in parts)
        built = any(p in ("build", "__pycache__") or p.endswith(".egg-info") for p in parts)
        if not hidden and not built and path.is_file() and path.suffix in (".py", ".md", ".toml", ".txt", ""):
            yield path


def test_install_commands_install_from_the_checkout():
    """fused-moonvit is not on the package index: an extra is installed from the checkout with pip's -e,
    never by the package's name, and each one named is declared in pyproject.toml."""
    from importlib.metadata import metadata

    extras = set(metadata("fused-moonvit").get_all("Provides-Extra"))
    named = 0
    for path in _repository_text_files():
        text = path.read_text(errors="replace")
        assert not re.search(r"fused-moonvit\[", text), path
        for extra in re.findall(r"""pip install -e ["']\.\[([\w,]+)\]["']""", text):
            named += 1
            assert set(extra.split(",")) <= extras, (path, extra)
    assert named >= 8


def test_readme_names_every_extra():
    """The README's paragraph on the extras names each one pyproject.toml declares."""
    from importlib.metadata import metadata

    intro = _sections("README.md")["Two commands"]
    (paragraph,) = [p for p in intro.split("\n\n") if "not on the package index" in p]
    assert set(re.findall(r"`(\w+)`", paragraph)) == set(metadata("fused-moonvit").get_all("Provides-Extra"))
