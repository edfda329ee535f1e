"""The README's decoder example runs as printed."""
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
