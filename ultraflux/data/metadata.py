"""The released MultiAspect-4K-1M metadata as a source (``data.source`` = the ``.tar.gz`` or a folder of its JSON).

The release is metadata only: JSON files, each a list of records (or an object holding the list under ``data`` or
``items``). A record names its image by URL and carries bilingual captions, a tag, the VLM quality (Q-Align) and
aesthetic (ArtiMuse) scores, flatness and entropy, and for most records the photographer's attribution.

* Fields: :data:`FIELDS` are mapped by ``data.metadata.fields.<name>``; "" (or a name absent from the records)
  falls back to the common spellings in :data:`SPELLINGS`. Defaults in params.yaml are the release's names where the
  public ``tools/filtering_pipeline.py`` documents them (``qalign_score``, ``shannon_entropy``, ``flat_percentage``,
  ``aesthetics_score``) and ``image_url`` / ``en_caption``. A required field (:data:`REQUIRED`) that is found
  nowhere raises :class:`MetadataError` before any work, naming the key and the fields seen in the first records.
* Robust reading: a JSON file that does not parse, holds no list, or a record that is not an object or has no
  usable URL is a :class:`Problem` (file, index, reason), recorded by the caller, never fatal. Reading the tarball
  streams its members (``r|*``) and refuses absolute names, ``..`` members, links and special files (recorded).
* Memory: JSON is parsed as a stream (``ijson``): one record in memory at a time, however large a file is, and
  :func:`select_subset` keeps at most ``max_records`` records per aspect group: memory does not grow with the
  number of records.
* ``data.metadata.max_records``: the records whose ``sha256(url)`` is smallest (the same subset on every machine,
  whatever the file order); ``balance_aspects`` takes them round-robin over aspect groups when records give sizes.
"""
from __future__ import annotations

import heapq
import math
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterable, Iterator

from ultraflux.io import sha256_text

FIELDS = ("url", "caption", "caption_zh", "quality", "aesthetic", "flatness", "entropy", "tag", "work_url",
          "photographer", "photographer_url")
REQUIRED = ("url", "caption")
NUMERIC = ("quality", "aesthetic", "flatness", "entropy")
ATTRIBUTION = ("photographer", "work_url", "photographer_url")
SPELLINGS = {
    "url": ("image_url", "url", "img_url", "download_url", "URL"),
    "caption": ("en_caption", "caption_en", "english_caption", "caption", "text", "prompt"),
    "caption_zh": ("zh_caption", "caption_zh", "cn_caption", "caption_cn", "ch_caption", "chinese_caption"),
    "quality": ("qalign_score", "q_align_score", "qalign", "quality_score", "quality"),
    "aesthetic": ("aesthetics_score", "aesthetic_score", "artimuse_score", "aesthetics", "aesthetic"),
    "flatness": ("flat_percentage", "flat_fraction", "flatness", "flat_ratio"),
    "entropy": ("shannon_entropy", "entropy", "information_entropy"),
    "tag": ("tag", "tags", "character_tag", "subject_tag", "category"),
    "work_url": ("work_url", "page_url", "photo_url", "source_url"),
    "photographer": ("photographer", "author", "photographer_name", "artist", "user"),
    "photographer_url": ("photographer_url", "author_url", "profile_url", "user_url"),
}
SIZE_SPELLINGS = (("width", "height"), ("image_width", "image_height"), ("w", "h"), ("orig_width", "orig_height"))
SAMPLE_RECORDS = 100  # field detection looks at this many records from the first readable files
METADATA_SUFFIXES = (".tar.gz", ".tgz", ".tar")


class MetadataError(ValueError):
    """The metadata cannot be used at all (a required field missing everywhere, nothing readable)."""


@dataclass(frozen=True)
class Problem:
    """A file or record skipped, and why (written to the download stage's ``problems.jsonl``)."""

    file: str
    index: int  # record index in the file; -1 = the whole file
    reason: str


def is_metadata_source(source: str | Path) -> bool:
    """``data.source`` is the released metadata: a tarball, or a folder whose files are all JSON (hidden ones aside)."""
    path = Path(str(source))
    if not str(source) or not path.exists():
        return False
    if path.is_file():
        return path.name.lower().endswith(METADATA_SUFFIXES)
    has_json = False
    for entry in path.rglob("*"):  # stops at the first other file: cheap on a folder of a million images
        if entry.name.startswith(".") or entry.is_dir():
            continue
        if entry.suffix.lower() != ".json":
            return False
        has_json = True
    return has_json


# --------------------------------------------------------------------------------------------------- reading files
def member_problem(info: tarfile.TarInfo) -> str:
    """Why a tarball member is refused ("" = a safe regular file)."""
    name = PurePosixPath(info.name)
    if info.name.startswith("/") or name.is_absolute():
        return "unsafe_member: absolute path"
    if ".." in name.parts:
        return "unsafe_member: '..' in path"
    if info.issym() or info.islnk():
        return f"unsafe_member: link to {info.linkname!r}"
    if not (info.isfile() or info.isdir()):
        return "unsafe_member: special file"
    return ""


def _tar_documents(path: Path, problem: Callable[[Problem], None]) -> Iterator[tuple[str, BinaryIO]]:
    try:
        with tarfile.open(path, mode="r|*") as tar:  # streaming: members in file order, nothing extracted
            for info in tar:
                reason = member_problem(info)
                if reason:
                    problem(Problem(info.name, -1, reason))
                elif info.isfile() and info.name.lower().endswith(".json"):
                    yield info.name, tar.extractfile(info)   # read by the caller before the next member
    except (tarfile.TarError, OSError, EOFError) as err:
        problem(Problem(str(path), -1, f"unreadable_archive: {type(err).__name__}: {err}"))


def _folder_documents(root: Path, problem: Callable[[Problem], None]) -> Iterator[tuple[str, BinaryIO]]:
    for path in sorted(root.rglob("*.json")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink() or not path.is_file():
            problem(Problem(rel, -1, "unsafe_member: link or special file"))
            continue
        try:
            with path.open("rb") as stream:
                yield rel, stream
        except OSError as err:
            problem(Problem(rel, -1, f"unreadable_file: {err.strerror or err}"))


def documents(source: str | Path, problem: Callable[[Problem], None]) -> Iterator[tuple[str, BinaryIO]]:
    """(name, binary stream) of every JSON file of the release, in a stable order (tar order / sorted paths); each
    stream must be read before the next is asked for."""
    path = Path(source)
    return _tar_documents(path, problem) if path.is_file() else _folder_documents(path, problem)


RECORD_LISTS = ("", "data", "items")  # where the records are: the top-level list, or an object's data / items


def parse_document(name: str, stream: BinaryIO, problem: Callable[[Problem], None]) -> Iterator:
    """The records of one JSON file, streamed (``ijson``: one record in memory at a time, whatever the file's size).
    A file that breaks off mid-way keeps the records before the break and records the break; a file with no list of
    records is a problem too."""
    import ijson

    if hasattr(stream, "peek") and stream.peek(3)[:3] == b"\xef\xbb\xbf":   # a UTF-8 byte-order mark
        stream.read(3)
    item = None   # the prefix of the records ("item", "data.item", "items.item"), once their list opens
    top, keys, builder = None, [], None
    try:
        for prefix, event, value in ijson.parse(stream, use_float=True):
            top = top or event
            if builder is not None:                      # inside one record
                builder.event(event, value)
                if prefix == item and event in ("end_map", "end_array"):
                    yield builder.value
                    builder = None
            elif prefix == item:
                if event in ("start_map", "start_array"):
                    builder = ijson.ObjectBuilder()
                    builder.event(event, value)
                else:
                    yield value                          # a scalar where a record should be: normalize() says so
            elif item is None and event == "start_array" and prefix in RECORD_LISTS:
                item = f"{prefix}.item" if prefix else "item"
            elif prefix == "" and event == "map_key" and len(keys) < 10:
                keys.append(value)
    except (ijson.JSONError, UnicodeDecodeError, ValueError) as err:
        problem(Problem(name, -1, f"malformed_json: {str(err)[:200]}"))
        return
    except (OSError, EOFError, tarfile.TarError) as err:
        problem(Problem(name, -1, f"unreadable_file: {type(err).__name__}: {err}"))
        return
    if item is None:
        kind = {"start_map": "dict", "start_array": "list", None: "empty"}.get(top, top)
        listed = f" (keys {sorted(keys)})" if keys else ""
        problem(Problem(name, -1, f"no_records: top level is {kind}{listed}, not a list or an object with "
                                  "'data' / 'items'"))


def raw_records(source: str | Path, problem: Callable[[Problem], None]) -> Iterator[tuple[str, int, object]]:
    """(file, index, record) of every record, non-objects included (they are checked by :func:`normalize`)."""
    for name, stream in documents(source, problem):
        for index, record in enumerate(parse_document(name, stream, problem)):
            yield name, index, record


# --------------------------------------------------------------------------------------------------- fields
def resolve_fields(configured: dict, sample: list[dict]) -> dict[str, str | None]:
    """Map each canonical field to a record key: the configured one if the records have it, else a common spelling,
    else None. Raises :class:`MetadataError` for a required field found nowhere."""
    seen: dict[str, None] = {}
    for record in sample:
        seen.update(dict.fromkeys(record))
    mapping: dict[str, str | None] = {}
    for field in FIELDS:
        wanted = configured[field]   # "" = auto-detect
        candidates = ((wanted,) if wanted else ()) + SPELLINGS[field]
        mapping[field] = next((c for c in candidates if c in seen), None)
        if mapping[field] is None and field in REQUIRED:
            raise MetadataError(
                f"data.metadata.fields.{field} = {wanted!r}: no such field in the first {len(sample)} records "
                f"(tried {', '.join(candidates)}); fields found: {', '.join(seen) or 'none'}")
    return mapping


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value).strip()


def url_key(url: str) -> str:
    """The sample key of a URL: the first 16 hex digits of its SHA-256 (never a path taken from the URL)."""
    return sha256_text(url)[:16]


def aspect_group(record: dict) -> str:
    """The nearest named aspect ratio of a record with a width and height ("" when it gives none)."""
    from .buckets import DEFAULT_ASPECTS

    for wk, hk in SIZE_SPELLINGS:
        w, h = _number(record.get(wk)), _number(record.get(hk))
        if w and h and w > 0 and h > 0:
            ratio = math.log(w / h)
            return min(DEFAULT_ASPECTS, key=lambda a: abs(math.log(_ratio(a)) - ratio))
    return ""


def _ratio(aspect: str) -> float:
    a, b = aspect.split(":")
    return float(a) / float(b)


def normalize(file: str, index: int, record, mapping: dict, problem: Callable[[Problem], None]) -> dict | None:
    """A canonical record (:data:`FIELDS`, ``key``, ``file``, ``group``, ``record``) or None and a problem."""
    if not isinstance(record, dict):
        problem(Problem(file, index, f"malformed_record: {type(record).__name__}, not an object"))
        return None
    url = record.get(mapping["url"]) if mapping["url"] else None
    if not isinstance(url, str) or not url.strip():
        problem(Problem(file, index, f"missing_field: {mapping['url'] or 'url'}"))
        return None
    out = {field: _text(record.get(key)) if key else "" for field, key in mapping.items()}
    for field in NUMERIC:
        out[field] = _number(record.get(mapping[field])) if mapping[field] else None
    out["url"] = url.strip()
    out.update({"key": url_key(out["url"]), "file": file, "group": aspect_group(record), "record": record})
    return out


# --------------------------------------------------------------------------------------------------- records
def iter_records(source: str | Path, fields: dict, problem: Callable[[Problem], None]) -> tuple[dict, Iterator[dict]]:
    """(field mapping, iterator of canonical records in file order). The mapping is resolved from the first
    :data:`SAMPLE_RECORDS` records before the iterator is returned, so a missing field stops before any work."""
    stream = raw_records(source, problem)
    head: list[tuple[str, int, object]] = []
    for item in stream:
        head.append(item)
        if len(head) >= SAMPLE_RECORDS:
            break
    sample = [r for _, _, r in head if isinstance(r, dict)]
    if not sample:
        raise MetadataError(f"data.source = {str(source)!r}: no JSON records found (each file must be a list of "
                            "records or an object with 'data' / 'items')")
    mapping = resolve_fields(fields, sample)

    def records() -> Iterator[dict]:
        for file, index, record in _chain(head, stream):
            if (canonical := normalize(file, index, record, mapping, problem)) is not None:
                yield canonical

    return mapping, records()


def _chain(head: list, rest: Iterable) -> Iterator:
    yield from head
    yield from rest


def select_subset(records: Iterable[dict], max_records: int, balance_aspects: bool = False) -> Iterator[dict]:
    """All records (max_records = 0), or the ``max_records`` with the smallest URL hash (see module docstring),
    in key order. A URL listed twice takes one place (its last record, as the download keeps). Bounded memory: one
    heap of ``max_records`` per aspect group."""
    if not max_records:
        yield from records
        return
    heaps: dict[str, list] = {}
    members: dict[str, dict[tuple, dict]] = {}  # per group: (-hash, url) of each heap item -> its record
    for record in records:
        group = record["group"] if balance_aspects else ""
        heap, kept = heaps.setdefault(group, []), members.setdefault(group, {})
        item = (-int(record["key"], 16), record["url"])
        if item in kept:
            kept[item] = record
        elif len(heap) < max_records:
            heapq.heappush(heap, item)
            kept[item] = record
        elif item > heap[0]:
            del kept[heapq.heapreplace(heap, item)]
            kept[item] = record
    ordered = {g: [members[g][it] for it in sorted(h, key=lambda it: (-it[0], it[1]))]
               for g, h in sorted(heaps.items())}
    chosen: list[dict] = []
    for rank in range(max_records):  # round-robin over groups: equal shares where the groups allow
        for group in ordered.values():
            if rank < len(group) and len(chosen) < max_records:
                chosen.append(group[rank])
    yield from sorted(chosen, key=lambda r: (r["key"], r["url"]))
