"""The project's shape, read from its source with `ast`: the reading core stands alone, nothing imports in a
circle, and the top level holds the core and the user commands only.

    python tests/test_layout.py      # prints the top-level listing and the import graph
"""
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = ("model", "sltrain", "kernels", "optim")  # the concept files: they import nothing from run/
COMMANDS = ("train", "sample", "eval", "export")
READERS = ("sample", "eval", "export")  # read a finished run: never import train
MACHINERY = "run"


def modules():
    """{module name: path} for every .py file of the project outside tests/ and benchmarks/."""
    found = {}
    for folder in ("", "run", "data"):
        for name in sorted(os.listdir(os.path.join(ROOT, folder))):
            if name.endswith(".py"):
                module = name[:-3] if not folder else f"{folder}.{name[:-3]}".replace(".__init__", "")
                found[module] = os.path.join(ROOT, folder, name)
    return found


def imports(path, known):
    """The project modules a file imports, anywhere in it (inside functions too): `from run import x` is run.x."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]  # run.checkpoint.load_model -> run.checkpoint
            if name:
                found.add(name)
    return found


def graph():
    known = modules()
    return {m: sorted(imports(path, known) - {m}) for m, path in known.items()}


def cycles(g):
    """Every import cycle, as a list of modules (depth-first search with a stack)."""
    found, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for n in g.get(m, ()):
            if state.get(n) == "open":
                found.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"
    for m in g:
        if m not in state:
            visit(m, [m])
    return found


def top_level():
    return sorted(n for n in os.listdir(ROOT) if n.endswith(".py"))


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_the_core_imports_nothing_from_the_machinery_and_kernels_nothing_of_the_project():
    g = graph()
    for m in CORE:
        assert not [n for n in g[m] if n.split(".")[0] == MACHINERY], (m, g[m])
    assert g["kernels"] == []


def test_readers_of_a_run_never_import_train_and_data_prepare_stands_alone():
    g = graph()
    for m in READERS:
        assert "train" not in g[m], (m, g[m])
    assert g["data.prepare"] == []  # `python data/prepare.py` runs with no sys.path edit
    assert "sys.path" not in open(os.path.join(ROOT, "data", "prepare.py")).read()


def test_one_training_step_reads_through_the_core_alone():
    """train.py's project imports are the core, the loader and run/ (machinery behind a few calls)."""
    step = set(CORE) | {"data.loader", "train"}
    assert {n for n in graph()["train"] if n.split(".")[0] != MACHINERY} <= step


def test_the_top_level_is_the_core_and_the_user_commands():
    assert top_level() == sorted(f"{m}.py" for m in CORE + COMMANDS)
    assert len(top_level()) <= 8


def test_the_checker_finds_what_it_guards(tmp_path):
    """The checks themselves: a cycle is found, a deep import resolves to its module."""
    assert cycles({"a": ["b"], "b": ["c"], "c": ["a"]}) == [["a", "b", "c", "a"]]
    assert cycles({"a": ["b"], "b": []}) == []
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from run.checkpoint import load_model\n    import kernels\n")
    assert imports(str(f), {"run", "run.checkpoint", "kernels"}) == {"run.checkpoint", "kernels"}


if __name__ == "__main__":
    print("top level:", " ".join(top_level()))
    for m, targets in graph().items():
        print(f"  {m:<18} -> {', '.join(targets) or '(nothing of the project)'}")
    print("cycles:", cycles(graph()) or "none")
    sys.exit(0)
