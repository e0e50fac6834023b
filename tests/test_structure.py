"""The code's shape, checked: the layering contract (cli -> stages -> core, in pyproject.toml)
holds, no module imports itself back through others, and modules and functions stay small
enough to read in one sitting (the few that are larger are named here, with why)."""

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

SRC = ROOT / "src" / "lorafit"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
LONGER_MODULES = {
    "cli.py": "one typer command per stage, each with its options and help text",
}
LONGER_FUNCTIONS = {
    "cli.py::train": "its typer options (data, output, overwrite, resume, pickles, auto-fit, "
    "torchrun) with their help text; the body only dispatches",
}


def test_the_layering_contract_holds():
    done = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:]


def test_no_import_cycles():
    import grimp

    graph = grimp.build_graph("lorafit")
    cycles = {
        tuple(sorted((module, imported)))
        for module in graph.modules
        for imported in graph.find_modules_directly_imported_by(module)
        if graph.chain_exists(importer=imported, imported=module)
    }
    assert not cycles


def test_modules_and_functions_stay_readable():
    long_modules, long_functions = [], []
    for path in sorted(SRC.rglob("*.py")):
        name = str(path.relative_to(SRC))
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES and name not in LONGER_MODULES:
            long_modules.append((name, len(text.splitlines())))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                where = f"{name}::{node.name}"
                if lines > MAX_FUNCTION_LINES and where not in LONGER_FUNCTIONS:
                    long_functions.append((where, lines))
    assert not long_modules, long_modules
    assert not long_functions, long_functions
