"""What a report loads once from the run and shares between its sections: the run, the rebuilt dataset, the
sampling options and seed, the images (``assets``) and HTML fragments collected so far, and the notes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protoaudit.engine.faithfulness import DELETION_PROTOTYPES, DELETION_RANDOM_ORDERS, DELETION_STEPS
from protoaudit.engine.progress import NULL_REPORTER, Reporter
from protoaudit.engine.run import Run
from protoaudit.errors import InputError
from protoaudit.report.images import png_data_uri

PRUNE_HINT = "not computed yet — run `protoaudit prune {run}`"
INDEX_HINT = (
    "not computed yet — run `protoaudit index {run}` (the patch index) or `protoaudit global-analysis {run}`"
)


@dataclass
class ReportOptions:
    """How much the report samples; the defaults keep the quick start's report within seconds."""

    reasoning_correct: int = 3  # test images the ensemble classifies correctly, with their evidence
    reasoning_wrong: int = 3  # and misclassified ones
    sheets: int = (
        2  # full reasoning sheets (protoaudit.explain) embedded: the first correct and wrong samples
    )
    # prototypes per member given a deletion curve; the defaults are those training records in
    # members/<m>/faithfulness.json, which the report then reads instead of recomputing
    faithfulness_per_member: int = DELETION_PROTOTYPES
    deletion_steps: int = DELETION_STEPS
    random_orders: int = DELETION_RANDOM_ORDERS
    nearest: int = 6  # nearest training patches shown per prototype
    max_thumbnails: int = 400  # prototypes per member shown with thumbnails (the rest: numbers only)
    # and at most this many bytes of prototype-table thumbnails in all (data URIs): later prototypes get numbers
    # only. 2 MiB holds the quick start's 120 prototypes (1.8 MB) and keeps a page at CUB-200's size (3 members ×
    # 2000 prototypes) under 10 MB beside its 6000 rows and the reasoning samples (bench/bench_report.py)
    thumbnail_bytes: int = 2 << 20
    sparsity_threshold: float = 1e-3
    verify: bool = False  # re-run every saved checkpoint over the test split instead of reading saved logits
    batch_size: int = 64
    seed: int = 0


@dataclass
class ReportContext:
    """The state the sections of one report share. ``bundle`` is None when the run's dataset could not be
    rebuilt (the sections that need images say so). ``rng`` draws every sample, in the order the sections
    are built."""

    run: Run
    options: ReportOptions
    reporter: Reporter = NULL_REPORTER
    bundle: Any = None
    assets: dict[str, str] = field(default_factory=dict)  # image key → data:image/png URI
    fragments: dict[str, str] = field(default_factory=dict)  # key → trusted, already-escaped HTML
    notes: list[str] = field(default_factory=list)
    grids: dict[str, tuple[int, int]] = field(default_factory=dict)  # member → latent grid (H, W)
    prototype_thumbs: dict[tuple[str, int], str | None] = field(default_factory=dict)
    pruned_sets: dict[str, set[int]] = field(default_factory=dict)  # member → its pruned prototypes
    logits_source: dict[str, str] = field(default_factory=dict)
    thumbnail_bytes: int = 0  # of the prototype tables' thumbnails so far
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.options.seed)

    @property
    def prune_hint(self) -> str:
        return PRUNE_HINT.format(run=self.run.path)

    @property
    def index_hint(self) -> str:
        return INDEX_HINT.format(run=self.run.path)

    def asset(self, key: str, make: Callable[[], bytes]) -> str:
        """``key``, with its PNG (made by ``make`` the first time) among the assets."""
        if key not in self.assets:
            self.assets[key] = png_data_uri(make())
        return key

    def counted_asset(self, key: str, make: Callable[[], bytes]) -> str:
        """:meth:`asset` for the prototype tables: new images count against ``thumbnail_bytes``."""
        new = key not in self.assets
        self.asset(key, make)
        if new:
            self.thumbnail_bytes += len(self.assets[key])
        return key


def open_context(run: Run, options: ReportOptions, reporter: Reporter = NULL_REPORTER) -> ReportContext:
    """The context of a report on ``run``, with the run's dataset rebuilt (or a note why it could not be)."""
    context = ReportContext(run, options, reporter)
    try:
        context.bundle = run.dataset()
    except (InputError, ValueError) as exc:
        context.notes.append(
            f"The run's dataset could not be rebuilt ({str(exc).splitlines()[0]}); thumbnails, the "
            "confusion matrix, reasoning samples and deletion curves are left out."
        )
    return context
