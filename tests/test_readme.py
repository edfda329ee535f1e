"""The README's decoder example runs as printed."""
import re

from skip import ROOT


def test_readme_decoder_example_runs(smollm2_dir, capsys):
    code = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[0]
    exec(compile(code, "README.md", "exec"), {})
    assert "[8, 8, 8]" in capsys.readouterr().out
