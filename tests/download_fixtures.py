"""Released-metadata fixtures for the download tests: records and a folder in the release's layout."""
import json

FIELDS = {"url": "image_url", "caption": "en_caption", "caption_zh": "", "quality": "qalign_score",
          "aesthetic": "aesthetics_score", "flatness": "flat_percentage", "entropy": "shannon_entropy", "tag": "",
          "work_url": "work_url", "photographer": "photographer", "photographer_url": "photographer_url"}


def record(url: str, i: int = 0, **extra) -> dict:
    return {"image_url": url, "en_caption": f"A photo number {i}.", "zh_caption": f"照片 {i}", "tag": "landscape",
            "qalign_score": 4.5 - 0.1 * (i % 3), "aesthetics_score": 50.0 + i, "flat_percentage": 0.1,
            "shannon_entropy": 7.5, "work_url": f"https://www.pexels.com/photo/{i}/", "photographer": f"Ann {i}",
            "photographer_url": f"https://www.pexels.com/@ann{i}", **extra}


def release_folder(root, urls, extra=None):
    """The release's layout: lists of records, an object with `data`, one with `items`, a malformed file and
    records that are not objects or have no URL. ``extra``: {url: fields overriding its record}."""
    extra = extra or {}
    record = _with(extra)
    root.mkdir(parents=True, exist_ok=True)
    third = max(1, len(urls) // 3)
    (root / "part-0.json").write_text(json.dumps([record(u, i) for i, u in enumerate(urls[:third])]))
    (root / "part-1.json").write_text(json.dumps({"data": [record(u, third + i)
                                                            for i, u in enumerate(urls[third:2 * third])]}))
    items = [record(u, 2 * third + i) for i, u in enumerate(urls[2 * third:])] + ["not a record", {"en_caption": "x"}]
    (root / "part-2.json").write_text(json.dumps({"items": items}))
    (root / "broken.json").write_text('[{"image_url": "http://x/1.jpg", ')
    return root


def _with(extra):
    return lambda url, i: {**_record(url, i), **extra.get(url, {})}


_record = record
