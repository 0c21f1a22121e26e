"""The package levels the README's Layout draws: a module imports only packages of lower levels
(and its own), so data flows one way and nothing imports in a circle."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
LEVELS = [  # lowest first
    ("t5lite.config", "t5lite.hardware", "t5lite.distributed", "t5lite.ratings"),
    ("t5lite.layers",),
    ("t5lite.models",),
    ("t5lite.quantization", "t5lite.sharding", "t5lite.decoding", "t5lite.interop"),
    ("t5lite.data", "t5lite.pruning"),
    ("t5lite.train",),
    ("t5lite.scoring",),
    ("t5lite.scaling", "t5lite.inference"),
    ("t5lite.conversion", "t5lite.comparison"),
    ("t5lite.cli",),
]
LEVEL = {package: level for level, packages in enumerate(LEVELS) for package in packages}


def package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def imported_modules(path: pathlib.Path):
    """(line, module) of every t5lite or pallas_kernels import in a file, `from t5lite import x` as t5lite.x."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "t5lite" else [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        yield from ((node.lineno, name) for name in names if name.split(".")[0] in ("t5lite", "pallas_kernels"))


def test_no_module_imports_a_package_above_its_own():
    upward = []
    for path in sorted((ROOT / "t5lite").rglob("*.py")):
        own = package(".".join(path.relative_to(ROOT).with_suffix("").parts))
        if own == "t5lite.__init__":
            continue
        assert own in LEVEL, f"{own} has no level: add it to LEVELS and to the README's Layout"
        for line, module in imported_modules(path):
            target = package(module)
            if target.startswith("t5lite.") and target != own and LEVEL[target] >= LEVEL[own]:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {module} ({own} is not above {target})")
    assert not upward, "\n".join(upward)


def test_kernels_know_nothing_of_t5lite():
    found = [
        f"{path.relative_to(ROOT)}:{line} {module}"
        for path in sorted((ROOT / "pallas_kernels").rglob("*.py"))
        for line, module in imported_modules(path)
        if module.startswith("t5lite")
    ]
    assert not found, found


def test_the_readme_draws_the_levels():
    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1]
    for level, packages in enumerate(LEVELS):
        for name in packages:
            assert f"{level}  {name.replace('.', '/')}" in layout, name


def test_no_function_is_longer_than_80_lines():
    """A longer function is two stories; split it where the second begins."""
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in sorted((ROOT / "t5lite").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80
    ]
    assert not long, "\n".join(long)
