"""The documents users read stay true to the repository: tests they name exist, links resolve."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST_REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")
LINK = re.compile(r"\]\(([^)#]+)(?:#[^)]*)?\)")


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}


def test_every_test_the_contract_names_exists():
    text = (ROOT / "docs" / "contract.md").read_text(encoding="utf-8")
    references = TEST_REFERENCE.findall(text)
    assert len(references) >= 20, "the contract names the tests that hold each promise"
    missing = [
        f"{path}::{name}"
        for path, name in references
        if not (ROOT / path).is_file() or name not in _test_names(ROOT / path)
    ]
    assert not missing, f"docs/contract.md names tests that do not exist: {missing}"


def test_every_numbered_promise_names_its_tests():
    text = (ROOT / "docs" / "contract.md").read_text(encoding="utf-8")
    promises = re.split(r"\n(?=\d+\. \*\*)", text.split("## The promises", 1)[1].split("\n## ", 1)[0])[1:]
    assert len(promises) >= 12
    for promise in promises:
        assert TEST_REFERENCE.search(promise), f"no test named for: {promise[:80]}"


def test_readme_and_docs_link_only_to_files_in_the_repository():
    for doc in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))):
        text = doc.read_text(encoding="utf-8")
        assert "shared/" not in text and "DESIGN.md" not in text, f"{doc.name} points outside the repository"
        for target in LINK.findall(text):
            if "://" not in target:
                assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"
    assert "](docs/contract.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_readme_brief_numbers_the_promises_as_the_contract_does():
    def numbered(text: str) -> list[tuple[int, str]]:
        found = re.findall(r"^ {0,3}(\d+)\. \*\*([^*]+)\*\*", text, flags=re.MULTILINE)
        return [(int(n), title) for n, title in found]

    contract = (ROOT / "docs" / "contract.md").read_text(encoding="utf-8")
    promises = numbered(contract.split("## The promises", 1)[1].split("\n## ", 1)[0])
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    brief = numbered(readme.split("## The contract in brief", 1)[1].split("\n## ", 1)[0])
    assert [n for n, _ in promises] == list(range(1, len(promises) + 1))
    assert brief == promises, "one point per promise of docs/contract.md, same number and title"
