"""The shape of the code a developer meets: layers without cycles, files small
enough to read in one sitting, and one implementation of each shared job."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "edge_agent"
MAX_LINES = 600


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_layer_contract_holds_and_names_every_module() -> None:
    # The contract is exhaustive: a module missing from pyproject's layers fails it.
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_the_module_import_graph_has_no_cycle() -> None:
    graph = grimp.build_graph("edge_agent", cache_dir=None)
    # Package __init__ files only re-export their own modules: an import of a
    # package by its own module would be a cycle too, so nothing is left out.
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph.find_modules_directly_imported_by(module)):
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep):], dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[module] = 2

    for module in sorted(graph.modules):
        if module not in state:
            visit(module)


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_is_short_and_says_what_it_owns(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_LINES
    if path.name not in ("__main__.py", "py.typed"):
        assert ast.get_docstring(ast.parse(text)), f"{path} opens without a docstring"


# One implementation of each shared job: where the only code allowed to do it lives.
ONE_HOME = {
    r"\btrio\.to_thread\.run_sync\(": {"blocking.py"},
    r"\bos\.(replace|fsync)\(": {"fs.py"},
    r"\bOgg(Opus|Flac)Encoder\(": {"audio/encoders.py"},
    r"\bwav_header\(": {"audio/encoders.py", "audio/pcm.py"},
    r"\.read_text\(": {"config.py"},
    r"\blogging\.basicConfig\(": {"logs.py"},
}


@pytest.mark.parametrize("pattern", sorted(ONE_HOME))
def test_each_shared_job_has_one_home(pattern: str) -> None:
    found = set()
    for path in sources():
        for line in path.read_text(encoding="utf-8").splitlines():
            code = line.split("#", 1)[0]
            if re.search(pattern, code) and not code.lstrip().startswith(("def ", '"', "'")):
                found.add(str(path.relative_to(PACKAGE)))
    assert found <= ONE_HOME[pattern], f"{pattern} also in {sorted(found - ONE_HOME[pattern])}"
