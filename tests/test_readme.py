"""The README: its decoder example runs as printed, it links only to what exists, and every speedup
and percentage it quotes is a figure of a recorded run (docs/runs.md, docs/results-*.md)."""
import re

from skip import ROOT


def test_readme_decoder_example_runs(smollm2_dir, capsys):
    code = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[0]
    exec(compile(code, "README.md", "exec"), {})
    assert "[8, 8, 8]" in capsys.readouterr().out


def test_readme_is_a_guide_of_at_most_20_kb_with_no_dead_link():
    assert len((ROOT / "README.md").read_bytes()) <= 20_000
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)\)", doc.read_text()):
            if "://" not in target:
                assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"


FIGURE = r"(?<![\w.])\d+(?:\.\d+)?(?:x\b|%)"  # 1.17x, 0.28x, 6.5%, 19%


def test_every_figure_the_readme_quotes_is_a_recorded_runs():
    """One source for every figure: each speedup and percentage in the README (and in the
    paper-versus-here tables it links) appears as such in a results file or in docs/runs.md."""
    docs = ROOT / "docs"
    recorded = "".join(p.read_text() for p in [docs / "runs.md", *sorted(docs.glob("results-*.md"))])
    quoted = 0
    for page in [ROOT / "README.md", docs / "paper-vs-here.md"]:
        figures = set(re.findall(FIGURE, page.read_text()))
        assert not {f for f in figures if not re.search(rf"(?<![\w.]){re.escape(f)}", recorded)}, page.name
        quoted += len(figures)
    assert quoted >= 20


def test_every_guarantee_names_tests_that_exist():
    """docs/guarantees.md: each promise names its tests as `tests/file.py::test_name`, or
    `::test_name` for the file named last; each named test is defined there."""
    text = (ROOT / "docs" / "guarantees.md").read_text()
    promises = [p for p in re.split(r"\n- ", text) if p.startswith("**")]
    named, current = 0, None
    for promise in promises:
        refs = re.findall(r"`(tests/\w+\.py)?::(\w+)", promise)
        assert refs, f"a promise without a test: {promise[:60]}"
        for file, name in refs:
            current = file or current
            assert re.search(rf"^def {name}\(", (ROOT / current).read_text(), re.M), f"{current}::{name} is not defined"
            named += 1
    assert len(promises) >= 15 and named >= len(promises)
