"""DVC stage `curate`: ingest, filter (seed Sec. 2.1), bucket, write outputs/curated/manifest.parquet + images."""
from pathlib import Path

from ultraflux.stage import run_stage

OUT = Path("outputs/curated")


def main(params, logger):
    from ultraflux.data.curate import run_curation

    from ultraflux.io import sha256_file

    metrics = run_curation(params, OUT)
    metrics["manifest_sha256"] = sha256_file(OUT / "manifest.parquet")
    logger.log_artifact(OUT / "plots", "plots")
    logger.log_artifact(OUT / "manifest.parquet")
    return metrics


if __name__ == "__main__":
    run_stage("curate", main)
