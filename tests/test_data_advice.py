"""The curation guard's advice: the exact key, direction and value, read off the run's own statistics."""
import pandas as pd
import pytest

from ultraflux.config import typed
from ultraflux.data.advice import relax_advice


@pytest.fixture
def curate(params):
    """The embedded profile's curate section: scale 0.125, max_upscale 1.5, max_fraction 0.5, entropy_min 7,
    standin_keep_fraction 0.9, threshold 4, keep_top 0.3."""
    c = typed(params).curate
    assert (c.buckets.scale, c.max_upscale, c.flat.max_fraction, c.entropy_min, c.quality.standin_keep_fraction,
            c.quality.threshold, c.aesthetic.keep_top) == (0.125, 1.5, 0.5, 7.0, 0.9, 4.0, 0.3)
    return c


def rows():
    r = [  # reason, upscale, flat fraction, entropy, quality, aesthetic
        ("too_small", 1.8, 0.0, 7.5, 9.0, 50.0), ("too_small", 2.4, 0.0, 7.5, 9.0, 50.0),
        ("flat", 1.0, 0.6, 7.5, 9.0, 50.0), ("flat", 1.0, 0.9, 7.5, 9.0, 50.0), ("flat", 1.0, 0.7, 7.5, 9.0, 50.0),
        ("low_entropy", 1.0, 0.0, 6.99999, 9.0, 50.0), ("low_entropy", 1.0, 0.0, 5.5, 9.0, 50.0),
        ("low_quality", 1.0, 0.0, 7.5, 1.0, 50.0),
        ("low_aesthetic", 1.0, 0.0, 7.5, 9.0, 10.0), ("low_aesthetic", 1.0, 0.0, 7.5, 9.0, 12.0),
        ("", 1.0, 0.0, 7.5, 9.0, 70.0),
    ]
    return pd.DataFrame(r, columns=["reason", "upscale", "s_flat_fraction", "entropy", "quality", "aesthetic"]).assign(
        quality_scorer="standin:laplacian-sharpness")


def test_each_reason_names_key_direction_and_value(curate):
    lines = {ln.split(" ")[0]: ln for ln in relax_advice(rows(), curate, wanted=2)}
    assert set(lines) == {"too_small", "flat", "low_entropy", "low_quality", "low_aesthetic", "note:"}
    assert "raise curate.max_upscale from 1.5 to 2.4" in lines["too_small"]
    assert "lower curate.buckets.scale from 0.125 to 0.0781" in lines["too_small"]       # 0.125 * 1.5 / 2.4
    assert "raise curate.flat.max_fraction from 0.5 to 0.7 to let up to 2 more" in lines["flat"]
    assert "(all 3: 0.9)" in lines["flat"]
    assert "lower curate.entropy_min from 7 to 5.5 to let up to all 2" in lines["low_entropy"]
    # 4 rows reached the quality filter (1 rejected): keeping 1 more needs 4/4 of them
    assert "raise curate.quality.standin_keep_fraction from 0.9 to 1" in lines["low_quality"]
    # 3 rows reached the aesthetic filter, 1 kept: 3/3 keeps both
    assert "raise curate.aesthetic.keep_top from 0.3 to 1" in lines["low_aesthetic"]
    # the two relative filters keep a share of what reaches them: relaxing an earlier filter gains less than "up to"
    assert lines["note:"].startswith("note: curate.quality.standin_keep_fraction 0.9 and curate.aesthetic.keep_top "
                                     "0.3 keep a fraction of the images that reach them")


def test_no_note_when_only_relative_filters_removed_images(curate):
    r = rows()
    r = r[r["reason"].isin(["low_aesthetic", ""])]
    assert [ln.split(" ")[0] for ln in relax_advice(r, curate, wanted=1)] == ["low_aesthetic"]


def test_values_really_keep_that_many(curate):
    """Relaxing to the advised value lets exactly k of the rejected images past the filter."""
    r = rows()
    line = next(ln for ln in relax_advice(r, curate, wanted=1) if ln.startswith("low_entropy"))
    value = float(line.split(" to ")[1].split(" ")[0])
    assert ((r["reason"] == "low_entropy") & (r["entropy"] >= value)).sum() == 1
    line = next(ln for ln in relax_advice(r, curate, wanted=1) if ln.startswith("flat"))
    value = float(line.split(" to ")[1].split(" ")[0])
    assert ((r["reason"] == "flat") & (r["s_flat_fraction"] <= value)).sum() == 1


def test_learned_quality_threshold(curate):
    r = rows().assign(quality_scorer="qalign")
    r.loc[r["reason"] == "low_quality", "quality"] = 3.2
    line = next(ln for ln in relax_advice(r, curate, wanted=3) if ln.startswith("low_quality"))
    assert "lower curate.quality.threshold from 4 to below 3.2" in line
