"""DVC stage `curate`: ingest, filter (seed Sec. 2.1), bucket, write outputs/curated (manifest + WebDataset shards)."""
import sys
from pathlib import Path

from ultraflux.stage import run_stage

OUT = Path("outputs/curated")


def main(params, logger):
    from ultraflux.data.curate import TooFewImages, run_curation
    from ultraflux.io import sha256_file

    try:
        metrics = run_curation(params, OUT)
    except TooFewImages as err:  # exit non-zero so that no later stage trains on (almost) nothing
        print(f"[curate] {err}", file=sys.stderr)
        raise SystemExit(3) from None
    metrics["manifest_sha256"] = sha256_file(OUT / "manifest.parquet")
    logger.log_artifact(OUT / "plots", "plots")
    logger.log_artifact(OUT / "manifest.parquet")
    return metrics


if __name__ == "__main__":
    sys.exit(run_stage("curate", main))
