"""The package's architecture, read from its imports: no import cycles, and no lower layer importing a higher
one. Imports inside functions count too: a lazy import is still a dependency."""
import ast
from pathlib import Path

import pytest

SAU = Path(__file__).resolve().parent.parent / "sau"
CLIS = {"unlearn", "eval", "train", "weights_convert", "benchmarks"}  # top-level programs: nothing imports them

# Lowest first. A module may import its own layer and the layers below it. world and evaluation share a rank:
# the demo world's training measures with the scorer, and the metrics read the world's drawings. distributed (the
# rank-awareness under torchrun) is as low as common, which asks it which process writes.
LAYERS = {"distributed": 0, "common": 0, "models": 1, "weights": 2, "__init__": 2, "world": 3, "evaluation": 3,
          "attacks": 4, "method": 5, "detect": 5, "baselines": 6, "find_trigger": 6, "jobs": 7}


def module_name(path):
    parts = path.relative_to(SAU.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SAU.rglob("*.py")}


def layer(module):
    parts = module.split(".")
    return LAYERS["__init__"] if len(parts) == 1 else LAYERS[parts[1]]


def resolve(module, base):
    """`from base import x`: x is a module when such a file exists, else a name in `base`."""
    return module if module in MODULES else base


def imports(module):
    """The sau modules `module` imports, and the top-level names outside sau it imports."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package upwards
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [resolve(f"{base}.{alias.name}", base) for alias in node.names]
        else:
            continue
        for name in names:
            if name == "sau" or name.startswith("sau."):
                found.add(name if name in MODULES else name.rsplit(".", 1)[0])
            else:
                outside.add(name.split(".")[0])
    return found - {module}, outside


GRAPH = {m: imports(m)[0] for m in MODULES}


def test_every_module_has_a_layer():
    assert all(isinstance(layer(m), int) for m in MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_higher_layer_or_a_program(module):
    higher = [m for m in GRAPH[module] if layer(m) > layer(module)]
    assert not higher, f"{module} (layer {layer(module)}) imports higher layers: {higher}"
    programs = imports(module)[1] & CLIS
    assert not programs, f"{module} imports the command-line programs {programs}"


def test_no_import_cycles():
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for dependency in sorted(GRAPH[module]):
            visit(dependency)
        path.pop()
        done.add(module)

    for module in sorted(GRAPH):
        visit(module)


def test_the_rules_that_matter_most_by_name():
    """Spelled out: the models never import the method; the method never imports a job runner."""
    for module, deps in GRAPH.items():
        if module.startswith("sau.models"):
            assert not any(d.split(".")[1:2] in (["method"], ["baselines"], ["jobs"], ["attacks"]) for d in deps)
        if module == "sau.method":
            assert not any(d.startswith("sau.jobs") or d == "sau.baselines" for d in deps)


def test_the_check_would_catch_a_violation(tmp_path):
    """The parser sees a function-level import, and the layer table ranks it as a violation."""
    source = "def f():\n    from sau.method import remove_backdoor\n"
    node = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom))
    assert resolve(f"{node.module}.remove_backdoor", node.module) == "sau.method"
    assert layer("sau.method") > layer("sau.models.unet")
