"""The shortcut audit of audit.json: top-1 on the test split and on the shifted one (the shortcut moved),
before and after removing each detector's flags."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from protoaudit.core.metrics import ensemble_logits, top1
from protoaudit.core.model import ProtoPNet
from protoaudit.engine.causal_audit import SHIFT_LEAK_NOTE, evaluate_without
from protoaudit.engine.retune import retuned_copy

if TYPE_CHECKING:
    from protoaudit.engine.data import DatasetBundle
    from protoaudit.engine.prune import MemberPruning
    from protoaudit.engine.recipe import Recipe
    from protoaudit.engine.run import Run


def shortcut_entry(
    run: Run,
    results: list[MemberPruning],
    bundle: DatasetBundle,
    recipe: Recipe,
    epochs: int,
) -> dict[str, Any]:
    """audit.json ``shortcut``: the prototypes on the shortcut (causal label), and the top-1 of every member
    and of the ensemble on ``test`` and ``test_shifted``, before and after removing each detector's flags (the
    last layer retuned each time, as pruning does) and for the pruned members as saved."""
    shifted = getattr(bundle, "test_shifted", None)
    labels = {"test": np.asarray(bundle.test.labels)}
    if shifted is not None:
        labels["test_shifted"] = np.asarray(shifted.labels)
    on_shortcut = {
        r.name: r.purity.loc[r.purity["concept_kind"] == "shortcut", "prototype"].astype(int).tolist()
        for r in results
        if "concept_kind" in r.purity
    }
    logits: dict[str, dict[str, dict[str, torch.Tensor]]] = {}  # removal → member → split → logits
    counts: dict[str, dict[str, int]] = {}
    solves: dict[str, dict[str, dict[str, Any]]] = {}  # removal → member → the retune's solver report
    for r in results:
        ma = r.member_audit
        if ma is None:
            continue
        model = run.member(r.name)
        distances = {"test": ma.test_min_distances}
        if ma.shifted_min_distances is not None:
            distances["test_shifted"] = ma.shifted_min_distances
        m = model.n_prototypes
        removals: dict[str, tuple[np.ndarray, ProtoPNet, dict[str, Any]]] = {
            "none": (np.zeros(m, bool), model, {})
        }
        pruned = r.purity["pruned"].to_numpy().astype(bool)
        # one retune per distinct set of flags (with its solver's report); nothing flagged leaves the member
        retuned = {pruned.tobytes(): (r.pruned_model, r.retune), np.zeros(m, bool).tobytes(): (model, {})}
        for det_name, flags in ma.detection.flags.items():
            key = np.asarray(flags, dtype=bool).tobytes()
            if key not in retuned:
                info: dict[str, Any] = {}
                reduced = retuned_copy(model, flags, ma.push_min_distances, bundle, recipe, epochs, info)
                retuned[key] = (reduced, info)
            removals[det_name] = (flags, *retuned[key])
        removals["pruned member"] = (pruned, r.pruned_model, r.retune)
        for removal, (flags, reduced, info) in removals.items():
            keep = ~np.asarray(flags, dtype=bool)
            logits.setdefault(removal, {})[r.name] = {
                split: evaluate_without(reduced, keep, d) for split, d in distances.items()
            }
            counts.setdefault(removal, {})[r.name] = int((~keep).sum())
            solves.setdefault(removal, {})[r.name] = info
    rows = []
    for removal, per_member in logits.items():
        for member, per_split in per_member.items():
            rows.append(
                {
                    "model": member,
                    "removed": removal,
                    "n_removed": counts[removal][member],
                    **{split: top1(per_split[split], labels[split]) for split in per_split},
                    "last_layer": retune_summary(solves[removal][member]),
                }
            )
        splits = set.intersection(*(set(v) for v in per_member.values())) if per_member else set()
        rows.append(
            {
                "model": "ensemble",
                "removed": removal,
                "n_removed": sum(counts[removal].values()),
                **{
                    split: top1(ensemble_logits([v[split] for v in per_member.values()]), labels[split])
                    for split in sorted(splits)
                },
                "last_layer": retune_summary(*solves[removal].values()),
            }
        )
    return {
        "available": shifted is not None,
        "splits": list(labels),
        "prototypes_on_shortcut": on_shortcut,
        "rows": rows,
        "note": SHIFT_LEAK_NOTE if shifted is not None else "the dataset has no test_shifted split",
    }


def retune_summary(*reports: dict[str, Any]) -> str:
    """How the last layers behind a row were obtained: "as trained" (nothing retrained), "converged" when every
    retune's convex solver reached its tolerance, else how many did not, with their iterations and residuals
    (an unconverged layer is the best found within the solver's iteration cap, and its top-1 is read as such)."""
    solved = [r for r in reports if r]
    if not solved:
        return "as trained"
    if any("converged" not in r for r in solved):  # Adam: a fixed number of epochs, no tolerance
        return f"retrained ({', '.join(sorted({str(r.get('solver', '?')) for r in solved}))})"
    open_ = [r for r in solved if not r["converged"]]
    if not open_:
        return "converged"
    detail = ", ".join(
        f"{r.get('iterations')} it., residual {float(r.get('residual', float('nan'))):.1e}" for r in open_
    )
    return f"{len(open_)} of {len(solved)} not converged ({detail})"
