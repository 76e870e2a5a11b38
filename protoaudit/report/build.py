"""Collect a run's files into one report: a JSON-ready dict (``report.json``) and the images it shows.

Both renderers (HTML and Markdown) read only this dict, so every number either of them shows is a number of
``report.json``. Images (thumbnails, figures) live beside the dict in :attr:`Report.assets`, keyed by the
names the dict uses, and are inlined into the HTML as ``data:`` URIs.

Files written by other steps are read when they exist and reported as "not computed yet" when they do not:
``purity.csv``, ``audit.json``, ``duplicates.csv`` (``protoaudit prune``), ``members/<m>/nearest_train.csv``
(the patch index), and the reasoning sheets of :mod:`protoaudit.explain`.
"""

from __future__ import annotations

import json
import math
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from protoaudit.core.stats import confusion as confusion_matrix
from protoaudit.engine.io import jsonable
from protoaudit.engine.progress import NULL_REPORTER, Reporter
from protoaudit.engine.run import PRUNED_SUFFIX, Run
from protoaudit.errors import CheckpointError, InputError
from protoaudit.report.definitions import AUDIT_LABELS, BOX_CAVEAT, DEFINITIONS
from protoaudit.report.detectors import section as detectors_section
from protoaudit.report.images import box_thumbnail, patch_thumbnail, png_data_uri, to_uint8

if TYPE_CHECKING:
    from protoaudit.core.model import ProtoPNet

REPORT_FORMAT = "protoaudit-report"
REPORT_FORMAT_VERSION = 1
PRUNE_HINT = "not computed yet — run `protoaudit prune {run}`"
INDEX_HINT = (
    "not computed yet — run `protoaudit index {run}` (the patch index) or `protoaudit global-analysis {run}`"
)
SHEET_PROTOTYPES = 3  # prototypes listed per member and class on an embedded reasoning sheet


@dataclass
class ReportOptions:
    """How much the report samples; the defaults keep the quick start's report within seconds."""

    reasoning_correct: int = 3  # test images the ensemble classifies correctly, with their evidence
    reasoning_wrong: int = 3  # and misclassified ones
    sheets: int = (
        2  # full reasoning sheets (protoaudit.explain) embedded: the first correct and wrong samples
    )
    faithfulness_per_member: int = 6  # prototypes per member given a deletion curve
    deletion_steps: int = 16
    random_orders: int = 2
    nearest: int = 6  # nearest training patches shown per prototype
    max_thumbnails: int = 400  # prototypes per member shown with thumbnails (the rest: numbers only)
    # and at most this many bytes of prototype-table thumbnails in all (data URIs), so that a report at
    # CUB-200's size (3 members × 2000 prototypes) stays near 10 MB: later prototypes get numbers only
    thumbnail_bytes: int = 6 << 20
    sparsity_threshold: float = 1e-3
    verify: bool = False  # re-run every saved checkpoint over the test split instead of reading saved logits
    batch_size: int = 64
    seed: int = 0


@dataclass
class Report:
    """``data`` is report.json; ``assets`` maps image keys used in ``data`` to ``data:image/png`` URIs;
    ``fragments`` maps keys to trusted, already-escaped HTML fragments (reasoning sheets of
    :mod:`protoaudit.explain`)."""

    data: dict[str, Any]
    assets: dict[str, str] = field(default_factory=dict)
    fragments: dict[str, str] = field(default_factory=dict)


# -- JSON -----------------------------------------------------------------------------------------------


def dumps_report(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=1, ensure_ascii=False, allow_nan=False) + "\n"


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [jsonable(r) for r in frame.astype(object).where(frame.notna(), None).to_dict(orient="records")]


def _read_csv(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path, keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from None


def _as_bool(value: Any) -> bool | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def _split_list(value: Any, cast: Callable[[str], Any] = str) -> list[Any] | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value)
    return [cast(v) for v in text.split(";") if v != ""]


def _opt_float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _opt_int(value: Any) -> int | None:
    out = _opt_float(value)
    return None if out is None else int(out)


# -- the builder ----------------------------------------------------------------------------------------


def build_report(
    run: Run, options: ReportOptions | None = None, reporter: Reporter = NULL_REPORTER
) -> Report:
    """Read every file of ``run`` the report shows, recompute what must be recomputed (the ensemble's test
    logits, the thumbnails, the deletion curves) and return the report; nothing is written."""
    return _Builder(run, options or ReportOptions(), reporter).build()


class _Builder:
    def __init__(self, run: Run, options: ReportOptions, reporter: Reporter) -> None:
        self.run = run
        self.options = options
        self.reporter = reporter
        self.assets: dict[str, str] = {}
        self.fragments: dict[str, str] = {}
        self.notes: list[str] = []
        self.bundle: Any = None
        self.grids: dict[str, tuple[int, int]] = {}
        self.prototype_thumbs: dict[tuple[str, int], str | None] = {}
        self.rng = np.random.default_rng(options.seed)
        self.logits_source: dict[str, str] = {}
        self.prune_hint = PRUNE_HINT.format(run=run.path)
        self.index_hint = INDEX_HINT.format(run=run.path)
        self.pruned_sets: dict[str, set[int]] = {}
        self.thumbnail_bytes = 0  # of the prototype tables' thumbnails so far

    # ------------------------------------------------------------------
    def build(self) -> Report:
        started = time.perf_counter()
        run = self.run
        try:
            self.bundle = run.dataset()
        except (InputError, ValueError) as exc:
            self.notes.append(
                f"The run's dataset could not be rebuilt ({str(exc).splitlines()[0]}); thumbnails, the "
                "confusion matrix, reasoning samples and deletion curves are left out."
            )
        summary = self._summary()
        accuracy = self._accuracy()
        class_names = self._class_names()
        purity_frame = _read_csv(run.path / "purity.csv")
        members = [self._member(name, purity_frame) for name in run.member_names]
        pruned = self._pruned_checkpoints()
        sparsity = [self._last_layer(m) for m in run.member_names]
        sparsity += [self._last_layer(name, pruned=True) for name in pruned]
        predictions = self._predictions(accuracy["rows"], pruned, class_names)
        faithfulness = self._faithfulness(members)
        data: dict[str, Any] = {
            "format": REPORT_FORMAT,
            "format_version": REPORT_FORMAT_VERSION,
            "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "run": summary,
            "class_names": class_names,
            "classes": [{"class": k, "class_name": name} for k, name in enumerate(class_names)],
            "accuracy": accuracy,
            "purity": self._purity_summary(purity_frame),
            "members": members,
            "last_layer": {"threshold": self.options.sparsity_threshold, "checkpoints": sparsity},
            "confusion": predictions["confusion"],
            "reasoning": predictions["reasoning"],
            "faithfulness": faithfulness,
            "audit": self._audit(),
            "detectors": detectors_section(run),
            "duplicates": self._duplicates(),
            "box_caveat": BOX_CAVEAT,
            "definitions": DEFINITIONS,
            "notes": self.notes,
        }
        from protoaudit.report.evaluation import section as evaluation_section

        data["evaluation"] = evaluation_section(run, data, self.bundle)
        data["glance"] = self._glance(data)
        data = jsonable(data)
        from protoaudit.report.figures import add_figures

        add_figures(data, self.assets)
        data["build_seconds"] = round(time.perf_counter() - started, 3)
        return Report(jsonable(data), self.assets, self.fragments)

    # -- the first screen -----------------------------------------------------------------------------
    def _glance(self, data: dict[str, Any]) -> dict[str, Any]:
        """What a reviewer asks first: accuracy before and after pruning (with 95 % intervals where
        accuracy.csv has them), how many prototypes were pruned and on which ground-truth parts they sat,
        and the headline audit figures."""
        purity = data["purity"]
        pruning = []
        for m in data["members"]:
            rows = [r for r in m["prototypes"] if r["pruned"] is not None]
            if not rows:
                continue
            pruned = [r for r in rows if r["pruned"]]
            kinds: dict[str, int] = {}
            for r in pruned:
                kind = r["source_part_kind"] or "unknown"
                kinds[kind] = kinds.get(kind, 0) + 1
            pruning.append(
                {
                    "member": m["name"],
                    "n_prototypes": len(m["prototypes"]),
                    "n_pruned": len(pruned),
                    "n_kept": len(rows) - len(pruned),
                    "pruned_on": [{"kind": k, "n": v} for k, v in sorted(kinds.items())],
                }
            )
        audit = data["audit"]
        headline: list[dict[str, Any]] = []
        if audit["available"] and isinstance(audit["data"], dict):
            run_wide = audit["data"]
            for key in ("pruning_precision", "pruning_recall"):
                if isinstance(run_wide.get(key), int | float):
                    headline.append({"key": key, "label": AUDIT_LABELS[key][0], "value": run_wide[key]})
            for m, values in (run_wide.get("members") or {}).items():
                for key in ("part_purity", "consistency", "stability"):
                    if isinstance(values, dict) and isinstance(values.get(key), int | float):
                        headline.append(
                            {
                                "key": f"{m}.{key}",
                                "label": f"{AUDIT_LABELS[key][0]} — {m}",
                                "value": values[key],
                            }
                        )
        faith = data["faithfulness"]
        deletion = None
        if faith.get("available") and faith.get("summary", {}).get("n"):
            deletion = faith["summary"]
        return {
            "pruning": pruning,
            "pruning_rule": None
            if not purity["available"]
            else {"k": purity["k"], "threshold": purity["threshold"]},
            "headline": headline,
            "duplicates": len(data["duplicates"]["rows"]) if data["duplicates"]["available"] else None,
            "deletion": deletion,
            "stale": self._stale_note(),
        }

    def _stale_note(self) -> str | None:
        """A note when the run changed (pruned) after the checkpoints this report read were made: nothing to
        say for the report being built now, which reads the current files, but recorded for the page."""
        pruning = self.run.meta.get("pruning") or {}
        if not pruning and (self.run.path / "purity.csv").is_file():
            return "purity.csv exists but run.json records no pruning: the files may come from another run"
        return None

    # -- run summary ----------------------------------------------------------------------------------
    def _summary(self) -> dict[str, Any]:
        meta = self.run.meta
        recipe_path = self.run.path / "recipe.toml"
        try:
            recipe_text = recipe_path.read_text(encoding="utf-8") if recipe_path.is_file() else None
        except UnicodeDecodeError:
            from protoaudit.errors import RecipeError

            raise RecipeError(f"recipe {recipe_path} is not UTF-8 text") from None
        description = ""
        data_kind = None
        if recipe_text is not None:
            try:
                parsed = tomllib.loads(recipe_text)
                description = str(parsed.get("description", ""))
                data_kind = parsed.get("data", {}).get("kind")
            except tomllib.TOMLDecodeError:
                self.notes.append("recipe.toml of the run is not valid TOML")
        timings: list[dict[str, Any]] = []
        for step, value in (meta.get("timings") or {}).items():
            if isinstance(value, int | float):
                timings.append({"step": step, "stage": "", "seconds": float(value)})
            elif isinstance(value, dict):
                for stage, seconds in value.items():
                    if isinstance(seconds, int | float):
                        timings.append({"step": step, "stage": stage, "seconds": float(seconds)})
        dataset = meta.get("dataset") or {}
        return {
            "name": self.run.name,
            "path": str(self.run.path),
            "description": description,
            "status": meta.get("status"),
            "started": meta.get("started"),
            "finished": meta.get("finished"),
            "seconds": meta.get("seconds"),
            "seed": meta.get("seed"),
            "threads": meta.get("threads"),
            "device": meta.get("device"),
            "recipe_sha256": meta.get("recipe_sha256"),
            "versions": meta.get("versions") or {},
            "dataset": {
                "kind": data_kind,
                "fingerprint": dataset.get("fingerprint"),
                "n_classes": dataset.get("n_classes"),
                "splits": dataset.get("splits") or {},
                "image_size": None if self.bundle is None else self.bundle.image_size,
            },
            "members": self.run.member_names,
            "timings": timings,
            "recipe_toml": recipe_text,
        }

    def _class_names(self) -> list[str]:
        if self.bundle is not None:
            return list(self.bundle.class_names)
        names = self.run.meta.get("dataset", {}).get("summary", {}).get("class_names")
        if isinstance(names, list):
            return [str(n) for n in names]
        first = self.run.member_names[0] if self.run.member_names else None
        return list(self.run.member(first).config.class_names) if first else []

    # -- accuracy -------------------------------------------------------------------------------------
    def _accuracy(self) -> dict[str, Any]:
        path = self.run.path / "accuracy.csv"
        frame = _read_csv(path)
        if frame is None:
            raise CheckpointError(f"{path}: file not found; the run did not finish (see run.json's status)")
        rows: list[dict[str, Any]] = []
        for r in _records(frame):
            rows.append(
                {
                    "model": str(r.get("model")),
                    "kind": str(r.get("kind")),
                    "backbone": None if r.get("backbone") is None else str(r.get("backbone")),
                    "pruned": bool(_as_bool(r.get("pruned"))),
                    "top1": _opt_float(r.get("top1")),
                    "top1_low": _opt_float(r.get("top1_low")),  # 95 % interval, where accuracy.csv has it
                    "top1_high": _opt_float(r.get("top1_high")),
                    "n_prototypes": _opt_int(r.get("n_prototypes")),
                    "n_test": _opt_int(r.get("n_test")),
                }
            )
        # before / after pruning, one line per model (a pruned row names its model with or without "-pruned")
        pairs: dict[tuple[str, str], dict[str, Any]] = {}
        for r in rows:
            base = r["model"].removesuffix(PRUNED_SUFFIX)
            pair = pairs.setdefault(
                (r["kind"], base), {"model": base, "kind": r["kind"], "before": None, "after": None}
            )
            pair["after" if r["pruned"] else "before"] = {
                "top1": r["top1"],
                "top1_low": r["top1_low"],
                "top1_high": r["top1_high"],
                "n_prototypes": r["n_prototypes"],
            }
        any_pruned = any(r["pruned"] for r in rows)
        return {
            "rows": rows,
            "before_after": list(pairs.values()),
            "pruned_available": any_pruned,
            "intervals": any(r["top1_low"] is not None for r in rows),
            "interval_level": 0.95,  # top1_low / top1_high, where accuracy.csv has them
            "note": None if any_pruned else f"accuracy after pruning {self.prune_hint}",
        }

    def _pruned_checkpoints(self) -> list[str]:
        """The pruned members ``members/<m>-pruned/`` that exist (run.json's "pruning" lists them too)."""
        listed = (self.run.meta.get("pruning") or {}).get("members") or []
        names = [f"{m}{PRUNED_SUFFIX}" for m in self.run.member_names] + [str(n) for n in listed]
        out: list[str] = []
        for name in names:
            if name not in out and (self.run.path / "members" / name / "model.json").is_file():
                out.append(name)
        return out

    def _purity_summary(self, frame: pd.DataFrame | None) -> dict[str, Any]:
        """How purity.csv states purity: ``count`` (how many of the k nearest images share the prototype's
        class, the paper's τ-test) or ``fraction`` (count / k); and k and τ."""
        pruning = self.run.meta.get("pruning") or {}
        audit_path = self.run.path / "audit.json"
        threshold = pruning.get("threshold")
        audit: Any = None
        if audit_path.is_file():
            from protoaudit.engine.io import read_json

            audit = read_json(audit_path)
        if threshold is None and isinstance(audit, dict):
            threshold = audit.get("threshold")
        if frame is None or "purity" not in frame:
            return {
                "available": False,
                "file": "purity.csv",
                "note": f"k-NN class purity {self.prune_hint}",
                "k": None,
                "threshold": None,
                "scale": None,
            }
        # audit.json states the scale; protoaudit prune has always written counts (runs before it said so)
        scale = audit.get("purity_scale", "count") if isinstance(audit, dict) else "count"
        k = _opt_int(frame["k"].iloc[0]) if "k" in frame and len(frame) else pruning.get("k")
        return {
            "available": True,
            "file": "purity.csv",
            "note": None,
            "k": k,
            "threshold": _opt_int(threshold),
            "scale": scale,
        }

    # -- members and their prototypes -----------------------------------------------------------------
    def _grid(self, name: str, model: torch.nn.Module) -> tuple[int, int] | None:
        if self.bundle is None:
            return None
        if name not in self.grids:
            grid = self._indexed_grid(name)
            if grid is None:  # no patch index (a pruned member): one image through the member
                with torch.no_grad():
                    z = model.latent(self.bundle.push.batch([0]))  # type: ignore[operator]
                grid = (int(z.shape[-2]), int(z.shape[-1]))
            self.grids[name] = grid
        return self.grids[name]

    def _indexed_grid(self, name: str) -> tuple[int, int] | None:
        """The latent grid recorded with the member's training patch index, when it has one."""
        from protoaudit.engine.index.files import index_paths
        from protoaudit.engine.index.search import read_index_info

        meta_path = index_paths(self.run.path / "members" / name, "train")[1]
        if not meta_path.is_file():
            return None
        try:
            hh, ww = read_index_info(meta_path)["grid"]
        except (CheckpointError, KeyError, TypeError, ValueError):
            return None
        return int(hh), int(ww)

    def _push_images(self, indices: list[int]) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        unique = sorted(set(indices))
        for start in range(0, len(unique), 256):
            chunk = unique[start : start + 256]
            images = to_uint8(self.bundle.push.batch(chunk).numpy())
            out.update(zip(chunk, images, strict=True))
        return out

    def _member(self, name: str, purity_frame: pd.DataFrame | None) -> dict[str, Any]:
        self.reporter.log(f"report: member {name}")
        model = self.run.member(name)
        meta = self.run.member_meta(name)
        prototypes = self.run.prototypes(name)
        member_dir = self.run.path / "members" / name
        purity = None
        if purity_frame is not None and "member" in purity_frame:
            purity = purity_frame[purity_frame["member"].astype(str) == name].set_index("prototype")
        nearest_frame, nearest_source, nearest_problem = self._nearest(name, model, member_dir)
        nearest: dict[int, list[dict[str, Any]]] = {}
        if nearest_frame is not None:
            ordered = nearest_frame.sort_values(["prototype", "rank"], kind="stable")
            kept = ordered.groupby("prototype", sort=False).head(self.options.nearest)
            for r in _records(kept):
                nearest.setdefault(int(r["prototype"]), []).append(r)
        part_names = None if self.bundle is None else self.bundle.part_names
        grid = self._grid(name, model)
        images: dict[int, np.ndarray] = {}
        with_thumbs = prototypes["prototype"].head(self.options.max_thumbnails).tolist() if grid else []
        with_set = set(with_thumbs)
        shown = 0
        if grid is not None:
            wanted = prototypes[prototypes["prototype"].isin(with_thumbs)]["source_index"].tolist()
            for j in with_thumbs:
                wanted += [
                    int(n["image_index"]) for n in nearest.get(int(j), []) if n.get("image_index") is not None
                ]
            images = self._push_images([int(i) for i in wanted])
        rows = []
        for r in _records(prototypes):
            j = int(r["prototype"])
            box = [int(r["box_y0"]), int(r["box_y1"]), int(r["box_x0"]), int(r["box_x1"])]
            row: dict[str, Any] = {
                "prototype": j,
                "class": int(r["class"]),
                "class_name": str(r["class_name"]),
                "source_image": str(r["source_image"]),
                "source_index": int(r["source_index"]),
                "label": int(r["label"]),
                "h": int(r["h"]),
                "w": int(r["w"]),
                "distance": _opt_float(r["distance"]),
                "box": box,
                "purity": None,
                "k": None,
                "pruned": None,
                "nearest_classes": None,
                "nearest_image_ids": None,
                "nearest_distance": None,
                "source_part": None,
                "source_part_kind": None,
                "source_part_name": None,
                "part_purity": None,
                "nearest_major_part": None,
                "consistent": None,
                "stability": None,
                "thumb": None,
                "nearest": None,
                "deletion": None,
            }
            if purity is not None and j in purity.index:
                p = purity.loc[j]
                raw = p.get("purity")
                integral = isinstance(raw, int | np.integer) and not isinstance(raw, bool | np.bool_)
                row["purity"] = int(raw) if integral else _opt_float(raw)
                row["k"] = _opt_int(p.get("k"))
                row["pruned"] = _as_bool(p.get("pruned"))
                row["nearest_classes"] = _split_list(p.get("nearest_classes"), int)
                row["nearest_image_ids"] = _split_list(p.get("nearest_image_ids"))
                row["nearest_distance"] = _opt_float(p.get("nearest_distance"))
                part = _opt_int(p.get("source_part"))
                row["source_part"] = part
                kind = p.get("source_part_kind")
                row["source_part_kind"] = (
                    None if kind is None or (isinstance(kind, float) and math.isnan(kind)) else str(kind)
                )
                if part is not None and part >= 0 and part_names and part < len(part_names):
                    row["source_part_name"] = part_names[part]
                row["part_purity"] = _opt_float(p.get("part_purity"))
                near_parts = [v for v in (_split_list(p.get("nearest_parts"), int) or []) if v > 0]
                if near_parts:
                    major = max(sorted(set(near_parts)), key=near_parts.count)
                    row["nearest_major_part"] = (
                        part_names[major] if part_names and major < len(part_names) else str(major)
                    )
                row["consistent"] = _as_bool(p.get("consistent"))
                row["stability"] = _opt_float(p.get("stability"))
            show = grid is not None and j in with_set and self.thumbnail_bytes < self.options.thumbnail_bytes
            shown += int(show)
            if show:
                row["thumb"] = self._counted_asset(
                    f"push/{row['source_index']}/box/{'-'.join(map(str, box))}",
                    partial(box_thumbnail, images[row["source_index"]], box),
                )
            if j in nearest:
                row["nearest"] = []
                for n in nearest[j]:
                    entry: dict[str, Any] = {
                        "rank": _opt_int(n.get("rank")),
                        "image_index": _opt_int(n.get("image_index")),
                        "image_id": None if n.get("image_id") is None else str(n.get("image_id")),
                        "label": _opt_int(n.get("label")),
                        "distance": _opt_float(n.get("distance")),
                        "h": _opt_int(n.get("h")),
                        "w": _opt_int(n.get("w")),
                        "thumb": None,
                    }
                    i, h, w = entry["image_index"], entry["h"], entry["w"]
                    if show and grid is not None and i in images and h is not None and w is not None:
                        entry["thumb"] = self._counted_asset(
                            f"push/{i}/cell/{h}-{w}",
                            partial(patch_thumbnail, images[i], h, w, grid),
                        )
                    row["nearest"].append(entry)
            self.prototype_thumbs[(name, j)] = row["thumb"]
            if row["pruned"]:
                self.pruned_sets.setdefault(name, set()).add(j)
            rows.append(row)
        config = model.config
        return {
            "name": name,
            "backbone": config.trunk,
            "trunk_family": meta.get("trunk_family"),
            "n_prototypes": model.n_prototypes,
            "prototypes_per_class": config.prototypes_per_class,
            "prototype_dim": config.prototype_dim,
            "add_on": config.add_on,
            "grid": None if grid is None else list(grid),
            "selected_epoch": meta.get("selected_epoch"),
            "val_top1": (meta.get("metrics") or {}).get("val_top1"),
            "test_top1": (meta.get("metrics") or {}).get("test_top1"),
            "purity_available": purity is not None,
            "nearest_available": nearest_frame is not None,
            "nearest_source": nearest_source,
            "nearest_note": None
            if nearest_frame is not None
            else f"nearest training patches {nearest_problem or self.index_hint}",
            "thumbnails": shown,
            "prototypes": rows,
        }

    def _nearest(
        self, name: str, model: ProtoPNet, member_dir: Path
    ) -> tuple[pd.DataFrame | None, str | None, str | None]:
        """The nearest training patches of every prototype (one per image): ``nearest_train.csv`` when the
        index step wrote it, else one batched search of the member's fresh patch index, else nothing.
        Returns (frame, its source, why there is none: None when no index was built yet)."""
        frame = _read_csv(member_dir / "nearest_train.csv")
        if frame is not None:
            return frame, "nearest_train.csv", None
        from protoaudit.engine.index.search import index_status, load_index, nearest_images
        from protoaudit.engine.io import TamperedWeightsError
        from protoaudit.errors import CheckpointError

        status = index_status(self.run, name, "train")
        if status == "missing":
            return None, None, None
        rebuild = f"rebuild it with `protoaudit index {self.run.path} --force`"
        if status != "fresh":
            what = "built from other weights" if status == "stale" else "unreadable or incomplete"
            return None, None, f"not shown: the patch index is {status} ({what}) — {rebuild}"
        try:
            loaded = load_index(self.run, name, "train", backend="faiss")
        except TamperedWeightsError:
            raise
        except CheckpointError as exc:
            return None, None, f"not shown: the patch index is broken ({exc}) — {rebuild}"
        table = nearest_images(loaded, model.prototype_vectors, self.options.nearest).table()
        return table, "patch index (members/<m>/patches.faiss)", None

    def _counted_asset(self, key: str, make: Callable[[], bytes]) -> str:
        """:meth:`_asset` for the prototype tables: new images count against ``thumbnail_bytes``."""
        new = key not in self.assets
        self._asset(key, make)
        if new:
            self.thumbnail_bytes += len(self.assets[key])
        return key

    def _asset(self, key: str, make: Callable[[], bytes]) -> str:
        if key not in self.assets:
            self.assets[key] = png_data_uri(make())
        return key

    def _last_layer(self, name: str, pruned: bool = False) -> dict[str, Any]:
        model = self.run.member(name)
        weight = model.last_layer.weight.detach().cpu().double().numpy()  # (K, m)
        own = model.class_identity().t().cpu().numpy().astype(bool)  # (K, m)
        off = weight[~own]
        threshold = self.options.sparsity_threshold
        low, high = float(min(weight.min(), -0.5)), float(max(weight.max(), 1.0))
        edges = np.linspace(low, high, 31)
        return {
            "checkpoint": name,
            "pruned": pruned,
            "n_prototypes": model.n_prototypes,
            "n_own": int(own.sum()),
            "n_off": int(off.size),
            "own_mean": float(weight[own].mean()) if own.any() else None,
            "off_mean_abs": float(np.abs(off).mean()) if off.size else None,
            "off_max_abs": float(np.abs(off).max()) if off.size else None,
            "off_sparsity": float((np.abs(off) < threshold).mean()) if off.size else None,
            "histogram": {
                "edges": edges.tolist(),
                "own": np.histogram(weight[own], bins=edges)[0].tolist(),
                "off": np.histogram(off, bins=edges)[0].tolist(),
            },
        }

    # -- predictions: confusion matrices and reasoning samples -----------------------------------------
    @torch.no_grad()
    def _forward(self, name: str) -> torch.Tensor:
        """(N, K) test logits of checkpoint ``name``: the ones saved when it was made
        (``members/<m>/logits.safetensors``), or — with ``verify``, or for a run that has none — from running
        the saved checkpoint over the test split."""
        saved = None if self.options.verify else self.run.logits(name)
        split = self.bundle.test
        if saved is not None and "test" in saved and len(saved["test"]) == len(split):
            self.logits_source[name] = "saved logits"
            return saved["test"]
        self.logits_source[name] = "checkpoint re-run"
        model = self.run.member(name)
        logits = []
        with torch.no_grad():
            for start in range(0, len(split), self.options.batch_size):
                x = split.batch(list(range(start, min(start + self.options.batch_size, len(split)))))
                logits.append(model(x)[0])
        return torch.cat(logits)

    def _predictions(
        self, rows: list[dict[str, Any]], pruned: list[str], class_names: list[str]
    ) -> dict[str, Any]:
        unavailable = {
            "confusion": {
                "available": False,
                "note": "the dataset could not be rebuilt",
                "models": [],
                "checkpoints": [],
            },
            "reasoning": {
                "available": False,
                "note": "the dataset could not be rebuilt",
                "sheets_note": None,
                "images": [],
            },
        }
        members = self.run.member_names
        if self.bundle is None or not members:
            return unavailable
        self.reporter.log("report: ensemble test logits")
        labels = np.asarray(self.bundle.test.labels, dtype=np.int64)
        k = len(class_names)
        outputs = {name: self._forward(name) for name in members}
        confusion = []
        groups: list[tuple[bool, list[str]]] = [(False, members)]
        pruned_members = [f"{m}{PRUNED_SUFFIX}" for m in members]
        if pruned and all(p in pruned for p in pruned_members):
            groups.append((True, pruned_members))
            outputs.update({name: self._forward(name) for name in pruned_members})
        ensemble_rows = {r["pruned"]: r for r in rows if r["kind"] == "ensemble"}
        for is_pruned, names in groups:
            logits = torch.stack([outputs[n] for n in names]).sum(dim=0)
            predicted = logits.argmax(dim=1).numpy()
            matrix = confusion_matrix(labels, predicted, k)  # sklearn.metrics.confusion_matrix
            top1 = float((predicted == labels).mean()) if len(labels) else None
            recorded = ensemble_rows.get(is_pruned, {}).get("top1")
            confusion.append(
                {
                    "model": "ensemble",
                    "pruned": is_pruned,
                    "members": names,
                    "matrix": matrix.tolist(),
                    "top1_recomputed": top1,
                    "top1_recorded": recorded,
                    "matches_accuracy_csv": None
                    if recorded is None or top1 is None
                    else bool(abs(recorded - top1) < 1e-9),
                }
            )
            if recorded is not None and top1 is not None and abs(recorded - top1) >= 1e-9:
                self.notes.append(
                    f"The ensemble ({'after' if is_pruned else 'before'} pruning) recomputed from the saved members "
                    f"scores top-1 {top1:.4f} on test; accuracy.csv records {recorded:.4f}."
                )
        recorded_rows = {(r["model"], r["pruned"]): r["top1"] for r in rows if r["kind"] == "member"}
        checkpoints = []
        for name, logits in outputs.items():
            top1 = float((logits.argmax(dim=1).numpy() == labels).mean()) if len(labels) else None
            is_pruned = name not in members
            recorded = recorded_rows.get(
                (name, is_pruned), recorded_rows.get((name.removesuffix(PRUNED_SUFFIX), is_pruned))
            )
            checkpoints.append(
                {
                    "checkpoint": name,
                    "pruned": is_pruned,
                    "source": self.logits_source.get(name),
                    "top1_recomputed": top1,
                    "top1_recorded": recorded,
                    "matches_accuracy_csv": None
                    if recorded is None or top1 is None
                    else bool(abs(recorded - top1) < 1e-9),
                }
            )
        ensemble = torch.stack([outputs[n] for n in members]).sum(dim=0)
        return {
            "confusion": {"available": True, "note": None, "models": confusion, "checkpoints": checkpoints},
            "reasoning": self._reasoning(ensemble, outputs, members, labels, class_names),
        }

    @torch.no_grad()
    def _reasoning(
        self,
        ensemble: torch.Tensor,
        outputs: dict[str, torch.Tensor],
        members: list[str],
        labels: np.ndarray,
        class_names: list[str],
    ) -> dict[str, Any]:

        pruned_names = [f"{m}{PRUNED_SUFFIX}" for m in members]
        pruned_ensemble = (
            torch.stack([outputs[n] for n in pruned_names]).sum(dim=0)
            if all(n in outputs for n in pruned_names)
            else None
        )
        predicted = ensemble.argmax(dim=1).numpy()
        correct = np.flatnonzero(predicted == labels)
        wrong = np.flatnonzero(predicted != labels)
        chosen_correct = self.rng.permutation(correct)[: self.options.reasoning_correct].tolist()
        chosen_wrong = self.rng.permutation(wrong)[: self.options.reasoning_wrong].tolist()
        chosen = [*chosen_correct, *chosen_wrong]
        # full reasoning sheets for the first samples, shared between correct and wrong ones
        n_wrong = min(len(chosen_wrong), self.options.sheets // 2)
        n_correct = min(len(chosen_correct), self.options.sheets - n_wrong)
        n_wrong = min(len(chosen_wrong), self.options.sheets - n_correct)
        with_sheet = set(chosen_correct[:n_correct] + chosen_wrong[:n_wrong])
        test = self.bundle.test
        images = {}
        if chosen:
            batch = test.batch(chosen)
            images = dict(zip(chosen, zip(batch, to_uint8(batch.numpy()), strict=True), strict=True))
        sheets_note = (
            None  # every sample can have its sheet: the engine computes it, report/sheet.py draws it
        )
        out = []
        for i in chosen:
            x, pixels = images[i]
            p = int(predicted[i])
            top = torch.topk(ensemble[i], k=min(3, ensemble.shape[1]))
            entry: dict[str, Any] = {
                "split": "test",
                "index": int(i),
                "image_id": str(test.image_ids[i]),
                "label": int(labels[i]),
                "label_name": class_names[int(labels[i])],
                "predicted": p,
                "predicted_name": class_names[p],
                "correct": bool(p == labels[i]),
                "thumb": self._asset(f"test/{i}", partial(box_thumbnail, pixels, None)),
                "top_classes": [
                    {"class": int(c), "class_name": class_names[int(c)], "logit": float(v)}
                    for v, c in zip(top.values, top.indices, strict=True)
                ],
                "members": [],
                "members_pruned": [],
                "pruned_predicted": None,
                "pruned_predicted_name": None,
                "sheet": None,
            }
            for name in members:
                logits = outputs[name]
                entry["members"].append(
                    {
                        "member": name,
                        "pruned_model": False,
                        "predicted": int(logits[i].argmax()),
                        "predicted_name": class_names[int(logits[i].argmax())],
                        "logit_predicted": float(logits[i, p]),
                        "evidence": self._evidence(name, x, pixels, i, p, class_names, name),
                    }
                )
            if pruned_ensemble is not None:
                q = int(pruned_ensemble[i].argmax())
                entry["pruned_predicted"] = q
                entry["pruned_predicted_name"] = class_names[q]
                for name in members:
                    pruned_name_ = f"{name}{PRUNED_SUFFIX}"
                    logits = outputs[pruned_name_]
                    entry["members_pruned"].append(
                        {
                            "member": pruned_name_,
                            "pruned_model": True,
                            "predicted": int(logits[i].argmax()),
                            "predicted_name": class_names[int(logits[i].argmax())],
                            "logit_predicted": float(logits[i, q]),
                            "evidence": self._evidence(pruned_name_, x, pixels, i, q, class_names, name),
                        }
                    )
            if i in with_sheet:
                entry["sheet"] = self._sheet(i, x)
            out.append(entry)
        return {
            "available": True,
            "models": list(members),
            "pruned_models": pruned_names if pruned_ensemble is not None else [],
            "n_images": len(labels),
            "n_correct": len(correct),
            "n_wrong": len(wrong),
            "note": None if chosen else "no test image to show",
            "sheets_note": sheets_note,
            "images": out,
        }

    @torch.no_grad()
    def _evidence(
        self,
        name: str,
        x: torch.Tensor,
        pixels: np.ndarray,
        i: int,
        p: int,
        class_names: list[str],
        parent: str,
    ) -> list[dict[str, Any]]:
        """The three prototypes of checkpoint ``name`` that add most to class ``p``'s logit on test image
        ``i`` (similarity × weight). For a pruned checkpoint, each prototype also carries its number in
        ``parent`` (the member it was pruned from; ``prototypes.csv`` column ``parent_prototype``)."""
        from protoaudit.core.geometry import percentile_boxes
        from protoaudit.core.model import similarity

        model = self.run.member(name)
        parents: list[int] | None = None
        if name != parent:
            table = self.run.prototypes(name)
            if "parent_prototype" in table:
                parents = [int(v) for v in table["parent_prototype"]]
        sims = similarity(model(x[None])[1][0])  # (m,) at each prototype's closest patch
        contribution = sims * model.last_layer.weight[p]  # (m,) evidence for class p
        best = torch.topk(contribution, k=min(3, contribution.numel())).indices
        maps = similarity(model.distances(model.latent(x[None])))[0, best]  # (3, H, W)
        boxes = percentile_boxes(maps, x.shape[-1])
        pruned_in_parent = self.pruned_sets.get(parent, set())
        evidence = []
        for rank, j in enumerate(best.tolist()):
            box = [int(v) for v in boxes[rank]]
            original = j if parents is None else parents[j]
            evidence.append(
                {
                    "prototype": j,
                    "parent_prototype": None if parents is None else original,
                    "pruned": name == parent and j in pruned_in_parent,
                    "class": int(model.prototype_class[j]),
                    "class_name": class_names[int(model.prototype_class[j])],
                    "similarity": float(sims[j]),
                    "weight": float(model.last_layer.weight[p, j]),
                    "contribution": float(contribution[j]),
                    "box": box,
                    "thumb": self._asset(
                        f"test/{i}/box/{'-'.join(map(str, box))}",
                        partial(box_thumbnail, pixels, box),
                    ),
                    "prototype_thumb": self.prototype_thumbs.get((parent, original)),
                }
            )
        return evidence

    def _sheet(self, index: int, image: torch.Tensor) -> dict[str, Any] | None:
        from protoaudit.engine.explain import explain_image
        from protoaudit.engine.index.queries import QueryImage
        from protoaudit.report.sheet import render_sheet_html

        test = self.bundle.test
        query = QueryImage(
            image, str(test.image_ids[index]), int(test.labels[index]), test.part_mask(index), "test", index
        )
        try:
            sheet = explain_image(self.run, query, top_classes=3, bundle=self.bundle)
            fragment = render_sheet_html(sheet, max_prototypes=SHEET_PROTOTYPES)
            document = jsonable(sheet.to_dict())
        except (InputError, ValueError, KeyError, TypeError) as exc:
            self.notes.append(f"reasoning sheet of test image {index} failed: {str(exc).splitlines()[0]}")
            return None
        _add_sheet_subtotals(document, SHEET_PROTOTYPES)
        if "<script" in fragment.lower():
            raise ValueError(
                "protoaudit.engine.explain returned a reasoning sheet with a script; refusing to embed it"
            )
        key = f"sheet/test/{index}"
        self.fragments[key] = fragment
        return {"fragment": key, "data": document}

    # -- faithfulness ---------------------------------------------------------------------------------
    def _faithfulness(self, members: list[dict[str, Any]]) -> dict[str, Any]:
        from protoaudit.core.faithfulness import deletion_curves, trapezoid_auc

        options = self.options
        base = {
            "method": "deletion",
            "steps": options.deletion_steps,
            "random_orders": options.random_orders,
            "occlusion": "per-channel mean of the image",
        }
        if self.bundle is None or options.faithfulness_per_member <= 0:
            why = (
                "the dataset could not be rebuilt" if self.bundle is None else "not asked for (--deletion 0)"
            )
            return {**base, "available": False, "note": f"deletion curves: {why}", "prototypes": []}
        self.reporter.log("report: deletion curves")
        results = []
        fractions: list[float] = []
        for member in members:
            rows = member["prototypes"]
            pick = np.sort(self.rng.permutation(len(rows))[: options.faithfulness_per_member])
            if not len(pick):
                continue
            chosen = [rows[int(p)] for p in pick]
            model = self.run.member(member["name"])
            images = self.bundle.push.batch([r["source_index"] for r in chosen])
            curves = deletion_curves(
                model,
                images,
                torch.as_tensor([r["prototype"] for r in chosen]),
                steps=options.deletion_steps,
                random_orders=options.random_orders,
                seed=options.seed,
            )
            fractions = curves.fractions.tolist()
            act, rnd = curves.normalised()
            auc_act = trapezoid_auc(curves.fractions, act)
            auc_rnd = trapezoid_auc(curves.fractions, rnd)
            for n, r in enumerate(chosen):
                result = {
                    "member": member["name"],
                    "prototype": r["prototype"],
                    "class_name": r["class_name"],
                    "source_image": r["source_image"],
                    "score_intact": float(curves.activation[n, 0]),
                    "activation": act[n].tolist(),
                    "random": rnd[n].tolist(),
                    "auc_activation": float(auc_act[n]),
                    "auc_random": float(auc_rnd[n]),
                    "half_activation": _half_point(curves.fractions, act[n]),
                    "half_random": _half_point(curves.fractions, rnd[n]),
                    "thumb": r["thumb"],
                }
                results.append(result)
                r["deletion"] = {
                    "auc_activation": result["auc_activation"],
                    "auc_random": result["auc_random"],
                }
        n_lower = sum(1 for r in results if r["auc_activation"] < r["auc_random"])
        return {
            **base,
            "available": True,
            "note": None,
            "fractions": fractions,
            "prototypes": results,
            "summary": {
                "n": len(results),
                "n_activation_below_random": n_lower,
                "mean_auc_activation": float(np.mean([r["auc_activation"] for r in results]))
                if results
                else None,
                "mean_auc_random": float(np.mean([r["auc_random"] for r in results])) if results else None,
            },
        }

    # -- files of the prune / audit step --------------------------------------------------------------
    def _audit(self) -> dict[str, Any]:
        path = self.run.path / "audit.json"
        if not path.is_file():
            return {
                "available": False,
                "note": f"ground-truth audit {self.prune_hint}",
                "data": None,
                "members_table": None,
            }
        from protoaudit.engine.io import read_json

        data = jsonable(read_json(path))
        members_table = None
        metrics: list[dict[str, Any]] = []
        names: list[str] = []
        if isinstance(data, dict) and isinstance(data.get("members"), dict):
            members_table = [
                {"member": name, **values}
                for name, values in data["members"].items()
                if isinstance(values, dict)
            ]
            names = [str(r["member"]) for r in members_table]
            keys: list[str] = []
            for r in members_table:
                keys += [k for k in r if k != "member" and k not in keys]
            pooled = {k: data.get(k) for k in ("pruning_precision", "pruning_recall")}
            for key in keys:
                label, kind, definition = AUDIT_LABELS.get(key, (key.replace("_", " "), "number", None))
                metrics.append(
                    {
                        "key": key,
                        "label": label,
                        "kind": kind,
                        "definition": definition,
                        "values": [
                            next((r.get(key) for r in members_table if r["member"] == n), None) for n in names
                        ],
                        "all": pooled.get(key),
                    }
                )
        return {
            "available": True,
            "note": None,
            "data": data,
            "members_table": members_table,
            "member_names": names,
            "metrics": metrics,
        }

    def _duplicates(self) -> dict[str, Any]:
        frame = _read_csv(self.run.path / "duplicates.csv")
        if frame is None:
            return {
                "available": False,
                "note": f"duplicate prototypes {self.prune_hint}",
                "columns": [],
                "rows": [],
            }
        return {
            "available": True,
            "note": None,
            "columns": [str(c) for c in frame.columns],
            "rows": _records(frame),
        }


def _half_point(fractions: Sequence[float] | np.ndarray, curve: Sequence[float] | np.ndarray) -> float | None:
    """The deleted fraction at which a normalised deletion curve first falls to one half (None if never)."""
    below = np.flatnonzero(np.asarray(curve) <= 0.5)
    return float(np.asarray(fractions)[below[0]]) if len(below) else None


def _add_sheet_subtotals(document: Any, shown: int) -> None:
    """The subtotals a reasoning sheet's HTML shows (points of the ``shown`` prototypes listed, of the other
    own-class prototypes, and how many those are), added to its dict so report.json holds every number."""
    for cls in document.get("classes", []) if isinstance(document, dict) else []:
        for member in cls.get("members", []):
            points = [float(p["points"]) for p in member.get("prototypes", [])]
            member["shown_points"] = sum(points[:shown])
            member["more_points"] = sum(points[shown:])
            member["n_shown"] = len(points[:shown])
            member["n_more"] = len(points[shown:])
