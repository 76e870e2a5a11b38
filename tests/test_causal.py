"""Causal prototype labels on hand-made drop matrices (each expected label worked out by hand)."""

from __future__ import annotations

import numpy as np
import pytest

from protoaudit.core.causal import MIN_DROP, causal_concepts

NAN = float("nan")


def test_concept_is_the_element_whose_removal_drops_the_similarity_most() -> None:
    base = np.array([8.0, 8.0, 4.0, 9.0, 5.0])
    removed = np.array(
        [
            [1.0, 7.5, 7.9],  # part removed → 1.0: drop 7/8 → the part
            [7.8, 7.9, 7.7],  # nothing drops it by more than half → background
            [3.0, 0.5, NAN],  # ring removed → drop 0.875 beats the part's 0.25; third element absent
            [
                4.5,
                4.5,
                9.5,
            ],  # 4.5 is exactly half: not *more* than half → background; the rise is a negative drop
            [0.0, 0.0, 6.0],  # a tie between the two first elements → the lower column
        ]
    )
    names = [
        ["part 0: red disc", "shared 0: white ring", "marker"],
        ["part 1: blue square", "shared 0: white ring", "marker"],
        ["part 2: green cross", "shared 1: black bar"],
        ["part 0: red disc", "part 3: grey star", "marker"],
        ["marker", "part 4: pink bar", "shared 0: white ring"],
    ]
    kinds = [
        ["discriminative", "shared", "shortcut"],
        ["discriminative", "shared", "shortcut"],
        ["discriminative", "shared"],
        ["discriminative", "discriminative", "shortcut"],
        ["shortcut", "discriminative", "shared"],
    ]
    out = causal_concepts(base, removed, names, kinds, min_drop=0.5)
    assert out["concept"].tolist() == [
        "part 0: red disc",
        "background",
        "shared 1: black bar",
        "background",
        "marker",
    ]
    assert out["concept_kind"].tolist() == [
        "discriminative",
        "background",
        "shared",
        "background",
        "shortcut",
    ]
    assert out["element"].tolist() == [0, -1, 1, -1, 0]
    np.testing.assert_allclose(out["drop"], [7 / 8, 0.3 / 8, 0.875, 0.5, 1.0])
    np.testing.assert_allclose(out["drops"][0], [7 / 8, 0.5 / 8, 0.1 / 8])
    assert np.isnan(out["drops"][2, 2])
    assert out["drops"][3, 2] == pytest.approx(-0.5 / 9)


def test_min_drop_moves_the_background_line_and_defaults_to_one_half() -> None:
    base = np.array([10.0])
    removed = np.array([[6.0, 9.0]])  # largest drop 0.4
    names, kinds = [["part 0", "shared 0"]], [["discriminative", "shared"]]
    assert causal_concepts(base, removed, names, kinds)["concept_kind"].tolist() == ["background"]
    assert MIN_DROP == 0.5
    assert causal_concepts(base, removed, names, kinds, min_drop=0.3)["concept"].tolist() == ["part 0"]


def test_an_image_without_elements_is_background_and_arrays_are_accepted() -> None:
    base = np.array([2.0, 2.0])
    removed = np.array([[NAN, NAN], [0.2, NAN]])
    names = np.array([["", ""], ["marker", ""]], dtype=object)
    kinds = np.array([["", ""], ["shortcut", ""]], dtype=object)
    out = causal_concepts(base, removed, names, kinds)
    assert out["concept"].tolist() == ["background", "marker"]
    assert np.isnan(out["drop"][0])
    assert out["drop"][1] == pytest.approx(0.9)


@pytest.mark.parametrize(
    ("base", "removed", "kinds", "message"),
    [
        (np.array([1.0, 2.0]), np.array([[0.5]]), [["shared"]], "removed: expected shape"),
        (np.array([0.0]), np.array([[0.5]]), [["shared"]], "finite and > 0"),
        (np.array([1.0]), np.array([[0.5]]), [["clutter"]], "'clutter' (prototype 0) is not one of"),
        (np.array([1.0]), np.array([[0.5]]), [["shared", "shared"]], "more than the 1 columns"),
    ],
)
def test_bad_input_names_the_problem(
    base: np.ndarray, removed: np.ndarray, kinds: list[list[str]], message: str
) -> None:
    names = [["x"] * len(row) for row in kinds] + [["x"]] * (len(base) - len(kinds))
    kinds = kinds + [["shared"]] * (len(base) - len(kinds))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        causal_concepts(base, removed, names, kinds)
