"""Rewrite the README's recipe-key reference (between <!-- keys:start --> and <!-- keys:end -->) from the
dataclass field docs: ``python tools/update_readme_keys.py`` (tests/test_docs_keys.py checks it is current)."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- keys:start -->", "<!-- keys:end -->"


def rendered(readme: str) -> str:
    sys.path.insert(0, str(ROOT))
    from unidad_dist.config import keys_markdown

    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{keys_markdown()}\n{END}{tail}"


def main() -> int:
    readme = ROOT / "README.md"
    readme.write_text(rendered(readme.read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
