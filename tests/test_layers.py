"""The package's layers: imports go one way only (core ← engine ← report ← cli), checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "protoaudit"
# lowest first; a module may import from its own layer and the layers before it
LAYERS = ["errors", "core", "engine", "report", "cli"]
# third-party packages a layer must not use: core has no files, terminal or CLI; only cli speaks typer
FORBIDDEN = {
    "errors": {"torch", "numpy", "rich", "typer", "jinja2"},
    "core": {"rich", "typer", "jinja2", "pandas", "pyarrow", "faiss"},
    "engine": {"typer", "jinja2", "seaborn"},
    "report": {"typer"},
}


def layer_of(module: str) -> str | None:
    """'protoaudit.engine.index.build' → 'engine'; the package root (lazy public API) has no layer."""
    parts = module.split(".")
    if parts[0] != "protoaudit" or len(parts) == 1 or parts[1] in ("__init__", "__main__"):
        return None
    return parts[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports, at any depth (inside functions and TYPE_CHECKING blocks too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "protoaudit":
                found += [(node.lineno, f"protoaudit.{a.name}") for a in node.names]
    return found


def violations(files: list[Path]) -> list[str]:
    out = []
    for path in files:
        own = layer_of(module_name(path))
        if own is None:
            continue
        rank = LAYERS.index(own)
        for line, target in imports(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            other = layer_of(target) if target.startswith("protoaudit.") else None
            if other is not None and other in LAYERS and LAYERS.index(other) > rank:
                out.append(f"{where} ({own}) imports {target} ({other}, a layer above)")
            if target.split(".")[0] in FORBIDDEN.get(own, set()):
                out.append(f"{where} ({own}) imports {target}")
    return out


def test_every_module_belongs_to_a_layer() -> None:
    top = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or p.is_dir()}
    top -= {"__init__", "__main__", "__pycache__"}
    assert top == set(LAYERS)


def test_imports_go_one_way() -> None:
    assert violations(sorted(PACKAGE.rglob("*.py"))) == []


@pytest.mark.parametrize(
    ("layer", "source", "expected"),
    [
        (
            "core",
            "from protoaudit.engine.run import Run\n",
            "imports protoaudit.engine.run (engine, a layer above)",
        ),
        ("engine", "def f():\n    from protoaudit.report import sheet\n", "(report, a layer above)"),
        ("core", "import rich\n", "(core) imports rich"),
        ("report", "from protoaudit.cli.common import err_console\n", "(cli, a layer above)"),
    ],
)
def test_the_check_finds_an_upward_import(tmp_path: Path, layer: str, source: str, expected: str) -> None:
    fake = (
        PACKAGE / layer / "_layer_probe.py"
    )  # named inside the package so its layer is known; never written
    real_read = Path.read_text

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        return source if self == fake else real_read(self, *args, **kwargs)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "read_text", read_text)
        found = violations([fake])
    assert len(found) == 1
    assert expected in found[0]
