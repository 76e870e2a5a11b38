"""The bad-input corpus: each case gives ONE line on stderr naming the problem, its documented exit code
(2 bad input, 4 output not writable; see protoaudit/errors.py), nothing on stdout, and leaves no partial file.

Static inputs live in tests/bad_inputs/; cases that cannot be static files (a tampered copy of a trained run,
a pickle payload, a read-only or full disk) are generated here. Recipe cases already covered by
tests/test_cli.py (unknown keys, wrong type, negative epochs, zero prototypes, unknown trunk, duplicate member,
bad device string, missing members, warm longer than training, malformed TOML, unknown data kind, missing
weights file, missing recipe, bad --set) are not repeated here.

Disk failures are simulated, documented per case: a *full disk* by turning the file descriptor of one
atomic write's temporary file into /dev/full, so the kernel itself answers ENOSPC on write; a *read-only
output directory* by chmod 0555 when the tests do not run as root, and otherwise (root ignores permissions)
by making directory creation and temporary-file creation under that directory fail with EROFS.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from protoaudit.cli import main

from .conftest import TINY_RECIPE

CORPUS = Path(__file__).parent / "bad_inputs"
MARKER_ENV = "PROTOAUDIT_BAD_INPUT_EXECUTED"


@dataclass
class Env:
    """What a case may set up: a scratch folder, the trained tiny run, monkeypatch."""

    tmp: Path
    tiny_run: Path
    monkeypatch: pytest.MonkeyPatch
    checkpoint_run: Callable[[], Path]

    @property
    def runs(self) -> Path:
        return self.tmp / "runs"


@dataclass
class Case:
    id: str
    setup: Callable[[Env], list[str]]  # → command-line arguments
    code: int
    fragment: str  # must appear in the one stderr line
    unchanged: bool = True  # the scratch folder is byte-identical afterwards (else: whole files only)
    check: Callable[[Env], None] | None = None
    skip: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    quiet: bool = True  # append --quiet (commands without the option: False)
    absent: str = ""  # must not appear in the line (e.g. advice that would be wrong)


# -- helpers that build broken inputs -------------------------------------------------------------------


def train(recipe: Path, *more: str) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        return ["train-ensemble", str(recipe), "--out", str(env.runs), *more]

    return setup


def folder_recipe(make_tree: Callable[[Path], Path]) -> Callable[[Env], list[str]]:
    """tests/bad_inputs/imagefolder.toml with data.root set to a tree that ``make_tree`` builds."""

    def setup(env: Env) -> list[str]:
        root = make_tree(env.tmp / "data")
        return [
            "train-ensemble",
            str(CORPUS / "imagefolder.toml"),
            "--out",
            str(env.runs),
            "--set",
            f"data.root={json.dumps(str(root))}",
        ]

    return setup


def png(path: Path, colour: tuple[int, int, int]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), colour).save(path)


def class_tree(base: Path, classes: dict[str, int]) -> Path:
    for k, (name, count) in enumerate(classes.items()):
        (base / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            png(base / name / f"{i}.png", (40 * k, 10 * i, 100))
    return base


def empty_class(base: Path) -> Path:
    return class_tree(base, {"a": 4, "b": 0, "c": 4})


def corrupt_image(base: Path) -> Path:
    class_tree(base, {"a": 4, "b": 4})
    (base / "b" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image at all" * 10)
    return base


def root_is_a_file(base: Path) -> Path:
    base.mkdir(parents=True)
    (base / "images.zip").write_bytes(b"PK\x03\x04")
    return base / "images.zip"


def root_missing(base: Path) -> Path:
    return base / "nowhere"


class Payload:
    """A pickle that, if ever unpickled, sets an environment variable (harmless, detectable)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"import os; os.environ[{MARKER_ENV!r}] = '1'",))


def write_payload(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"prototype_vectors": Payload()}, protocol=2))  # torch.save's protocol
    return path


def payload_not_executed(env: Env) -> None:
    assert MARKER_ENV not in os.environ, "a pickle payload was executed"


def imported(make_file: Callable[[Path], Path], arch: str = "resnet18") -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        recipe = env.tmp / "tiny64.toml"
        recipe.write_text(TINY_RECIPE.read_text().replace("image_size = 32", "image_size = 64"))
        path = make_file(env.tmp / "in")
        return [
            "import-protopnet",
            str(path),
            "--arch",
            arch,
            "--recipe",
            str(recipe),
            "--out",
            str(env.runs),
        ]

    return setup


def original_like(base: Path, name: str = "model.pth", **changes: Any) -> Path:
    """A small state dict with the original's top-level keys (no trunk: fails before the trunk matters)."""
    state = {
        "features.conv1.weight": torch.zeros(64, 3, 7, 7),
        "add_on_layers.0.weight": torch.zeros(16, 512, 1, 1),
        "add_on_layers.0.bias": torch.zeros(16),
        "prototype_vectors": torch.rand(6, 16, 1, 1),
        "ones": torch.ones(6, 16, 1, 1),
        "last_layer.weight": torch.zeros(3, 6),
    }
    for key, value in changes.items():
        if value is None:
            state.pop(key)
        else:
            state[key] = value
    base.mkdir(parents=True, exist_ok=True)
    torch.save(state, base / name)
    return base / name


def full_resnet18(base: Path, n_classes: int = 3) -> Path:
    """A complete original-layout resnet18 ProtoPNet state dict (bottleneck add-on, D = 16)."""
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    state = {f"features.{k}": v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    cin, i = 512, 0
    while cin > 16 or i == 0:
        out = max(16, cin // 2)
        for a, b in ((cin, out), (out, out)):
            state[f"add_on_layers.{i}.weight"] = torch.randn(b, a, 1, 1)
            state[f"add_on_layers.{i}.bias"] = torch.zeros(b)
            i += 2
        cin //= 2
    m = 2 * n_classes
    state.update(
        {
            "prototype_vectors": torch.rand(m, 16, 1, 1),
            "ones": torch.ones(m, 16, 1, 1),
            "last_layer.weight": torch.randn(n_classes, m),
        }
    )
    base.mkdir(parents=True, exist_ok=True)
    torch.save(state, base / "rn18.pth")
    return base / "rn18.pth"


def truncated_pth(base: Path) -> Path:
    path = original_like(base)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def truncated_safetensors(base: Path) -> Path:
    from protoaudit.engine.io import save_tensors

    base.mkdir(parents=True, exist_ok=True)
    save_tensors(base / "model.safetensors", {"prototype_vectors": torch.rand(6, 16, 1, 1)})
    data = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(data[:-40])
    return base / "model.safetensors"


def a_directory(base: Path) -> Path:
    (base / "model.pth").mkdir(parents=True)
    return base / "model.pth"


# -- run directories and checkpoints, tampered -----------------------------------------------------------


def resume(tamper: Callable[[Path], None], source: str = "tiny") -> Callable[[Env], list[str]]:
    """Copy a run (the finished tiny run, or one interrupted with a checkpoint), tamper with it, --resume it."""

    def setup(env: Env) -> list[str]:
        origin = env.tiny_run if source == "tiny" else env.checkpoint_run()
        run_dir = env.runs / "tiny"
        shutil.copytree(origin, run_dir)
        tamper(run_dir)
        return ["train-ensemble", str(TINY_RECIPE), "--out", str(env.runs), "--resume"]

    return setup


def newer_run_format(run_dir: Path) -> None:
    meta = json.loads((run_dir / "run.json").read_text())
    meta["format_version"] = 99
    (run_dir / "run.json").write_text(json.dumps(meta))


def dataset_changed(run_dir: Path) -> None:
    meta = json.loads((run_dir / "run.json").read_text())
    meta["status"] = "interrupted"
    meta["dataset"]["fingerprint"] = "0" * 64
    (run_dir / "run.json").write_text(json.dumps(meta))


def run_json_not_json(run_dir: Path) -> None:
    (run_dir / "run.json").write_text('{"format_version": 1, "status": "inter')


def truncated_member_weights(run_dir: Path) -> None:
    meta = json.loads((run_dir / "run.json").read_text())
    meta["status"] = "interrupted"
    (run_dir / "run.json").write_text(json.dumps(meta))
    weights = run_dir / "members" / "vgg" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def _pointer(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    pointer = run_dir / "members" / "resnet" / "checkpoint" / "latest.json"
    return pointer, json.loads(pointer.read_text())


def _replace_tensor_file(run_dir: Path, data: bytes) -> None:
    import hashlib

    pointer, doc = _pointer(run_dir)
    (pointer.parent / doc["tensors"]["file"]).write_bytes(data)
    doc["tensors"]["sha256"] = hashlib.sha256(data).hexdigest()  # a consistent-looking pointer
    pointer.write_text(json.dumps(doc))


def flipped_checkpoint_byte(run_dir: Path) -> None:
    pointer, doc = _pointer(run_dir)
    path = pointer.parent / doc["tensors"]["file"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def truncated_checkpoint(run_dir: Path) -> None:
    pointer, doc = _pointer(run_dir)
    _replace_tensor_file(run_dir, (pointer.parent / doc["tensors"]["file"]).read_bytes()[:-100])


def pickle_checkpoint(run_dir: Path) -> None:
    _replace_tensor_file(run_dir, pickle.dumps({"model.weight": Payload()}))


def checkpoint_of_other_architecture(run_dir: Path) -> None:
    """The checkpoint of a tiny_vgg member, relabelled as the resnet member's."""
    from protoaudit.core.model import MemberConfig, ProtoPNet
    from protoaudit.engine.checkpoint import MemberCheckpoint, capture

    pointer, doc = _pointer(run_dir)
    model = ProtoPNet(MemberConfig("tiny_vgg", 3, 4, 16, image_size=32))
    opt = torch.optim.Adam(model.parameters())
    state = capture(
        1,
        "sgd",
        model,
        {"warm": opt, "joint": opt, "last_layer": opt},
        _Sched(),
        torch.Generator(),
        [],
        {},
        None,
    )
    state.identity = doc["identity"]
    shutil.rmtree(pointer.parent)
    MemberCheckpoint(pointer.parent).save(state)


class _Sched:
    def state_dict(self) -> dict[str, Any]:
        return {}


def checkpoint_of_other_member(run_dir: Path) -> None:
    pointer, doc = _pointer(run_dir)
    doc["identity"]["member"] = "vgg"
    pointer.write_text(json.dumps(doc))


def newer_checkpoint_format(run_dir: Path) -> None:
    pointer, doc = _pointer(run_dir)
    doc["format_version"] = 99
    pointer.write_text(json.dumps(doc))


# -- disks that cannot be written ------------------------------------------------------------------------


def read_only_output(env: Env) -> list[str]:
    locked = env.tmp / "locked"
    locked.mkdir()
    if os.geteuid() != 0:
        locked.chmod(0o555)  # the test puts 0755 back afterwards
    else:  # root ignores permissions: fail as a read-only file system would
        real_mkdir, real_mkstemp = os.mkdir, tempfile.mkstemp

        def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
            if str(path).startswith(str(locked)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            real_mkdir(path, *args, **kwargs)

        def mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
            if str(kwargs.get("dir", "")).startswith(str(locked)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(kwargs["dir"]))
            return real_mkstemp(*args, **kwargs)

        env.monkeypatch.setattr(os, "mkdir", mkdir)
        env.monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    return ["train-ensemble", str(TINY_RECIPE), "--out", str(locked)]


def full_disk_while_saving_a_member(env: Env) -> list[str]:
    """The disk fills up while the first member's weights are written (after run.json, recipe.toml)."""
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        fd, path = real_mkstemp(*args, **kwargs)
        if ".model.safetensors." in Path(path).name:
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, fd)  # every write to this temporary file now fails with ENOSPC, from the kernel
            os.close(full)
        return fd, path

    env.monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    return ["train-ensemble", str(TINY_RECIPE), "--out", str(env.runs), "--set", "index.build=false"]


def full_disk_check(env: Env) -> None:
    run_dir = env.runs / "tiny"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
    assert not (run_dir / "members" / "vgg" / "model.safetensors").exists()
    assert not (run_dir / "accuracy.csv").exists()


def failed_status(env: Env) -> None:
    meta = json.loads((env.runs / "tiny" / "run.json").read_text())
    assert meta["status"] == "failed"


def out_is_a_file(env: Env) -> list[str]:
    env.tmp.mkdir(exist_ok=True)
    (env.tmp / "out").write_text("not a folder")
    return ["train-ensemble", str(TINY_RECIPE), "--out", str(env.tmp / "out")]


def out_is_a_foreign_folder(env: Env) -> list[str]:
    (env.runs / "tiny").mkdir(parents=True)
    (env.runs / "tiny" / "thesis.tex").write_text("\\documentclass{article}")
    return ["train-ensemble", str(TINY_RECIPE), "--out", str(env.runs)]


def weights_file_is_a_pickle(env: Env) -> list[str]:
    payload = write_payload(env.tmp / "weights" / "tiny_vgg.pth")
    return train(TINY_RECIPE, "--set", f"members.vgg.weights={json.dumps(str(payload))}")(env)


# -- a trained run, broken, then given to a command that reads it --------------------------------------------

FIRST_TEST_IMAGE = "test/000048"  # the tiny recipe's 3 classes × 16 training images come first


def _run_command(command: str, run_dir: Path) -> list[str]:
    return {
        "explain": ["explain", str(run_dir), FIRST_TEST_IMAGE],
        "report": ["report", str(run_dir), "--reasoning", "1", "--deletion", "1"],
        "prune": ["prune", str(run_dir), "--finetune-epochs", "1"],
        "index": ["index", str(run_dir), "--force"],
        "nearest-patches": ["nearest-patches", str(run_dir), "--member", "vgg", "--prototype", "0"],
        "nearest-prototypes": ["nearest-prototypes", str(run_dir), FIRST_TEST_IMAGE, "--member", "vgg"],
        "global-analysis": ["global-analysis", str(run_dir), "--no-thumbnails"],
        "train --resume": ["train-ensemble", str(TINY_RECIPE), "--out", str(run_dir.parent), "--resume"],
    }[command]


QUIET = {"report", "prune", "index", "global-analysis", "train --resume"}  # the commands with --quiet
LOADERS = ["explain", "report", "prune", "index", "nearest-patches", "nearest-prototypes", "global-analysis"]


def on_run(tamper: Callable[[Path], None], command: str, *more: str) -> Callable[[Env], list[str]]:
    """Copy the trained tiny run, break it with ``tamper``, give it to ``command``."""

    def setup(env: Env) -> list[str]:
        run_dir = env.runs / "tiny"
        shutil.copytree(env.tiny_run, run_dir)
        tamper(run_dir)
        if command == "train --resume":  # the run was interrupted during its second member
            shutil.rmtree(run_dir / "members" / "resnet")
            (run_dir / "accuracy.csv").unlink()
            meta = json.loads((run_dir / "run.json").read_text())
            meta["status"] = "interrupted"
            (run_dir / "run.json").write_text(json.dumps(meta))
        return [*_run_command(command, run_dir), *more]

    return setup


def flipped_weight_byte(run_dir: Path) -> None:
    path = run_dir / "members" / "vgg" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one bit of one weight: the file still parses
    path.write_bytes(bytes(data))


def prototypes_csv_missing(run_dir: Path) -> None:
    (run_dir / "members" / "vgg" / "prototypes.csv").unlink()


def prototype_class_out_of_range(run_dir: Path) -> None:
    path = run_dir / "members" / "vgg" / "model.json"
    meta = json.loads(path.read_text())
    meta["config"]["prototype_class"][0] = 99
    path.write_text(json.dumps(meta))


def nan_in_prototypes_csv(run_dir: Path) -> None:
    path = run_dir / "members" / "vgg" / "prototypes.csv"
    lines = path.read_text().splitlines()
    header, row = lines[0].split(","), lines[1].split(",")
    row[header.index("distance")] = "nan"
    lines[1] = ",".join(row)
    path.write_text("\n".join(lines) + "\n")


def undecodable_recipe(run_dir: Path) -> None:
    (run_dir / "recipe.toml").write_bytes(b"\xff\xfe name = 'tiny'")


def model_json_missing(run_dir: Path) -> None:
    (run_dir / "members" / "vgg" / "model.json").unlink()


def recipe_with_test_fraction_zero(run_dir: Path) -> None:
    """The run's recipe.toml as an earlier protoaudit accepted it: a folder dataset with no test split."""
    import tomllib

    import tomli_w

    recipe = tomllib.loads((run_dir / "recipe.toml").read_text())
    recipe["data"] = {"kind": "imagefolder", "root": str(run_dir / "images"), "test_fraction": 0.0}
    (run_dir / "recipe.toml").write_text(tomli_w.dumps(recipe))


def older_checkpoint_format(run_dir: Path) -> None:
    pointer, doc = _pointer(run_dir)
    doc["format_version"] = 1
    pointer.write_text(json.dumps(doc))


def read_only(env: Env, folder: Path) -> None:
    """Make ``folder`` unwritable: chmod when not root, else fail as a read-only file system would."""
    if os.geteuid() != 0:
        for path in [folder, *folder.rglob("*")]:
            if path.is_dir():
                path.chmod(0o555)  # the test puts 0755 back afterwards
        return
    real_mkdir, real_mkstemp = os.mkdir, tempfile.mkstemp

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        if str(path).startswith(str(folder)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        real_mkdir(path, *args, **kwargs)

    def mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        if str(kwargs.get("dir", "")).startswith(str(folder)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(kwargs["dir"]))
        return real_mkstemp(*args, **kwargs)

    env.monkeypatch.setattr(os, "mkdir", mkdir)
    env.monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def prune_read_only_run(env: Env) -> list[str]:
    run_dir = env.runs / "tiny"
    shutil.copytree(env.tiny_run, run_dir)
    read_only(env, run_dir)
    return _run_command("prune", run_dir)


def threads_zero(command: str) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        return [*_run_command(command, env.tiny_run), "--threads", "0"]

    return setup


def zip_pickle(base: Path) -> Path:
    """torch.save's own zip format, carrying a pickled object (not only tensors)."""
    base.mkdir(parents=True, exist_ok=True)
    torch.save({"prototype_vectors": Payload()}, base / "model.pth")
    return base / "model.pth"


def raw_pickle_protocol_4(base: Path) -> Path:
    """A plain pickle of another protocol than torch.save's: torch would warn before failing."""
    base.mkdir(parents=True, exist_ok=True)
    (base / "model.pth").write_bytes(pickle.dumps({"prototype_vectors": Payload()}, protocol=4))
    return base / "model.pth"


TAMPERED = "members/vgg/model.safetensors: its sha256 differs from the one recorded in model.json"
RUN_CASES = [
    *[
        Case(f"flipped weight byte: {c}", on_run(flipped_weight_byte, c), 2, TAMPERED, quiet=c in QUIET, absent="rebuild", unchanged=c != "train --resume")
        for c in [*LOADERS, "train --resume"]
    ],
    *[
        Case(f"prototypes.csv missing: {c}", on_run(prototypes_csv_missing, c), 2, "members/vgg/prototypes.csv: file not found", quiet=c in QUIET)
        for c in ("prune", "explain", "report")
    ],
    *[
        Case(f"prototype_class out of range: {c}", on_run(prototype_class_out_of_range, c), 2, "model.json: config.prototype_class[0] is 99, not a class index in 0..2", quiet=c in QUIET, unchanged=c != "train --resume")
        for c in [*LOADERS, "train --resume"]
    ],
    *[
        Case(f"model.json missing: {c}", on_run(model_json_missing, c), 2, "members/vgg/model.json is missing", quiet=c in QUIET)
        for c in ("explain", "report", "prune", "nearest-patches")
    ],
    *[
        Case(f"--threads 0: {c}", threads_zero(c), 2, "--threads: expected a positive number of CPU threads, got 0", quiet=c in QUIET)
        for c in [*(c for c in LOADERS if c != "prune"), "train --resume"]  # prune has no --threads
    ],
    Case("accuracy.csv missing: prune", on_run(lambda d: (d / "accuracy.csv").unlink(), "prune"), 2, "accuracy.csv: file not found; the run did not finish"),
    Case("accuracy.csv not CSV: prune", on_run(lambda d: (d / "accuracy.csv").write_text('model,"unclosed'), "prune"), 2, "accuracy.csv: not a readable CSV table"),
    Case("members folder gone: index", on_run(lambda d: shutil.rmtree(d / "members"), "index"), 2, "has no member to index"),
    Case("NaN in prototypes.csv: report", on_run(nan_in_prototypes_csv, "report"), 2, "prototypes.csv: row 1 has distance = nan, not a finite number"),
    Case("undecodable recipe.toml: report", on_run(undecodable_recipe, "report"), 2, "recipe.toml is not UTF-8 text"),
    Case("prune on a read-only run", prune_read_only_run, 4, "Read-only file system" if os.geteuid() == 0 else "Permission denied"),
]  # fmt: skip

NO_CUDA = "needs a machine without CUDA" if torch.cuda.is_available() else None
NO_DEV_FULL = None if Path("/dev/full").exists() else "needs /dev/full"

CASES = [
    # recipes (static files in tests/bad_inputs/)
    Case("recipe not UTF-8", train(CORPUS / "recipe_not_utf8.toml"), 2, "is not UTF-8 text"),
    Case("recipe empty", train(CORPUS / "recipe_empty.toml"), 2, "name: required key is missing"),
    Case("recipe duplicate key", train(CORPUS / "recipe_duplicate_key.toml"), 2, "invalid TOML: Cannot overwrite a value"),
    Case("run name climbs out", train(CORPUS / "recipe_name_path_traversal.toml"), 2, "name: String should match pattern"),
    Case("member name with slash", train(CORPUS / "recipe_member_name_with_slash.toml"), 2, "members[0].name:"),
    Case("members is a table", train(CORPUS / "recipe_members_is_a_table.toml"), 2, "members: Input should be a valid list"),
    Case("NaN learning rate", train(CORPUS / "recipe_nan_learning_rate.toml"), 2, "lr.trunk: Input should be a finite number (got nan)"),
    Case("infinite learning rate", train(CORPUS / "recipe_inf_learning_rate.toml"), 2, "lr.warm_add_on: Input should be a finite number (got inf)"),
    Case("NaN loss coefficient", train(CORPUS / "recipe_nan_loss_coefficient.toml"), 2, "loss.cluster: Input should be a finite number (got nan)"),
    Case("10⁹ training images per class", train(CORPUS / "recipe_huge_train_per_class.toml"), 2, "data.train_per_class: Input should be less than or equal to 100000"),
    Case("generated dataset beyond memory", train(CORPUS / "recipe_dataset_too_large.toml"), 2, "data: the generated images would take 126.9 GiB of memory"),
    Case("batch of 10⁷ images", train(CORPUS / "recipe_huge_batch.toml"), 2, "schedule.batch_size: Input should be less than or equal to 65536"),
    Case("test_fraction = 0", train(CORPUS / "recipe_test_fraction_zero.toml"), 2, "data.test_fraction: Input should be greater than 0"),
    Case("--threads 0: train-ensemble", train(TINY_RECIPE, "--threads", "0"), 2, "--threads: expected a positive number of CPU threads, got 0"),
    Case("training diverges", train(TINY_RECIPE, "--set", "lr.warm_add_on=1e30", "--set", "index.build=false"), 2, "member vgg diverged in its warm stage, epoch 1/3: the loss became nan", unchanged=False, check=failed_status),
    Case("push every 0", train(CORPUS / "recipe_push_every_zero.toml"), 2, "schedule.push_every:"),
    Case("zero threads", train(CORPUS / "recipe_zero_threads.toml"), 2, "threads: Input should be greater than or equal to 1"),
    Case("huge image", train(CORPUS / "recipe_huge_image.toml"), 2, "data.image_size: Input should be less than or equal to 512"),
    Case("parts larger than image", train(CORPUS / "recipe_parts_larger_than_image.toml"), 2, "data: part_max must be <="),
    Case("recipe is a directory", lambda env: ["train-ensemble", str(CORPUS)], 2, "is a directory, expected a .toml file"),
    Case("CUDA on a CPU machine", train(TINY_RECIPE, "--device", "cuda"), 2, "CUDA is not available", skip=NO_CUDA),
    # datasets (ImageFolder trees built per case)
    Case("class with no images", folder_recipe(empty_class), 2, "class 'b' has no images", unchanged=False),
    Case("corrupt image", folder_recipe(corrupt_image), 2, "b/2.png", unchanged=False),
    Case("dataset path is a file", folder_recipe(root_is_a_file), 2, "images.zip", unchanged=False),
    Case("dataset path missing", folder_recipe(root_missing), 2, "does not exist", unchanged=False),
    # output locations
    Case("output is a file", out_is_a_file, 2, "Not a directory"),
    Case("output folder is not a run", out_is_a_foreign_folder, 2, "is a non-empty folder that is not a protoaudit run"),
    Case("read-only output directory", read_only_output, 4, "Read-only file system" if os.geteuid() == 0 else "Permission denied"),
    Case("full disk", full_disk_while_saving_a_member, 4, "model.safetensors: No space left on device", unchanged=False, check=full_disk_check, skip=NO_DEV_FULL),
    # weights and foreign checkpoints
    Case("trunk weights are a pickle", weights_file_is_a_pickle, 2, "holds pickled Python objects", unchanged=False, check=payload_not_executed),
    Case("import: pickle payload .pth", imported(lambda d: write_payload(d / "model.pth")), 2, "is not a state dict saved with weights only: it holds pickled Python objects (GLOBAL ", check=payload_not_executed),
    Case("import: torch zip carrying a pickle", imported(zip_pickle), 2, "is not a state dict saved with weights only: it holds pickled Python objects (GLOBAL ", check=payload_not_executed),
    Case("import: raw pickle, protocol 4", imported(raw_pickle_protocol_4), 2, "model.pth is not", check=payload_not_executed),
    Case("import: pickle renamed .safetensors", imported(lambda d: write_payload(d / "model.safetensors")), 2, "not a readable safetensors file", check=payload_not_executed),
    Case("import: truncated .pth", imported(truncated_pth), 2, "is not a readable torch checkpoint"),
    Case("import: truncated safetensors", imported(truncated_safetensors), 2, "not a readable safetensors file"),
    Case("import: random bytes", imported(lambda d: CORPUS / "random_bytes.pth"), 2, "is not a readable torch checkpoint"),
    Case("import: not a ProtoPNet", imported(lambda d: original_like(d, prototype_vectors=None)), 2, "no 'prototype_vectors' entry"),
    Case("import: 2x2 prototypes", imported(lambda d: original_like(d, prototype_vectors=torch.rand(6, 16, 2, 2))), 2, "only (m, D, 1, 1) prototypes"),
    Case("import: ones not ones", imported(lambda d: original_like(d, ones=torch.zeros(6, 16, 1, 1))), 2, "'ones' is not an all-ones tensor"),
    Case("import: another architecture", imported(full_resnet18, arch="vgg11"), 2, "is --arch right?"),
    Case("import: resnet18 as resnet34", imported(full_resnet18, arch="resnet34"), 2, "does not fit a resnet34 trunk (missing 'features.layer1.2."),
    Case("import: unknown architecture", imported(full_resnet18, arch="tiny_vgg"), 2, "--arch 'tiny_vgg' is not an architecture of the original code"),
    Case("import: classes differ from dataset", imported(lambda d: full_resnet18(d, n_classes=5)), 2, "classifies 5 classes but the recipe's dataset has 3"),
    Case("import: path is a directory", imported(a_directory), 2, "is a directory"),
    # run directories and training checkpoints (--resume)
    Case("run of a newer format", resume(newer_run_format), 2, "format version 99 is newer than this protoaudit reads"),
    Case("dataset changed since the run", resume(dataset_changed), 2, "its dataset changed since the run started", unchanged=False),
    Case("complete run without accuracy.csv", resume(lambda d: (d / "accuracy.csv").unlink()), 2, "says it is complete but has no accuracy.csv"),
    Case("run.json not JSON", resume(run_json_not_json), 2, "run.json: not valid JSON"),
    Case("truncated member weights", resume(truncated_member_weights), 2, "model.safetensors: its sha256 differs from the one recorded in model.json", unchanged=False, check=failed_status),
    Case("checkpoint byte flipped", resume(flipped_checkpoint_byte, "checkpoint"), 2, "does not match the sha256", unchanged=False, check=failed_status),
    Case("truncated checkpoint", resume(truncated_checkpoint, "checkpoint"), 2, "not a readable safetensors file", unchanged=False),
    Case("pickle as checkpoint", resume(pickle_checkpoint, "checkpoint"), 2, "not a readable safetensors file", unchanged=False, check=payload_not_executed),
    Case("checkpoint of another architecture", resume(checkpoint_of_other_architecture, "checkpoint"), 2, "does not fit this member's architecture", unchanged=False),
    Case("checkpoint of another member", resume(checkpoint_of_other_member, "checkpoint"), 2, "written for member 'vgg', not 'resnet'", unchanged=False),
    Case("checkpoint of a newer format", resume(newer_checkpoint_format, "checkpoint"), 2, "format version 99 is not one this protoaudit reads", unchanged=False),
    Case("checkpoint of an older format", resume(older_checkpoint_format, "checkpoint"), 2, "format version 1 was written by an older protoaudit", unchanged=False),
    *RUN_CASES,
]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint_run(tmp_path_factory: pytest.TempPathFactory, tiny_run: Path) -> Callable[[], Path]:
    """A copy of the tiny run interrupted during its second member: vgg finished, resnet has a checkpoint
    after its first epoch (made by training resnet for one epoch and stopping there)."""
    made: list[Path] = []

    def make() -> Path:
        if made:
            return made[0]
        from protoaudit.engine.checkpoint import MemberCheckpoint
        from protoaudit.engine.data import build_dataset
        from protoaudit.engine.ensemble import training_sha256
        from protoaudit.engine.recipe import load_recipe
        from protoaudit.engine.train import train_member

        run_dir = tmp_path_factory.mktemp("interrupted") / "tiny"
        shutil.copytree(tiny_run, run_dir)
        recipe = load_recipe(run_dir / "recipe.toml")
        shutil.rmtree(run_dir / "members" / "resnet")
        (run_dir / "accuracy.csv").unlink()
        meta = json.loads((run_dir / "run.json").read_text())
        meta["status"] = "interrupted"
        (run_dir / "run.json").write_text(json.dumps(meta))

        class StopAfterFirst(MemberCheckpoint):
            def save(self, state: Any) -> None:
                super().save(state)
                raise KeyboardInterrupt

        checkpoint = StopAfterFirst(
            run_dir / "members" / "resnet" / "checkpoint",
            {"member": "resnet", "training_sha256": training_sha256(recipe), "seed": recipe.seed + 1},
        )
        with pytest.raises(KeyboardInterrupt):
            train_member(
                recipe.members[1],
                recipe,
                build_dataset(recipe.data, recipe.seed),
                torch.device("cpu"),
                seed=recipe.seed + 1,
                checkpoint=checkpoint,
            )
        made.append(run_dir)
        return run_dir

    return make


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(
    case: Case,
    tmp_path: Path,
    tiny_run: Path,
    checkpoint_run: Callable[[], Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if case.skip:
        pytest.skip(case.skip)
    monkeypatch.delenv(MARKER_ENV, raising=False)
    env = Env(tmp_path, tiny_run, monkeypatch, checkpoint_run)
    args = case.setup(env)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main([*args, "--quiet"] if case.quiet else args)
    executed = MARKER_ENV in os.environ
    monkeypatch.undo()  # disk simulations end with the command
    for path in tmp_path.rglob("*"):  # a read-only folder made by a case
        if path.is_dir():
            path.chmod(0o755)
    assert not executed, "a pickle payload was executed"
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert exc.value.code == case.code, err
    assert len(lines) == 1, err
    assert case.fragment in lines[0]
    assert lines[0].startswith("error:")
    if case.absent:
        assert case.absent not in lines[0]
    assert out == ""
    after = snapshot(tmp_path)
    assert not [name for name in after if name.endswith(".tmp") or "/.tmp" in name], (
        "a temporary file was left"
    )
    if case.unchanged:
        assert after == before, "a bad input must not write anything"
    for name, data in after.items():  # whatever exists is whole
        if name.endswith(".json"):
            if name == "runs/tiny/run.json" and case.id == "run.json not JSON":
                continue
            json.loads(data)
    if case.check is not None:
        case.check(env)


def test_the_corpus_is_large_and_every_static_file_is_used() -> None:
    assert len(CASES) >= 20
    source = Path(__file__).read_text()
    for path in CORPUS.iterdir():
        assert path.name in source, f"{path.name} is in tests/bad_inputs/ but no case uses it"


def _quiet_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def test_a_broken_index_shows_as_broken_and_quiet_prints_only_data(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The report says the damaged patch index is broken (not "not computed yet"); with -q, every command
    prints its data on stdout and nothing at all on stderr."""
    run_dir = tmp_path / "tiny"
    shutil.copytree(tiny_run, run_dir)
    (run_dir / "members" / "vgg" / "patches.faiss").write_bytes(b"not a faiss index")
    code, out, err = _quiet_cli(["report", str(run_dir), "--reasoning", "1", "--deletion", "1", "-q"], capsys)
    assert code == 0
    assert err == ""
    assert sorted(line.split("\t")[0] for line in out.splitlines()) == ["html", "json"]  # data only
    report = json.loads((run_dir / "report.json").read_text())
    vgg = next(m for m in report["members"] if m["name"] == "vgg")
    assert "the patch index is broken" in vgg["nearest_note"]
    assert "not computed yet" not in vgg["nearest_note"]
    resnet = next(m for m in report["members"] if m["name"] == "resnet")
    assert resnet["nearest_note"] is None  # its index is fine
    for args in (
        ["train-ensemble", str(TINY_RECIPE), "--out", str(tiny_run.parent), "--resume", "-q"],  # complete
        ["index", str(run_dir), "-q"],  # rebuilds the broken one
        ["report", "--root", str(tmp_path), "--reasoning", "0", "--deletion", "0", "-q"],  # most recent run
    ):
        code, out, err = _quiet_cli(args, capsys)
        assert code == 0, err
        assert err == "", args
        assert out.strip()


def test_a_report_on_a_run_without_a_test_split_says_why(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run recorded with test_fraction = 0 (an earlier protoaudit accepted it): the report is written,
    without the parts that need the dataset, and its notes name the refused key."""
    run_dir = tmp_path / "tiny"
    shutil.copytree(tiny_run, run_dir)
    recipe_with_test_fraction_zero(run_dir)
    code, _, err = _quiet_cli(["report", str(run_dir), "--reasoning", "1", "--deletion", "1"], capsys)
    assert code == 0, err
    notes = json.loads((run_dir / "report.json").read_text())["notes"]
    assert any("data.test_fraction: Input should be greater than 0" in note for note in notes)
