"""Bucket table (seed Sec. 2.2): named sizes, multiples of 32, nearest-bucket snapping."""

import math

import pytest

from ultraflux.data.buckets import DEFAULT_ASPECTS, bucket_table, nearest_bucket, parse_aspect


def test_seed_named_sizes_at_scale_one():
    table = bucket_table(1.0)
    assert table["1:1"] == (3840, 3840)
    assert table["16:9"] == (5120, 2880)
    assert table["9:16"] == (2880, 5120)
    assert table["3:2"] == (4704, 3136)
    assert table["2:3"] == (3136, 4704)


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.25, 0.125, 0.0625, 0.3])
def test_sides_multiple_of_32_area_and_aspect(scale):
    table = bucket_table(scale, DEFAULT_ASPECTS)
    assert list(table) == DEFAULT_ASPECTS
    area = (3840 * scale) ** 2
    for name, (w, h) in table.items():
        assert w % 32 == 0 and h % 32 == 0, (name, w, h)
        assert abs(math.log(w * h / area)) < 0.25, (name, w, h)
        assert abs(math.log(w / h / parse_aspect(name))) < 0.1, (name, w, h)
        portrait = ":".join(reversed(name.split(":")))
        if portrait in table:
            assert table[portrait] == (h, w)


def test_tiny_profile_is_about_512_squared():
    assert bucket_table(0.125)["1:1"] == (480, 480)


def test_nearest_bucket_by_log_aspect():
    table = bucket_table(1.0)
    assert nearest_bucket(1920, 1080, table) == "16:9"
    assert nearest_bucket(1080, 1920, table) == "9:16"
    assert nearest_bucket(1000, 1010, table) == "1:1"
    assert nearest_bucket(2390, 1000, table) == "2.39:1"
    assert nearest_bucket(4000, 1000, table) == "2.39:1"  # beyond the widest bucket
    # 1.4 lies between 4:3 (ln 0.288) and 3:2 (ln 0.405): ln 1.4 = 0.336 is nearer 4:3 by log ratio
    assert nearest_bucket(1400, 1000, table) == "4:3"


def test_bad_aspect_name():
    with pytest.raises(ValueError):
        parse_aspect("wide")
