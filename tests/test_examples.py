"""Every example of the README and of every command's ``--help`` runs as written on the quick start.

The examples are read from the README's ``bash`` and ``python`` blocks and from the rendered ``--help`` pages
(80 columns, as a pipe or a narrow terminal shows them), then run in one working folder that looks like a
checkout after the quick start, with a tiny run standing in for it — the same substitutions for every example:

- ``recipes/quickstart.toml`` is ``recipes/tiny.toml`` under the quick start's name, so ``reports/quickstart/``
  is the tiny run (train-ensemble examples make it, in the order written);
- an image id ``test/NNNNNN`` must be a test id of the quick start (its test ids are numbered after its
  training images); it is replaced by the tiny run's test id at the same offset;
- ``bird.jpg`` / ``bird.png`` (an image file of yours) are written from a test image; ``/tmp/…`` goes to the
  test's temporary folder; ``--open`` opens no browser (``BROWSER=true``).

Examples that need what a test machine lacks (a downloaded dataset, an original checkpoint, two processes)
are listed in SKIP with the reason; each entry must match an example, so the list cannot go stale.
"""

from __future__ import annotations

import re
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

SKIP = {
    "recipes/cub_bb.toml": "needs CUB-200-2011 on disk",
    "recipes/fashion_mnist.toml": "needs the Fashion-MNIST files",
    "import-protopnet": "needs a checkpoint of the original code (tests/test_import.py makes one)",
    "torchrun": "two processes (tests/test_distributed.py runs train-ensemble under torchrun)",
}
STAGES = (
    "train-ensemble",
    "data",
    "index",
    "global-analysis",
    "prune",
    "audit",
    "nearest-patches",
    "nearest-prototypes",
    "explain",
    "report",
)
IMAGE_ID = re.compile(r"\btest/(\d{6})\b")


def _commands(lines: list[str]) -> list[str]:
    """Shell lines → commands: continuation lines joined, comments dropped, ``a && b`` split."""
    out: list[str] = []
    joined = ""
    for raw in lines:
        line = raw.rstrip()
        if line.endswith("\\"):
            joined += line[:-1] + " "
            continue
        joined += line
        for part in joined.split("&&"):
            words = shlex.split(part, comments=True)
            if words:
                out.append(shlex.join(words))
        joined = ""
    return out


def readme_examples() -> tuple[list[str], list[str]]:
    """(shell commands, python blocks) of the README."""
    text = README.read_text(encoding="utf-8")
    shell: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        shell += _commands(block.splitlines())
    return shell, re.findall(r"```python\n(.*?)```", text, re.S)


def help_pages() -> dict[str, str]:
    """Every command's ``--help`` as printed to a pipe (80 columns)."""
    import typer.main

    from protoaudit.cli import app

    group = typer.main.get_command(app)
    names: list[list[str]] = []
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        sub = getattr(command, "commands", None)
        names += [[name, s] for s in sub] if sub else [[name]]
    return {" ".join(n): _help(n) for n in names}


def _help(words: list[str]) -> str:
    import contextlib
    import io

    from protoaudit.cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), pytest.raises(SystemExit):
        main([*words, "--help"])
    return buffer.getvalue()


def help_examples(page: str) -> list[str]:
    """The commands of a help page's Examples block; a command that the help wrapped mid-way (a line that
    neither starts a command nor continues one ending in ``\\``) fails here."""
    lines = page.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "Examples"]
    if not starts:
        return []
    block: list[str] = []
    previous_blank = False
    for line in lines[starts[0] + 1 :]:
        text = line.rstrip()
        if not text.strip():
            previous_blank = True
            continue
        indent = len(text) - len(text.lstrip())
        continues = bool(block) and block[-1].endswith("\\")
        if indent < 3 and not continues:
            assert previous_blank, f"an example was wrapped mid-command: {block[-1]!r} / {text!r}"
            break  # prose after the examples
        stripped = text.strip()
        if not continues and not stripped.startswith(("#", "protoaudit ", "torchrun ")):
            raise AssertionError(f"an example was wrapped mid-command: {block[-1]!r} / {text!r}")
        block.append(stripped)
        previous_blank = False
    return _commands(block)


def _stage(command: str) -> tuple[int, int]:
    words = command.split()
    verb = next((w for w in words if w in STAGES), "")
    order = STAGES.index(verb) if verb else len(STAGES)
    # train-ensemble: a first run before the ones that replace or resume it
    within = 0 if "--force" not in words and "--resume" not in words else 1 + ("--resume" in words)
    return order, within


def _skip_reason(command: str) -> str | None:
    return next((why for key, why in SKIP.items() if key in command), None)


def all_examples() -> list[str]:
    shell, _ = readme_examples()
    commands = [c for c in shell if re.search(r"(^|/)protoaudit |^torchrun ", c)]
    for page in help_pages().values():
        commands += help_examples(page)
    # the README's ".venv/bin/protoaudit" is the same command as "protoaudit"
    unique = list(dict.fromkeys(re.sub(r"^\S*/protoaudit ", "protoaudit ", c) for c in commands))
    return sorted(unique, key=_stage)


def test_help_pages_show_shapes_a_user_types() -> None:
    pages = help_pages()
    assert "data check" in pages
    assert "train-ensemble" in pages
    for name, page in pages.items():
        assert "{" not in page.split("\n\n")[1], f"{name}: usage shows a {{placeholder}}"
        assert "<bool>" not in page, f"{name}: a flag shows <bool>"
        assert help_examples(page), f"{name}: no examples in its help"


@pytest.fixture(scope="module")
def checkout(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A working folder like a checkout: recipes/ (quickstart.toml being the tiny recipe under the quick
    start's name), reports/ (empty: the examples fill it), and two image files of a user's."""
    from PIL import Image

    from protoaudit.engine.run import load_run

    work = tmp_path_factory.mktemp("checkout")
    shutil.copytree(ROOT / "recipes", work / "recipes")
    tiny = (ROOT / "recipes" / "tiny.toml").read_text(encoding="utf-8")
    (work / "recipes" / "quickstart.toml").write_text(
        tiny.replace('name = "tiny"', 'name = "quickstart"'), encoding="utf-8"
    )
    (work / "reports").mkdir()
    test = load_run(tiny_run).dataset().test
    pixels = (test.batch([0])[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    Image.fromarray(pixels).resize((80, 80)).save(work / "bird.png")
    Image.fromarray(pixels).resize((90, 70)).save(work / "bird.jpg", quality=90)
    return work


def _quickstart_test_ids() -> range:
    """The quick start's test image ids: the embedded dataset numbers its training images first."""
    from protoaudit.engine.recipe import load_recipe

    data = load_recipe(ROOT / "recipes" / "quickstart.toml").data
    first = data.n_classes * data.train_per_class
    return range(first, first + data.n_classes * data.test_per_class)


def _resolve(command: str, work: Path, tmp: Path, tiny_ids: list[str]) -> list[str]:
    quick = _quickstart_test_ids()

    def image(match: re.Match[str]) -> str:
        number = int(match.group(1))
        assert number in quick, f"{match.group(0)} is not a test image of the quick start ({command})"
        return tiny_ids[(number - quick.start) % len(tiny_ids)]

    command = IMAGE_ID.sub(image, command).replace("/tmp/", f"{tmp}/")
    words = shlex.split(command)
    assert words[0] == "protoaudit", command
    return words[1:]


def test_every_example_runs_on_the_quick_start(
    checkout: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import torch

    from protoaudit.cli import main
    from protoaudit.engine.run import load_run

    torch.set_num_threads(1)
    monkeypatch.chdir(checkout)
    monkeypatch.setenv("BROWSER", "true")
    examples = all_examples()
    assert any("train-ensemble recipes/quickstart.toml" in e for e in examples)
    assert any("test/000612" in e for e in examples)
    used = {key for key in SKIP for e in examples if key in e}
    assert used == set(SKIP), f"SKIP entries that match no example: {set(SKIP) - used}"
    ran = []
    tiny_ids: list[str] = []
    for example in examples:
        if _skip_reason(example):
            continue
        if not tiny_ids and (checkout / "reports" / "quickstart" / "run.json").is_file():
            tiny_ids = list(load_run(checkout / "reports" / "quickstart").dataset().test.image_ids)
            first = int(tiny_ids[0].split("/")[1])
            tiny_recipe = load_run(checkout / "reports" / "quickstart").recipe().data
            assert (
                first == tiny_recipe.n_classes * tiny_recipe.train_per_class
            )  # the numbering _quickstart_test_ids assumes
        args = _resolve(example, checkout, tmp_path, tiny_ids)
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        out, err = capsys.readouterr()
        code = exit_info.value.code or 0
        allowed = (0, 3) if "--fail-under" in args else (0,)  # 3: the audit gate did its job
        assert code in allowed, f"{example!r} exited {code}: {err.strip()[-600:]}"
        if "--json" in args:
            import json

            json.loads(out)
        ran.append(example)
    assert len(ran) >= 25


def test_readme_python_example_runs(checkout: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, blocks = readme_examples()
    assert len(blocks) == 1
    monkeypatch.chdir(checkout)
    from protoaudit.engine.run import load_run

    if not (checkout / "reports" / "quickstart" / "run.json").is_file():  # this test ran first, or alone
        from protoaudit.cli import main

        for args in (
            ["train-ensemble", "recipes/quickstart.toml", "-q"],
            ["prune", "reports/quickstart", "-q"],
        ):
            with pytest.raises(SystemExit) as exit_info:
                main(args)
            assert not exit_info.value.code, args

    tiny_ids = list(load_run(checkout / "reports" / "quickstart").dataset().test.image_ids)
    quick = _quickstart_test_ids()
    code = IMAGE_ID.sub(lambda m: tiny_ids[(int(m.group(1)) - quick.start) % len(tiny_ids)], blocks[0])
    namespace: dict[str, object] = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert (checkout / "sheet.png").is_file()
    assert namespace["distances"].shape == (4, 6)  # type: ignore[attr-defined]
