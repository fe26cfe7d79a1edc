"""DVC stage `judge`: Gemini pairwise preference (seed Sec. 11), stage-2 vs stage-1 samples; skipped without a key."""
import json
import sys
from pathlib import Path

from ultraflux.stage import TIMING_KEY, run_stage

SAMPLES = Path("outputs/samples")
OUT = Path("outputs/judge")


def main(params, logger):
    from ultraflux.evaluation.judge import judge_pairs, succeeded
    from ultraflux.tracking import repo_root

    prompts = json.loads((SAMPLES / "prompts.json").read_text())
    pairs = [{"id": f"{a.name}/{img.name}", "image_a": str(img), "image_b": str(SAMPLES / "dit_stage1" / a.name / img.name),
              "prompt": prompts[int(img.stem)]}
             for a in sorted(p for p in (SAMPLES / "dit_stage2").iterdir() if p.is_dir())
             for img in sorted(a.glob("*.png"))]
    summary = judge_pairs(pairs, params["judge"], repo_root() / ".cache" / "judge", OUT)  # writes OUT atomically
    logger.log_artifact(OUT, "judge")
    if not succeeded(summary):  # fail the stage, so that neither DVC nor its run cache keeps a failed judgement
        raise SystemExit(f"[judge] {summary['status']}: {summary.get('error')} (see {OUT / 'verdicts.jsonl'})")
    seconds = summary.pop("seconds", None)  # wall clock: a timing, not a metric (same params -> same metrics)
    return {"image_a": "dit_stage2", "image_b": "dit_stage1", **summary,
            TIMING_KEY: {} if seconds is None else {"judge_s": seconds}}


if __name__ == "__main__":
    sys.exit(run_stage("judge", main))
