"""Course conventions the notebooks must keep (their cells themselves run under nbval).

A notebook may write a function in a few lines to teach it, but if it gives it the name of
a public minildm function or class, it must check it against the package with
`torch.testing.assert_close` (derive, check, then use), so lessons cannot drift from code.
"""

import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def public_names() -> set[str]:
    """Top-level public functions and classes of every minildm module."""
    names = set()
    for f in (ROOT / "minildm").rglob("*.py"):
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                names.add(node.name)
    return names


def unchecked_redefinitions(cells: list[dict], public: set[str]) -> list[str]:
    """Names a notebook defines that minildm also defines, with no code cell that both
    mentions the name and calls assert_close / allclose."""
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    defined = {m for src in code for m in re.findall(r"^\s*(?:def|class) (\w+)", src, re.M)}
    checked = {
        name for name in defined
        if any(re.search(rf"\b{name}\b", src) and re.search(r"assert_close|allclose", src) for src in code)
    }
    return sorted((defined & public) - checked)


def test_checker_catches_an_unchecked_copy():
    cells = [{"cell_type": "code", "source": ["def q_sample(x0, t, eps, s):\n", "    return x0\n"]}]
    assert unchecked_redefinitions(cells, {"q_sample"}) == ["q_sample"]
    cells.append({"cell_type": "code", "source": ["torch.testing.assert_close(q_sample(a, t, e, s), D.q_sample(a, t, e, s))"]})
    assert unchecked_redefinitions(cells, {"q_sample"}) == []


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_checks_what_it_redefines(nb):
    cells = json.loads(nb.read_text())["cells"]
    assert unchecked_redefinitions(cells, public_names()) == []


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_with_outputs_and_valid_code(nb):
    cells = json.loads(nb.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    assert code and all(c.get("execution_count") is not None for c in code), "run the notebook before committing it"
    for c in code:
        src = "".join(line for line in c["source"] if not line.lstrip().startswith(("%", "!")))
        ast.parse(src)
