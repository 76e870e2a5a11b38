"""Duplicate prototypes of a run's members, for duplicates.csv."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

from protoaudit.core.geometry import box_iou
from protoaudit.core.purity import duplicate_pairs

if TYPE_CHECKING:
    from protoaudit.engine.run import Run


def find_duplicates(run: Run, names: list[str], tolerance: float = 1e-4) -> pd.DataFrame:
    """Duplicate prototypes: within a member, a shared source patch or squared distance ≤ tolerance; across
    members (different latent spaces), the same source image with overlapping boxes (IoU ≥ 0.5)."""
    rows: list[dict[str, Any]] = []
    tables = {n: run.prototypes(n) for n in names}
    for n in names:
        model = run.member(n)
        t = tables[n]
        sources = t[["source_index", "h", "w"]].to_numpy()
        for i, j, reason, d in duplicate_pairs(model.prototype_vectors.detach().numpy(), sources, tolerance):
            rows.append(
                {
                    "member_a": n,
                    "prototype_a": i,
                    "member_b": n,
                    "prototype_b": j,
                    "reason": reason,
                    "distance": d,
                }
            )
    for a_pos, a in enumerate(names):
        for b in names[a_pos + 1 :]:
            ta, tb = tables[a], tables[b]
            merged = ta.merge(tb, on="source_index", suffixes=("_a", "_b"))
            for r in merged.itertuples(index=False):
                iou = box_iou(
                    (r.box_y0_a, r.box_y1_a, r.box_x0_a, r.box_x1_a),
                    (r.box_y0_b, r.box_y1_b, r.box_x0_b, r.box_x1_b),
                )
                if iou >= 0.5:
                    rows.append(
                        {
                            "member_a": a,
                            "prototype_a": r.prototype_a,
                            "member_b": b,
                            "prototype_b": r.prototype_b,
                            "reason": f"same source image, box IoU {iou:.2f}",
                            "distance": float("nan"),
                        }
                    )
    return pd.DataFrame(
        rows, columns=["member_a", "prototype_a", "member_b", "prototype_b", "reason", "distance"]
    )
