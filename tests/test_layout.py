"""The layout rules of DESIGN.md that code review would otherwise have to catch.

Only `engine/` and `checkpoint/` import DeepSpeed; only the wandb logger imports wandb; only
`engine/float8.py` imports torchao (an optional extra); no module of the package grows past
500 lines.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mmpretrain"
ALLOWED = {
    "deepspeed": ("engine/", "checkpoint/"),
    "wandb": ("logging/wandb_logger.py",),
    "torchao": ("engine/float8.py",),
}
MAX_LINES = 500


def _imported_roots(path: Path) -> set[str]:
    """Top-level package names imported anywhere in the file (function bodies included)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def _modules() -> list[Path]:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 20, f"package not found under {PACKAGE}"
    return modules


def test_heavy_dependencies_are_imported_only_where_allowed() -> None:
    offenders = []
    for path in _modules():
        rel = path.relative_to(PACKAGE).as_posix()
        for name, places in ALLOWED.items():
            if name in _imported_roots(path) and not rel.startswith(places):
                offenders.append(f"{rel} imports {name} (allowed only in {', '.join(places)})")
    assert not offenders, "\n".join(offenders)


def test_the_rule_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    import deepspeed.comm as dist\n    from wandb import init\n")
    assert {"deepspeed", "wandb"} <= _imported_roots(module)


def test_modules_stay_under_the_line_limit() -> None:
    long = [f"{p.relative_to(PACKAGE)}: {n} lines" for p in _modules()
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, "split these modules:\n" + "\n".join(long)
