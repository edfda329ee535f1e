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
