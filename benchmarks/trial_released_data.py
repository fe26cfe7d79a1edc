"""README's "Reproducing the paper's data" section, walked on a fresh clone with local servers for the internet.

The stand-ins, all on 127.0.0.1:
* the photographs shipped with scikit-image, served as files by a plain ``http.server`` (the image CDN);
* the fault server (tests/fault_server.py) for a 404, an HTML page and a truncated body;
* ``MultiAspect-4K-1M.tar.gz`` in the release's layout (JSON lists of records, one object with ``data``, a
  malformed file, a record without a URL, a ``file:`` URL). Its ``flat_percentage`` and ``shannon_entropy`` are
  computed with the public filtering tool's formulas (benchmarks/parity_filters.py ``tool_values``), as the
  release's were; one record's entropy is falsified (+1 bit) so that the integrity check has a flip to find;
  Q-Align / ArtiMuse scores are made up (one Q-Align below 4.0), the photographers are named "Photographer <n>".

Then README's commands, in a ``git clone`` of this repository (thirteen photos are below the embedded profile's
curation guard, so ``curate.min_train_images`` / ``min_holdout_images`` are lowered, and the loopback servers need
``download.allow_private_addresses``)::

    dvc exp run -S data.source=.../MultiAspect-4K-1M.tar.gz -S data.metadata.max_records=10000 \\
                -S curate.quality.source=released -S curate.aesthetic.source=released ... curate
    python -c "...status.value_counts()"; head problems.jsonl; ultraflux credits --out CREDITS.md

and prints the curation summary (released vs recomputed flatness/entropy, reasons). About 2-3 minutes on 2 cores.

    python benchmarks/trial_released_data.py [--keep DIR]
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fault_server import FaultServer  # noqa: E402
from parity_filters import PHOTOS, tool_values  # noqa: E402

FAULTS = ("/404/a", "/html/a", "/truncated/a")
FALSIFIED = "rocket.jpg"   # H 6.67 < 7.0; its released entropy is raised by one bit: a verdict flip to find
LOW_QUALITY = "astronaut.png"  # released Q-Align 3.2 < 4.0 (textured: the quality rule decides)


def serve_folder(folder: Path) -> ThreadingHTTPServer:
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def records(photos: Path, cdn: str, faults: FaultServer) -> list[dict]:
    out = []
    for i, name in enumerate(PHOTOS):
        flat, entropy = tool_values(photos / name)
        out.append({"image_url": f"{cdn}/{name}", "en_caption": f"A photograph: {Path(name).stem}.",
                    "zh_caption": "一张照片", "tag": "photo",
                    "qalign_score": 3.2 if name == LOW_QUALITY else 4.2 + i / 20,
                    "aesthetics_score": 40.0 + 3 * i, "flat_percentage": flat,
                    "shannon_entropy": entropy + (1.0 if name == FALSIFIED else 0.0),
                    "work_url": f"https://example.org/photo/{i}", "photographer": f"Photographer {i}",
                    "photographer_url": f"https://example.org/@p{i}"})
    for j, path in enumerate(FAULTS):
        out.append({"image_url": faults.url(path), "en_caption": f"fault {path}", "qalign_score": 4.5,
                    "aesthetics_score": 50.0 + j, "flat_percentage": 0.1, "shannon_entropy": 7.5})
    out.append({"image_url": "file:///etc/passwd", "en_caption": "unsafe", "qalign_score": 4.5})
    return out


def write_release(path: Path, recs: list[dict]) -> None:
    """The release's tarball: JSON lists, one ``{"data": [...]}`` object, a record without URL, a malformed file."""
    half = len(recs) // 2
    members = {"MultiAspect-4K-1M/part-0000.json": json.dumps(recs[:half], ensure_ascii=False),
               "MultiAspect-4K-1M/part-0001.json": json.dumps({"data": recs[half:] + [{"en_caption": "no url"}]},
                                                               ensure_ascii=False),
               "MultiAspect-4K-1M/part-0002.json": '[{"image_url": "https://x/1.jpg", '}
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def sh(cmd: list[str] | str, cwd: Path) -> str:
    shown = cmd if isinstance(cmd, str) else " ".join(cmd)
    print(f"\n$ {shown}", flush=True)
    run = subprocess.run(cmd, cwd=cwd, shell=isinstance(cmd, str), capture_output=True, text=True)
    out = (run.stdout + run.stderr).strip()
    print(out[-4000:])
    if run.returncode:
        raise SystemExit(f"exit {run.returncode}: {shown}")
    return run.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="work in this folder (kept afterwards) instead of a temporary one")
    args = parser.parse_args()
    from skimage import data

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ultraflux-trial-"))
    work.mkdir(parents=True, exist_ok=True)
    photos = work / "cdn"
    photos.mkdir(exist_ok=True)
    for name in PHOTOS:
        shutil.copy(Path(data.__file__).parent / name, photos / name)
    cdn = serve_folder(photos)
    try:
        with FaultServer() as faults:
            tarball = work / "MultiAspect-4K-1M.tar.gz"
            write_release(tarball, records(photos, f"http://127.0.0.1:{cdn.server_address[1]}", faults))
            clone = work / "clone"
            if clone.exists():
                shutil.rmtree(clone)
            sh(["git", "clone", "-q", str(ROOT), str(clone)], work)
            sh(["dvc", "exp", "run", "-S", f"data.source={tarball}", "-S", "data.metadata.max_records=10000",
                "-S", "curate.quality.source=released", "-S", "curate.aesthetic.source=released",
                "-S", "download.allow_private_addresses=true", "-S", "curate.min_train_images=1",
                "-S", "curate.min_holdout_images=0", "curate"], clone)
            sh("python -c \"import pandas as pd; print(pd.read_parquet('outputs/download/status.parquet')"
               ".status.value_counts())\"", clone)
            sh("cat outputs/download/problems.jsonl | head", clone)
            sh(["ultraflux", "credits", "--out", "CREDITS.md"], clone)
            print((clone / "CREDITS.md").read_text()[:1500])
    finally:
        cdn.shutdown()
    import pandas as pd

    result = json.loads((clone / "outputs/results/curate.json").read_text())
    print("\ncuration summary (outputs/results/curate.json):")
    for key in sorted(result):
        if key.startswith(("released_", "rejected_", "num_", "kept", "quality_scorer", "aesthetic_scorer")):
            print(f"  {key}: {result[key]}")
    manifest = pd.read_parquet(clone / "outputs/curated/manifest.parquet")
    print("\nreasons:", manifest["reason"].fillna("kept").replace("", "kept").value_counts().to_dict())
    honest = manifest[~manifest["url"].str.endswith("/" + FALSIFIED)]
    print(f"the {len(honest)} records not falsified: max |released - recomputed| entropy "
          f"{(honest['released_entropy'] - honest['entropy']).abs().max():.2e} bits, flatness "
          f"{(honest['released_flatness'] - honest['s_flat_fraction']).abs().max():.2e}")
    print(f"\nwork folder: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
