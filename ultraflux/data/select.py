"""Turning per-image statistics into keep/reject decisions, the stage-2 subset, the split and the texture rank.

Every row gets exactly one ``reason`` ("" = kept): the FIRST failing check in this order

1. ``unreadable: <detail>`` / ``decompression_bomb`` (decode, :mod:`ultraflux.data.decode`)
2. ``duplicate: <the original>`` (same content hash as another source; the original is the copy whose path,
   relative to the source folder, sorts first, and the reason names it by that relative path)
3. ``no_caption`` / ``bad_caption: <detail>`` (:mod:`ultraflux.data.ingest`)
4. ``too_small`` (would need more than ``curate.max_upscale`` upscaling to reach its bucket)
5. ``flat``: more than ``curate.flat.max_fraction`` (50%) of patches have S_flat < ``curate.flat.threshold`` (800)
6. ``low_entropy``: H < ``curate.entropy_min`` (7.0 bits)
   (4-6: :mod:`ultraflux.data.rule`, the same rule pass 1 and ``curate-stats`` apply)
7. ``low_quality``: Q-Align score <= ``curate.quality.threshold`` (4.0); for a stand-in scorer, outside the top
   ``curate.quality.standin_keep_fraction`` of the rows still in the running (a percentile, never 4.0)
8. ``low_aesthetic``: outside the aesthetic top ``curate.aesthetic.keep_top`` (30%) of the rows still in the running;
   grayscale images under the colourfulness stand-in are not ranked and pass (scorer ``... skipped: grayscale``,
   :func:`ultraflux.data.scorers.skip_grayscale`)

(seed Sec. 2.1 for 5-8). Steps 5-8 are the multi-aspect curation; the ``baseline`` variant stops after step 4.
"Top p of n" keeps ``ceil(p * n)`` rows (at least one), ranking by score and breaking ties by ``id``.

* ``stage2`` (seed Table 3, "ArtiMuse percentile top-5%"): the aesthetic top ``curate.aesthetic.stage2_top`` of the
  same population ranked in step 8, hence a subset of the kept rows. Baseline: a deterministic random
  ``stage2_top`` fraction of its kept rows (Diffusion-4K has no aesthetic curriculum; a random subset of the same
  size keeps the stage-2 schedule comparable while isolating the effect of the aesthetic selection).
  Stage-2 rows are then taken from the "train" split only (:func:`stage2_from_train`): the same number of rows, the
  best-ranked train rows, so a held-out image never trains stage 2 and the stage-2 subset is never empty.
* ``split`` and ``eval`` (:func:`assign_split`, run BEFORE the keep/reject rule, so the evaluation set is the same
  for both data variants): "holdout" when ``sha256(seed:id)`` as a fraction of 2^64 is below
  ``curate.holdout_fraction``, else "train" (stable per image as the set grows). ``eval`` marks the held-out rows that
  pass the variant-independent checks 1-4 (decodable, not a duplicate copy, captioned, not too small), judged on the
  evaluation geometry :data:`EVAL_GEOMETRY` (nearest aspect bucket, centre crop) that held-out rows take in every
  variant. These are the evaluation set every co-design cell measures (DiT validation loss, VAE reconstruction,
  the FD reference): evaluated, never trained on, whatever the variant's filters say of them; their ``reason`` still
  records what those filters say (an eval row may read ``flat``). If no eligible row falls in the holdout although
  the fraction is > 0 and at least two rows are eligible, the eligible row with the smallest hash is held out, so
  tiny sets still have one. :func:`eval_set_sha256` names the set (sha256 of its sorted ids).
* ``texture_rank``: among kept rows, the percentile rank (in (0, 1], 1 = most textured) of ``s_flat_mean``, ties by
  id; NaN for rejected rows. "The top 50% by flatness score" (seed Sec. 2.2, VAE training) is
  ``texture_rank > 1 - 0.5``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ultraflux.io import sha256_text
from ultraflux.schema import Curate

from .rule import needs_too_much_upscale, texture_reasons
from .scorers import GRAYSCALE_SKIPPED


def ceil_count(fraction: float, n: int) -> int:
    """Rows in the top ``fraction`` of ``n``: ceil(fraction * n), at least 1 when fraction > 0 and n > 0."""
    return 0 if n == 0 or fraction <= 0 else min(n, max(1, math.ceil(fraction * n - 1e-9)))


def top_ids(frame: pd.DataFrame, column: str, fraction: float) -> set[str]:
    """ids of the top ``fraction`` rows of ``frame`` by ``column`` (descending; NaN last; ties by id)."""
    ordered = frame.assign(_score=frame[column].fillna(-np.inf)).sort_values(["_score", "id"],
                                                                              ascending=[False, True])
    return set(ordered["id"].iloc[: ceil_count(fraction, len(ordered))])


EVAL_GEOMETRY = "multiaspect"
"""The crop rule of held-out rows in every variant (:func:`ultraflux.data.process.select_box`): the nearest aspect
bucket, centre crop, so all cells evaluate the same pixels."""
GEOMETRY = ("bucket", "width", "height", "upscale", "box")
"""The columns a crop rule decides; ``eval_geometry`` holds the evaluation geometry's values (a dict) per row."""


def hash_unit(seed: int, image_id: str, salt: str = "split") -> float:
    """A deterministic number in [0, 1) from seed and id."""
    return int(sha256_text(f"{salt}:{seed}:{image_id}")[:16], 16) / 2**64


def assign_reasons(rows: pd.DataFrame, curate: Curate, variant: str, quality_learned: bool) -> dict:
    """Fill ``rows.reason`` and ``rows.stage2`` in place from the validated ``curate`` section; returns the
    thresholds actually used."""
    qcfg, acfg = curate.quality, curate.aesthetic
    used: dict = {}

    error = rows["error"].fillna("").astype(str)
    reason = error.where(error != "too_small", "")
    original, copy = duplicate_copies(rows)
    dup = (reason == "") & copy
    reason[dup] = "duplicate: " + original[dup]
    reason[(reason == "") & (rows["caption_error"] != "")] = rows["caption_error"]
    reason[(reason == "") & (error == "too_small")] = "too_small"
    if variant != "baseline":
        texture = pd.Series(texture_reasons(rows["s_flat_fraction"], rows["entropy"], curate.flat.max_fraction,
                                            curate.entropy_min), index=rows.index)
        reason[(reason == "") & (texture != "")] = texture

        alive = rows[reason == ""]
        if quality_learned:
            threshold = float(qcfg.threshold)
            bad = alive["id"][~(alive["quality"] > threshold)]
        else:
            keep = top_ids(alive, "quality", float(qcfg.standin_keep_fraction))
            bad = alive["id"][~alive["id"].isin(keep)]
            threshold = float(alive.loc[alive["id"].isin(keep), "quality"].min()) if keep else float("nan")
        used["quality_threshold"] = threshold
        reason[(reason == "") & rows["id"].isin(set(bad))] = "low_quality"

        alive = rows[reason == ""]
        unranked = alive.get("aesthetic_scorer", pd.Series("", index=alive.index)) == GRAYSCALE_SKIPPED  # grayscale
        ranked = alive[~unranked]
        keep = top_ids(ranked, "aesthetic", float(acfg.keep_top)) | set(alive.loc[unranked, "id"])
        stage2 = top_ids(ranked, "aesthetic", float(acfg.stage2_top))
        used["aesthetic_threshold"] = (float(alive.loc[alive["id"].isin(keep), "aesthetic"].min())
                                       if keep else float("nan"))
        reason[(reason == "") & ~rows["id"].isin(keep)] = "low_aesthetic"
        rows["reason"] = reason
        rows["stage2"] = (reason == "") & rows["id"].isin(stage2)
    else:
        rows["reason"] = reason
        kept = rows[reason == ""]
        order = sorted(kept["id"], key=lambda i: hash_unit(0, i, "stage2"))
        chosen = set(order[: ceil_count(float(acfg.stage2_top), len(order))])
        rows["stage2"] = (reason == "") & rows["id"].isin(chosen)
    rows["kept"] = rows["reason"] == ""
    return used


def duplicate_copies(rows: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """(the original's relative path per row, whether the row is a later copy of it): the original of a content
    hash is the copy whose relative path sorts first."""
    original = rows.groupby("id")["relative"].transform("min")
    return original, rows["relative"] != original


def assign_split(rows: pd.DataFrame, seed: int, holdout_fraction: float, max_upscale: float) -> None:
    """Fill ``rows.split`` and ``rows.eval`` in place and give held-out rows the evaluation geometry (``error``
    "too_small" re-judged on it); see the module docstring. Run before :func:`assign_reasons`."""
    units = rows["id"].map(lambda i: hash_unit(seed, i))
    geometry = rows["eval_geometry"].map(lambda g: g or {})
    small = geometry.map(lambda g: bool(g) and needs_too_much_upscale(g["upscale"], max_upscale))
    readable = rows["error"].isin(["", "too_small"])
    eligible = readable & (rows["caption_error"] == "") & ~duplicate_copies(rows)[1] & ~small
    held = units < holdout_fraction
    if holdout_fraction > 0 and eligible.sum() >= 2 and not (held & eligible).any():
        held = rows["id"] == rows.loc[units[eligible].idxmin(), "id"]
    for idx in rows.index[held & readable]:
        for col in GEOMETRY:
            rows.at[idx, col] = geometry[idx][col]
        rows.at[idx, "error"] = "too_small" if small[idx] else ""
    rows["split"] = np.where(held, "holdout", "train")
    rows["eval"] = held & eligible


def eval_set_sha256(manifest: pd.DataFrame) -> str:
    """The evaluation set's identity: sha256 of its sorted ids, one per line (equal for every data variant)."""
    return sha256_text("\n".join(sorted(manifest.loc[manifest["eval"], "id"])))


def stage2_from_train(rows: pd.DataFrame, variant: str) -> None:
    """Move the stage-2 selection onto train rows, keeping its size (see module docstring); in place."""
    count = int(rows["stage2"].sum())
    train = rows[rows["kept"] & (rows["split"] == "train")]
    if variant == "baseline":
        order = sorted(train["id"], key=lambda i: hash_unit(0, i, "stage2"))
    else:
        order = list(train.assign(_s=train["aesthetic"].fillna(-np.inf))
                     .sort_values(["_s", "id"], ascending=[False, True])["id"])
    rows["stage2"] = rows["kept"] & (rows["split"] == "train") & rows["id"].isin(set(order[:count]))


def assign_texture_rank(rows: pd.DataFrame) -> None:
    """Fill ``rows.texture_rank`` in place (see module docstring)."""
    rank = pd.Series(np.nan, index=rows.index, dtype=float)
    kept = rows[rows["kept"]].sort_values("id")
    if len(kept):
        rank.loc[kept.index] = kept["s_flat_mean"].rank(method="first", pct=True)
    rows["texture_rank"] = rank
