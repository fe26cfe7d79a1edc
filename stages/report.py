"""DVC stage `report`: one HTML file with this run's tables, sample grids, diagnostics and judge results."""
import sys
from pathlib import Path

from ultraflux.stage import run_stage

OUT = Path("outputs/report/report.html")


def main(params, logger):
    from ultraflux.report import write_report

    write_report(params, Path("metrics"), Path("outputs"), OUT)
    logger.log_artifact(OUT)
    return {"report": str(OUT)}


if __name__ == "__main__":
    sys.exit(run_stage("report", main))
