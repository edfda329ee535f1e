"""The layout's promises, read off every import statement (function-level ones included):
nothing in model/ imports skip/ or weights/; weights/ does not import skip/; no method imports
the harness, the trace tools or training; and no two modules import each other, directly or
round a longer circle."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "skip", "tokenizer", "weights")


def module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports():
    """{module: the project's modules it imports}, a package's __init__ counted as the package."""
    found = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            name, is_pkg = module_name(path), path.name == "__init__.py"
            here = name if is_pkg else name.rpartition(".")[0]
            deps = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    deps |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:
                        up = here.split(".")[:len(here.split(".")) - node.level + 1]
                        base = ".".join(up + ([base] if base else []))
                    deps |= {base} | {f"{base}.{a.name}" for a in node.names}
            found[name] = {d for d in deps if d.split(".")[0] in PACKAGES}
    known = set(found)
    return {m: {d for d in deps if d in known and d != m} for m, deps in found.items()}


def test_model_and_weights_import_nothing_above_them():
    graph = imports()
    assert graph, "no modules found"
    bad = [(m, d) for m, deps in graph.items() for d in deps
           if (m.startswith("model") and d.split(".")[0] in ("skip", "weights"))
           or (m.startswith("weights") and d.startswith("skip"))]
    assert not bad, bad


def test_methods_import_neither_the_harness_nor_the_tools_built_on_them():
    graph = imports()
    above = ("skip.harness", "skip.trace", "skip.train")
    methods = [m for m in graph if m.startswith("skip.") and not m.startswith(above)]
    assert "skip.kangaroo" in methods and "skip.kangaroo_batch" in methods
    bad = [(m, d) for m in methods for d in graph[m] if d.startswith(above)]
    assert not bad, bad
    bad = [(m, d) for m in graph if m.startswith(("skip.trace", "skip.train")) for d in graph[m]
           if d.startswith("skip.harness")]
    assert not bad, bad


def test_no_import_circles():
    graph = imports()
    # a package's __init__ importing its own modules is not a circle: only module -> module edges
    edges = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state, circles = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(edges[m]):
            if state.get(d) == "open":
                circles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"
    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not circles, circles


def test_the_decoders_command_line_finds_the_converted_model_where_weights_puts_it():
    """model/__main__.py names the default model's folder itself (model/ imports nothing of weights/)."""
    from model.__main__ import DEFAULT_MODEL
    from weights import DEFAULT_MODEL as CONVERTED
    assert DEFAULT_MODEL == CONVERTED
