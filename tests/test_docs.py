"""Documents the code cites exist in the repository, with the sections cited."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_method_citations_point_at_sections_of_the_repositorys_method_notes() -> None:
    method = ROOT / "docs" / "method.md"
    assert method.is_file()  # the docstrings cite it: it ships with the code, not beside it
    sections = {int(m) for m in re.findall(r"^## (\d+)\.", method.read_text(), flags=re.MULTILINE)}
    cited: set[int] = set()
    for folder in ("pysynth", "kernels", "cli", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            assert not re.search(r"(?<!docs/)method\.md", text), f"{path}: cites method.md without its path"
            for first, last in re.findall(r"docs/method\.md`{0,2} §(\d+)(?:-(\d+))?", text):
                cited.update(range(int(first), int(last or first) + 1))
    assert cited  # the docstrings do cite it
    assert cited <= sections, f"cited sections missing from docs/method.md: {sorted(cited - sections)}"
