"""One-image queries: an image's latents, its nearest patches and prototypes, a prototype's nearest patches."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from protoaudit.engine.index.search import Backend, PatchIndex, load_index
from protoaudit.errors import InputError

if TYPE_CHECKING:
    from protoaudit.core.model import ProtoPNet
    from protoaudit.engine.data import DatasetBundle
    from protoaudit.engine.run import Run


@dataclass
class QueryImage:
    """An image to explain or query with: pixels (3, S, S) float32 in [0, 1] at the run's image size."""

    pixels: torch.Tensor
    image_id: str
    label: int | None = None
    mask: np.ndarray | None = None  # (S, S) uint8 part ids, when the dataset has them
    split: str | None = None  # "train" (the push split), "val" or "test"; None for an image file
    index: int | None = None  # index into that split


def _read_image_file(path: Path, image_size: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"cannot read image {path}: {reason} (expected a PNG or JPEG file)") from None
    array = np.asarray(rgb, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def load_query_image(
    run: Run, image: str | os.PathLike[str], bundle: DatasetBundle | None = None
) -> QueryImage:
    """An image file (PNG/JPEG, resized to the run's image size) or an image id of the run's dataset
    (e.g. ``test/000012``; the dataset is rebuilt from the recipe unless ``bundle`` is given)."""
    text = str(image)
    path = Path(text).expanduser()
    image_size = int(run.recipe().data.image_size)
    if path.is_file():
        return QueryImage(_read_image_file(path, image_size), path.name)
    if path.exists():
        raise InputError(f"image {text} is not a file (expected a PNG or JPEG file or a dataset image id)")
    if bundle is None:
        bundle = run.dataset()
    for split_name, split in (("train", bundle.push), ("val", bundle.val), ("test", bundle.test)):
        try:
            i = split.image_ids.index(text)
        except ValueError:
            continue
        pixels = split.batch([i])[0].float()
        return QueryImage(pixels, text, int(split.labels[i]), split.part_mask(i), split_name, i)
    example = bundle.test.image_ids[0] if len(bundle.test) else "test/000000"
    raise InputError(
        f"image {text!r} is neither a file nor an image id of the run's dataset (ids look like {example})"
    )


@torch.no_grad()
def image_latents(model: ProtoPNet, image: QueryImage) -> torch.Tensor:
    """(D, H, W) float32 latent map of one image."""
    model.eval()
    device = model.prototype_vectors.device
    return model.latent(image.pixels[None].to(device))[0].float()


def _class_names(run: Run, member: str) -> list[str]:
    return list(run.member(member).config.class_names)


def _describe_rows(frame: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    frame.insert(
        frame.columns.get_loc("label") + 1,
        "class_name",
        [names[int(v)] if v >= 0 else "" for v in frame["label"]],
    )
    return frame


def nearest_patches_to_prototype(
    run: Run,
    member: str,
    prototype: int,
    k: int = 5,
    split: str = "train",
    per_image: bool = True,
    backend: Backend = "auto",
) -> pd.DataFrame:
    """The k nearest patches of ``split`` to one prototype (paper Fig. 5b), one per image by default.

    Columns: rank, image_index, image_id, label, class_name, h, w, part, distance (squared L2).
    """
    model = run.member(member)
    if not 0 <= prototype < model.n_prototypes:
        raise InputError(f"member {member} has prototypes 0…{model.n_prototypes - 1}, not {prototype}")
    index = load_index(run, member, split, backend)  # one query: FAISS's direct path is as fast
    query = model.prototype_vectors.detach()[prototype : prototype + 1].float()
    distances, rows = index.search(query, k, per_image=per_image)
    return _rows_frame(index, distances[0], rows[0], _class_names(run, member))


def _rows_frame(index: PatchIndex, distances: np.ndarray, rows: np.ndarray, names: list[str]) -> pd.DataFrame:
    ok = rows >= 0
    frame = index.meta.iloc[rows[ok]][["image_index", "image_id", "label", "h", "w", "part"]].reset_index(
        drop=True
    )
    frame.insert(0, "rank", np.arange(1, int(ok.sum()) + 1))
    frame["distance"] = distances[ok].astype(np.float64)
    return _describe_rows(frame, names)


def nearest_patches_to_image(
    run: Run,
    image: str | os.PathLike[str] | QueryImage,
    member: str,
    k: int = 3,
    split: str = "train",
    per_image: bool = False,
    backend: Backend = "auto",
) -> pd.DataFrame:
    """For each patch (query_h, query_w) of an image, its k nearest patches of ``split`` (training by default).

    Columns: query_h, query_w, rank, image_index, image_id, label, class_name, h, w, part, distance.
    """
    model = run.member(member)
    index = load_index(run, member, split, backend, interactive=True)
    query = image if isinstance(image, QueryImage) else load_query_image(run, image)
    z = image_latents(model, query)
    hh, ww = z.shape[1:]
    patches = z.permute(1, 2, 0).reshape(hh * ww, -1)
    distances, rows = index.search(patches, k, per_image=per_image)
    names = _class_names(run, member)
    frames = []
    for p in range(hh * ww):
        frame = _rows_frame(index, distances[p], rows[p], names)
        frame.insert(0, "query_w", p % ww)
        frame.insert(0, "query_h", p // ww)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def nearest_prototypes_to_image(
    run: Run,
    image: str | os.PathLike[str] | QueryImage,
    k: int = 3,
    members: Sequence[str] | None = None,
) -> pd.DataFrame:
    """For each patch (h, w) of an image, its k nearest prototypes of each member (distances are comparable
    only within a member: each member has its own latent space).

    Columns: member, h, w, rank, prototype, class, class_name, distance, similarity.
    """
    from protoaudit.core.model import similarity, squared_distances

    query = image if isinstance(image, QueryImage) else load_query_image(run, image)
    frames = []
    for name in members or run.member_names:
        model = run.member(name)
        z = image_latents(model, query)
        d = squared_distances(z[None], model.prototype_vectors.detach())[0]  # (m, H, W)
        m, hh, ww = d.shape
        kk = min(k, m)
        dist, proto = d.permute(1, 2, 0).reshape(hh * ww, m).topk(kk, dim=1, largest=False)
        patch = np.repeat(np.arange(hh * ww), kk)
        proto_np = proto.flatten().cpu().numpy()
        classes = np.asarray(model.config.prototype_class)[proto_np]
        frames.append(
            pd.DataFrame(
                {
                    "member": name,
                    "h": patch // ww,
                    "w": patch % ww,
                    "rank": np.tile(np.arange(1, kk + 1), hh * ww),
                    "prototype": proto_np,
                    "class": classes,
                    "class_name": [model.config.class_names[c] for c in classes],
                    "distance": dist.flatten().cpu().double().numpy(),
                    "similarity": similarity(dist).flatten().cpu().double().numpy(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)
