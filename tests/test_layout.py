"""The package's shape: no import cycles between its modules, modules of a readable size, and the
layers of the data flow importing only downwards (io <- engine <- methods <- api <- cli)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tsv_fast"
MAX_LINES = 400
# what each layer may import at module level (lazy imports inside functions are free)
LAYERS = {"io": {"io", "options", "reference"},
          "engine": {"engine", "io", "options", "reference", "backends"},
          "methods": {"methods", "engine", "io", "options", "reference", "backends"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path) -> set[str]:
    """tsv_fast modules imported at module level (not inside functions or TYPE_CHECKING)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tsv_fast")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("tsv_fast"):
                modules = {f"{target}.{a.name}" for a in node.names}
                found |= {m for m in modules if _exists(m)} or {target}
    return {m for m in found if m != name}


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def graph() -> dict[str, set[str]]:
    return {module_name(p): top_level_imports(p) for p in PACKAGE.rglob("*.py")}


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in edges.get(node, ()):
            nxt = nxt if nxt in edges else nxt.rsplit(".", 1)[0]
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, node, nxt]))
            if nxt in edges and not state.get(nxt):
                visit(nxt, [*path, node])
        state[node] = 2

    for node in edges:
        if not state.get(node):
            visit(node, [])


def test_layers_import_downwards():
    for module, imports in graph().items():
        layer = module.split(".")[1] if "." in module else ""
        allowed = LAYERS.get(layer)
        if allowed is None:
            continue
        for target in imports:
            top = target.split(".")[1] if target.count(".") else ""
            assert top in allowed, f"{module} imports {target}: the {layer} layer may import only {sorted(allowed)}"


def test_modules_are_short_or_say_why():
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().splitlines()
        if len(lines) > MAX_LINES:
            head = "\n".join(lines[:15]).lower()
            assert "over 400 lines" in head, f"{path.relative_to(PACKAGE)} has {len(lines)} lines and says not why"
