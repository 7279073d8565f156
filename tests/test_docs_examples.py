"""Every Python example of the tutorials runs as written (blocks of a page share one namespace,
in order). A block preceded by the comment ``.. fragment`` is a partial snippet and is skipped."""

import re
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "docs" / "tutorials").glob("*.rst"))
BLOCK = re.compile(r"(\.\. fragment[^\n]*\n\n)?\.\. code-block:: python\n((?:\n|   [^\n]*\n)+)")


def _blocks(page: Path) -> list[str]:
    return ["\n".join(line[3:] for line in body.splitlines())
            for fragment, body in BLOCK.findall(page.read_text()) if not fragment]


@pytest.mark.parametrize("page", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    blocks = _blocks(page)
    namespace: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{page.name}, python block {i}", "exec"), namespace)


def test_every_tutorial_has_runnable_examples():
    assert TUTORIALS and all(_blocks(p) for p in TUTORIALS)
