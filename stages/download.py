"""DVC stage `download`: the released metadata's image URLs -> outputs/download (original bytes in WebDataset
shards, one status row per URL). Nothing to do when data.source is not the released metadata."""
import sys
from pathlib import Path

from ultraflux.stage import run_stage

OUT = Path("outputs/download")


def main(params, logger):
    from ultraflux.data.download import run_download
    from ultraflux.data.metadata import MetadataError

    try:
        summary = run_download(params, OUT)
    except MetadataError as err:  # a required field found nowhere: named, before any request
        print(f"[download] {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if (OUT / "status.parquet").is_file():
        logger.log_artifact(OUT / "status.parquet")
    if (OUT / "problems.jsonl").is_file():
        logger.log_artifact(OUT / "problems.jsonl")
    return summary


if __name__ == "__main__":
    sys.exit(run_stage("download", main))
