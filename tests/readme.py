"""README.md's code blocks and paragraphs, for the tests that run what the README shows as it is
there (so the README cannot drift from what is tested)."""

from __future__ import annotations

import re

from tests.server_process import REPO

README = REPO / "README.md"


def readme_block(after: str, language: str) -> str:
    """The first fenced ``language`` block after the first README line that starts with ``after``."""
    text = README.read_text()
    found = re.search(rf"^{re.escape(after)}", text, re.MULTILINE)
    assert found, f"README.md has no line starting with {after!r}"
    block = re.compile(rf"^```{language}\n(.*?)^```$", re.MULTILINE | re.DOTALL).search(text, found.end())
    assert block, f"README.md has no {language} block after {after!r}"
    return block.group(1)


def readme_paragraph(start: str) -> str:
    """The README paragraph (up to the next blank line) that starts with ``start``."""
    found = re.search(rf"^{re.escape(start)}.*?(?=\n\n)", README.read_text(), re.MULTILINE | re.DOTALL)
    assert found, f"README.md has no paragraph starting with {start!r}"
    return found.group(0)
