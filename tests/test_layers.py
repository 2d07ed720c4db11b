"""The package's layering (README, "Architecture"): every import goes to the importer's layer or below, the
import graph has no cycle, function-local imports of our own modules exist only where the table says why,
and role names live in methods/ (and in recipes and tests), nowhere else in the package."""
import ast
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "unidad_dist"

LAYERS = {  # module prefix -> layer (the longest matching prefix wins)
    "unidad_dist": 0, "unidad_dist.core": 0, "unidad_dist.errors": 0, "unidad_dist.device": 0,
    "unidad_dist.models": 1, "unidad_dist.builtin": 1, "unidad_dist.testing": 1,
    "unidad_dist.methods": 2,
    "unidad_dist.config": 3, "unidad_dist.data": 3,
    "unidad_dist.parallel": 4, "unidad_dist.eval": 4,
    "unidad_dist.train": 5,
    "unidad_dist.launch": 6, "unidad_dist.export": 6,
    "unidad_dist.cli": 7, "unidad_dist.__main__": 7,
}
LOCAL_IMPORTS_ALLOWED = {  # module -> why its imports of our own modules are inside functions
    "unidad_dist.cli": "CLI start-up: `--help` and bad-input errors must not wait for torch, DeepSpeed and "
                       "diffusers, which only the command that runs loads",
    "unidad_dist.parallel.plan": "a plan whose network costs are cached answers without building a network, so "
                                 "it imports the model builders (diffusers: ~3 s) only when it must",
}


def layer_of(module: str, layers: dict) -> int:
    best = max((p for p in layers if module == p or module.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise KeyError(f"{module} is in no layer: add it to the layer table (README and this test)")
    return layers[best]


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, root: Path, modules: set) -> list:
    """(imported module, line, at module level?) for every import of the package's own modules."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    pkg = root.name
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            if n.split(".")[0] != pkg:
                continue
            # `from pkg.a import b`: the submodule pkg.a.b when it is one, else the module pkg.a
            if n in modules or n == pkg:
                out.append((n, node.lineno, id(node) in top))
    return out


def check_layers(root: Path, layers: dict, local_allowed: dict) -> list[str]:
    files = sorted(root.rglob("*.py"))
    modules = {module_name(f, root) for f in files}
    graph: dict = {m: set() for m in modules}
    problems = []
    for f in files:
        me = module_name(f, root)
        mine = layer_of(me, layers)
        for target, line, at_top in imports_of(f, root, modules):
            if target == me:
                continue
            theirs = layer_of(target, layers)
            if theirs > mine:
                problems.append(f"{f.relative_to(root.parent)}:{line}: {me} (layer {mine}) imports {target} "
                                f"(layer {theirs}), a higher layer")
            if not at_top and me not in local_allowed:
                problems.append(f"{f.relative_to(root.parent)}:{line}: {me} imports {target} inside a function; "
                                "import it at the top (or say in the layer table why it must wait)")
            graph[me].add(target)
    # cycles (Tarjan): any strongly connected component with more than one module
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    problems += [f"import cycle: {' -> '.join(c)}" for c in comps]
    return problems


def test_the_package_follows_its_layers():
    assert check_layers(PACKAGE, LAYERS, LOCAL_IMPORTS_ALLOWED) == []


def test_the_checker_finds_an_upward_import_a_cycle_and_a_hidden_local_import(tmp_path):
    root = tmp_path / "pkg"
    (root / "low").mkdir(parents=True)
    (root / "high").mkdir()
    for d in (root, root / "low", root / "high"):
        (d / "__init__.py").write_text("")
    (root / "low" / "a.py").write_text("from pkg.high import b\n")  # up a layer, and a cycle with b
    (root / "high" / "b.py").write_text("from pkg.low import a\n")
    (root / "high" / "c.py").write_text(textwrap.dedent("""
        def f():
            from pkg.low import a
    """))
    layers = {"pkg": 0, "pkg.low": 0, "pkg.high": 1}
    problems = check_layers(root, layers, {})
    assert any("pkg.low.a (layer 0) imports pkg.high.b (layer 1)" in p for p in problems), problems
    assert any(p.startswith("import cycle") and "pkg.high.b" in p and "pkg.low.a" in p for p in problems), problems
    assert any("pkg.high.c imports pkg.low.a inside a function" in p for p in problems), problems
    assert check_layers(root, layers, {"pkg.high.c": "why"}) != []  # the upward import still fails


def _role_words() -> set:
    from unidad_dist.core.sections import GENERIC_SECTIONS
    from unidad_dist.methods.base import BUILTIN, method_class

    words = set()
    for name in BUILTIN:
        words |= set(method_class(name).sections()) - set(GENERIC_SECTIONS) - {"algorithm"}
    return words


def role_names_outside_methods(root: Path, words: set) -> list[str]:
    out = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if rel.parts[0] == "methods" or rel.name == "testing.py":  # methods, and the tests' recipe builder
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            hit = None
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in words:
                hit = node.value
            elif isinstance(node, ast.Attribute) and node.attr in words:
                hit = f".{node.attr}"
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and any(
                    node.value.startswith(w + ".") for w in words):
                hit = node.value
            if hit:
                out.append(f"{rel}:{node.lineno}: {hit}")
    return out


def test_role_names_appear_only_in_methods():
    words = _role_words()
    assert {"student", "fake_teacher", "source_teacher", "target_teacher", "gan_heads"} <= words
    assert role_names_outside_methods(PACKAGE, words) == []


def test_the_role_name_check_finds_one(tmp_path):
    (tmp_path / "loop.py").write_text("def f(m, cfg):\n    return m.roles['student'], cfg.target_teacher\n")
    assert sorted(role_names_outside_methods(tmp_path, {"student", "target_teacher"})) == [
        "loop.py:2: .target_teacher", "loop.py:2: student"]


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_every_layer_prefix_names_a_module(module):
    parts = module.split(".")[1:]
    path = PACKAGE.joinpath(*parts) if parts else PACKAGE
    assert path.is_dir() or path.with_suffix(".py").is_file(), module
