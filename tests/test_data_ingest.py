"""Source listing: HF metadata.jsonl, sidecar .txt, CSV/Parquet tables, caption problems, missing source."""

import json

import pandas as pd
import pytest
from PIL import Image

from ultraflux.data.ingest import SourceError, decode_caption, list_sources


def _img(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)
    return path


def test_decode_caption():
    assert decode_caption(b"\xef\xbb\xbf  A cat. \n") == ("A cat.", "")
    assert decode_caption(None) == ("", "no_caption")
    assert decode_caption("   ") == ("", "no_caption")
    text, error = decode_caption("caf\xe9".encode("latin-1"))
    assert text == "" and error.startswith("bad_caption: not UTF-8")


def test_hf_metadata_jsonl(tmp_path):
    _img(tmp_path / "a.png")
    _img(tmp_path / "sub" / "b.jpg")
    _img(tmp_path / "unlisted.png")
    lines = [json.dumps({"file_name": "a.png", "text": "first"}), json.dumps({"file_name": "sub/b.jpg", "text": ""}),
             json.dumps({"file_name": "gone.png", "text": "missing file"})]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    items = {item.path.split("/")[-1]: item for item in list_sources(tmp_path)}
    assert items["a.png"].caption == "first" and items["a.png"].caption_error == ""
    assert items["b.jpg"].caption_error == "no_caption"
    assert items["unlisted.png"].caption_error == "no_caption"
    assert items["gone.png"].caption == "missing file"  # listed, missing on disk: rejected later as unreadable


def test_jsonl_with_non_utf8_line(tmp_path):
    _img(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "text": "caf\xe9"}\n')
    (item,) = list_sources(tmp_path)
    assert item.caption_error.startswith("bad_caption: not UTF-8")


def test_sidecar_captions_and_hidden_files(tmp_path):
    _img(tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("a sidecar caption\n")
    _img(tmp_path / ".hidden" / "y.png")
    (tmp_path / "notes.md").write_text("not an image")
    (item,) = list_sources(tmp_path)
    assert item.caption == "a sidecar caption"


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_tables(tmp_path, kind):
    _img(tmp_path / "imgs" / "a.png")
    _img(tmp_path / "imgs" / "b.png")
    frame = pd.DataFrame({"path": ["imgs/a.png", "imgs/b.png"], "caption": ["one", ""]})
    table = tmp_path / f"list.{kind}"
    frame.to_csv(table, index=False) if kind == "csv" else frame.to_parquet(table)
    items = list_sources(table)
    assert [(i.path.split("/")[-1], i.caption, i.caption_error) for i in items] == [
        ("a.png", "one", ""), ("b.png", "", "no_caption")]


def test_table_without_caption_column(tmp_path):
    pd.DataFrame({"file_name": ["a.png"]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(SourceError, match="caption column"):
        list_sources(tmp_path / "t.csv")


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(SourceError, match="data.source"):
        list_sources(tmp_path / "does-not-exist")
    with pytest.raises(SourceError, match="no images"):
        list_sources(tmp_path)
