"""The documents the repository cites are in the repository (issue 13 §3).

Every citation of ``docs/<name>.md`` names a file under docs/; every section a citation gives right after it
(``§5``, ``§10.5``, ``§3, "Rule for every random draw"``, ``"Split placement"``) exists in that file — a
number is a numbered heading, a quoted name appears in that section (or, with no number, in a heading);
outside docs/ a document is never named without its ``docs/`` folder; and nothing cites the ``shared``
folder beside the checkout (outside the repository), except the recipes' default few-shot data locations
(``path:`` values, which are overridable data, not citations). Text only: no model is built. (This file
spells such names in pieces, so that it does not cite them itself.)
"""
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "runs", "__pycache__", ".pytest_cache", "node_modules"}
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".cfg", ".ini", ".txt", ".sh", ".sbatch", ".rst"}
ANY_FILE_UNDER = {"slurm", ".ci"}  # scripts without a suffix (.ci/run, sbatch templates)
DOC_NAMES = ("algorithm", "design", "clusters", "local-clusters")  # names a doc citation has had

CITE = re.compile(r"(?<![\w/.-])docs/([\w.-]+\.md)")  # a docs/ folder not preceded by another path part
BARE = re.compile(r"(?<![\w/.-])((?:%s)\.md)" % "|".join(re.escape(n) for n in DOC_NAMES))
SECTION_REF = re.compile(r"\s*,?\s*(?:§(\d+(?:\.\d+)*)(?:\s*[-–]\s*(\d+(?:\.\d+)*))?|\"([A-Za-z][^\"\n]*)\")")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$", re.M)
NUMBERED = re.compile(r"^(\d+(?:\.\d+)*)\.?\s")
SHARED_NAME = "../" + "shared/"
SHARED = re.compile(re.escape(SHARED_NAME))
SHARED_DATA_PATH = re.compile(r"^\s*path:\s*(?:\.\./)+shared/data/")  # recipes/*.yaml only


def text_files(root: Path) -> list[Path]:
    out = []
    for folder, dirs, files in os.walk(root):  # prunes .venv, build, ... instead of walking them
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")
                         and (not d.startswith(".") or d in ANY_FILE_UNDER | {".github"}))
        for f in sorted(files):
            path = Path(folder) / f
            rel = path.relative_to(root)
            if path.suffix in TEXT_SUFFIXES or f == "Makefile" or (rel.parts[0] in ANY_FILE_UNDER and not path.suffix):
                out.append(path)
    return out


class Doc:
    """A markdown document's headings: numbered sections (``## 5. …``, ``### 10.5 …``) with their text up to
    the next heading of the same or a higher level."""

    def __init__(self, text: str):
        heads = [(m.start(), len(m.group(1)), m.group(2)) for m in HEADING.finditer(text)]
        self.headings = [h[2] for h in heads]
        self.sections: dict[str, str] = {}
        for i, (start, level, title) in enumerate(heads):
            num = NUMBERED.match(title)
            if not num:
                continue
            end = next((s for s, lv, _ in heads[i + 1:] if lv <= level), len(text))
            self.sections[num.group(1)] = text[start:end]

    def has_heading(self, name: str) -> bool:
        return any(name.lower() in h.lower() for h in self.headings)


def citations(text: str, in_docs: bool) -> list[tuple[int, str, list]]:
    """(offset, doc file name, [(section or None, quoted name or None), ...]) for every doc citation."""
    found = [(m.start(), m.group(1), m.end()) for m in CITE.finditer(text)]
    if in_docs:  # inside docs/ a sibling is cited by its bare name (a relative link)
        found += [(m.start(), m.group(1), m.end()) for m in BARE.finditer(text)]
    out = []
    for start, name, pos in sorted(found):
        refs = []
        while True:
            m = SECTION_REF.match(text, pos)
            if not m:
                break
            first, last, quoted = m.groups()
            if quoted is not None:
                if refs and refs[-1][0] is not None and refs[-1][1] is None:
                    refs[-1] = (refs[-1][0], quoted)  # a name after a number: that section's name
                else:
                    refs.append((None, quoted))
            else:
                refs += [(first, None)] + ([(last, None)] if last else [])
            pos = m.end()
        out.append((start, name, refs))
    return out


def check_citations(root: Path) -> tuple[list[str], int]:
    """(problems, number of doc citations seen) for the repository at ``root``."""
    docs_dir = root / "docs"
    cache: dict = {}

    def doc(name: str):
        if name not in cache:
            p = docs_dir / name
            cache[name] = Doc(p.read_text(encoding="utf-8")) if p.is_file() else None
        return cache[name]

    problems, seen = [], 0
    for path in text_files(root):
        rel = path.relative_to(root)
        text = path.read_text(encoding="utf-8", errors="replace")
        in_docs = rel.parts[0] == "docs"

        def where(offset: int) -> str:
            return f"{rel}:{text.count(chr(10), 0, offset) + 1}"

        for offset, name, refs in citations(text, in_docs):
            seen += 1
            d = doc(name)
            if d is None:
                problems.append(f"{where(offset)}: cites docs/{name}, which does not exist")
                continue
            for number, quoted in refs:
                if number is not None and number not in d.sections:
                    problems.append(f"{where(offset)}: cites docs/{name} §{number}, which has no such section "
                                    f"(it has §{', §'.join(sorted(d.sections, key=_num_key))})")
                elif number is not None and quoted and quoted.lower() not in d.sections[number].lower():
                    problems.append(f"{where(offset)}: cites docs/{name} §{number} \"{quoted}\", not found in that "
                                    "section")
                elif number is None and quoted and not d.has_heading(quoted):
                    problems.append(f"{where(offset)}: cites docs/{name} \"{quoted}\", which is no heading of it")
        if not in_docs:
            for m in BARE.finditer(text):
                problems.append(f"{where(m.start())}: names {m.group(1)} without its folder; cite it as "
                                f"docs/{m.group(1).replace('local-clusters', 'clusters')}")
        for m in SHARED.finditer(text):
            line_start = text.rfind("\n", 0, m.start()) + 1
            line = text[line_start:text.find("\n", m.start()) if "\n" in text[m.start():] else len(text)]
            if rel.parts[0] == "recipes" and path.suffix in (".yaml", ".yml") and SHARED_DATA_PATH.match(line):
                continue
            problems.append(f"{where(m.start())}: cites {SHARED_NAME}, which is outside the repository; put what it "
                            "names under docs/ (or the repository) and cite that")
    return problems, seen


def md(name: str) -> str:
    """A doc's file name, spelled in pieces here so that this file does not cite the doc itself."""
    return name + ".md"


def _num_key(s: str):
    return tuple(int(p) for p in s.split("."))


def test_every_doc_citation_in_the_repository_resolves():
    problems, seen = check_citations(ROOT)
    assert problems == []
    assert seen >= 20, f"only {seen} doc citations found: has the citation pattern stopped matching?"


def test_the_cited_docs_exist_with_their_numbered_sections():
    alg = Doc((ROOT / "docs" / md("algorithm")).read_text(encoding="utf-8"))
    assert {str(n) for n in range(1, 11)} <= set(alg.sections)
    assert {f"10.{n}" for n in range(1, 14)} <= set(alg.sections)  # the reference bugs we must not copy
    for name in ("design", "clusters"):
        assert (ROOT / "docs" / md(name)).is_file()


def test_the_checker_finds_a_missing_doc_a_missing_section_a_bare_name_and_shared(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / md("algorithm")).write_text(
        "# Algo\n## 1. Roles\ntext\n## 4. Losses\n### Precision\nfp32\n## 10. Differences\n### 10.3 VAE\nx\n")
    (tmp_path / "docs" / md("design")).write_text("# Design\n## Split placement\nx\n")
    (tmp_path / "pkg").mkdir()
    alg, des = "docs/" + md("algorithm"), "docs/" + md("design")
    (tmp_path / "pkg" / "ok.py").write_text(
        f'"""fine: ({alg} §4, "Precision"), ({alg} §1, §10.3), ({des} "Split placement")."""\n')
    (tmp_path / "pkg" / "bad.py").write_text(
        f'"""({alg} §5) ({alg} §10.9) ({alg} §4, "Multi-head GAN") ({des} "No such part")\n'
        f'see docs/nowhere' + '.md, design' + '.md and ' + SHARED_NAME + 'docs/algorithm' + '.md"""\n')
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "r.yaml").write_text("data:\n  target:\n    path: ../" + SHARED_NAME + "data/fewshot/x\n")
    problems, seen = check_citations(tmp_path)
    text = "\n".join(problems)
    assert "pkg/ok.py" not in text, problems
    assert "recipes/r.yaml" not in text, problems
    for expected in ("§5, which has no such section", "§10.9, which has no such section",
                     '§4 "Multi-head GAN", not found', '"No such part", which is no heading',
                     "docs/nowhere" + ".md, which does not exist", "names design" + ".md without its folder",
                     "cites " + SHARED_NAME):
        assert expected in text, (expected, problems)
    assert len(problems) == 7, problems
    assert seen == 8
