"""The README's code and every docstring example run, on the tiny model, so that neither can rot."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import fastimagic

ROOT = Path(__file__).resolve().parents[1]


def _readme_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_the_readme_library_example_runs(tmp_path, monkeypatch, capsys):
    """As copied, in the repository's folder: only files that ship (its output goes to a scratch folder here, which
    sees the repository's storyboards/), and it says what it does as it goes."""
    (block,) = _readme_blocks()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "storyboards").symlink_to(ROOT / "storyboards")
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "dancing.png").is_file()
    assert [(f.seed, f.edit.gamma) for f in namespace["frames"]][:3] == [(0, 0.9), (0, 1.1), (0, 1.3)]
    out = capsys.readouterr().out
    assert out.startswith("fine-tune 1/") and out.endswith("6 keyframes; the first is in dancing.png\n")


def _modules_with_examples() -> list[str]:
    names = ["fastimagic"] + [f"fastimagic.{m.name}" for m in pkgutil.iter_modules(fastimagic.__path__)]
    return [n for n in names if ">>>" in Path(importlib.util.find_spec(n).origin).read_text()]


@pytest.mark.parametrize("name", _modules_with_examples())
def test_docstring_examples_run(name, tiny_model, tuning):
    module = importlib.import_module(name)
    from fastimagic.editor import Editor

    globs = {"model": tiny_model, "tuning": tuning, "Editor": Editor}
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = [t for t in finder.find(module, globs={**vars(module), **globs}) if t.examples]
    assert tests, f"{name} has '>>>' but no example was found"
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (see the output above)"
