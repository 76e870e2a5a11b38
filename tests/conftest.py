from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "recipes" / "tiny.toml"


@pytest.fixture(scope="session", autouse=True)
def _dataset_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Generated datasets go to a per-session cache, never the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PROTOAUDIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, _dataset_cache: None) -> Path:
    """One trained tiny run (two members and their ensemble), shared by the tests that only read it."""
    from protoaudit.engine.ensemble import train_ensemble
    from protoaudit.engine.recipe import load_recipe

    out = tmp_path_factory.mktemp("runs")
    recipe = load_recipe(TINY_RECIPE, out=str(out))
    return train_ensemble(recipe).run_dir


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The console entry point, as a user runs it: (exit code, stdout, stderr)."""
    from protoaudit.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    code = exc.value.code
    return (0 if code is None else int(code)), out, err


@contextlib.contextmanager
def counted_searches() -> Iterator[list[tuple[str, int, bool]]]:
    """Every ``PatchIndex.search`` made inside the block, in order: (split, k, whether every image's distances
    were kept)."""
    from protoaudit.engine.index.search import PatchIndex

    searched: list[tuple[str, int, bool]] = []
    original = PatchIndex.search

    def counting(
        self: PatchIndex, queries: object, k: int, per_image: bool = False, minima: object = None
    ) -> object:
        searched.append((str(self.info["split"]), k, minima is not None))
        return original(self, queries, k, per_image=per_image, minima=minima)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PatchIndex, "search", counting)
        yield searched
