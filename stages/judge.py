"""DVC stage `judge`: Gemini pairwise preference (seed Sec. 11), stage-2 vs stage-1 samples; skipped without a key."""
import json
from pathlib import Path

from ultraflux.stage import run_stage

SAMPLES = Path("outputs/samples")
OUT = Path("outputs/judge")


def main(params, logger):
    from ultraflux.evaluation.judge import judge_pairs
    from ultraflux.tracking import repo_root

    prompts = json.loads((SAMPLES / "prompts.json").read_text())
    pairs = [{"id": f"{a.name}/{img.name}", "image_a": str(img), "image_b": str(SAMPLES / "dit_stage1" / a.name / img.name),
              "prompt": prompts[int(img.stem)]}
             for a in sorted(p for p in (SAMPLES / "dit_stage2").iterdir() if p.is_dir())
             for img in sorted(a.glob("*.png"))]
    OUT.mkdir(parents=True, exist_ok=True)
    summary = judge_pairs(pairs, params["judge"], repo_root() / ".cache" / "judge", OUT)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    logger.log_artifact(OUT, "judge")
    return {"image_a": "dit_stage2", "image_b": "dit_stage1", **summary}


if __name__ == "__main__":
    run_stage("judge", main)
