"""The report says what to expect of the embedded profile and warns when a metric rests on too few images."""
import json

import pandas as pd

from ultraflux.report import write_report


def render(tmp_path, params, results):
    outputs = tmp_path / "outputs"
    (outputs / "results").mkdir(parents=True)
    for stage, res in results.items():
        (outputs / "results" / f"{stage}.json").write_text(json.dumps(res))
    (outputs / "dit_stage1").mkdir()
    pd.DataFrame({"step": [1, 2, 3], "loss": [1.0, 0.8, 0.7]}).to_csv(outputs / "dit_stage1" / "loss.csv", index=False)
    return write_report(params, tmp_path / "metrics", outputs, tmp_path / "report.html",
                        tmp_path / "timings").read_text()


def test_embedded_profile_says_what_to_expect_and_warns_on_few_images(tmp_path, params):
    page = render(tmp_path, params, {
        "evaluate": {"vae": {"psnr": 14.2, "num_images": 1},
                     "generation": {"1x1": {"glcm_score": 0.3, "num_images": 3}}},
        "judge": {"status": "skipped (no GEMINI_API_KEY)", "wins_a": None, "win_rate_a": None}})
    assert "Embedded CPU profile" in page and "coloured noise" in page
    assert "These metrics rest on 1 image: too few to compare runs by" in page
    assert "Each aspect ratio&#x27;s metrics rest on 3 images" in page
    assert "<td>None</td>" not in page and "skipped (no GEMINI_API_KEY)" in page


def test_no_expectation_notice_with_real_weights_and_no_warning_with_enough_images(tmp_path, params):
    params["model"]["pretrained"] = "/models/FLUX.1-dev"
    page = render(tmp_path, params, {"evaluate": {"vae": {"psnr": 30.1, "num_images": 64}}})
    assert "Embedded CPU profile" not in page and "too few to compare" not in page


def test_vae_crops_of_released_photos_carry_the_photographers_credit(tmp_path, params):
    from PIL import Image

    outputs = tmp_path / "outputs"
    (outputs / "evaluate" / "recon").mkdir(parents=True)
    (outputs / "curated").mkdir()
    for image_id in ("a1", "b2"):
        Image.new("RGB", (64, 32), "gray").save(outputs / "evaluate" / "recon" / f"{image_id}.png")
    pd.DataFrame({"id": ["a1", "b2"], "eval": [True, True], "photographer": ["Ann Lee", ""],
                  "work_url": ["https://www.pexels.com/photo/1/", ""]}).to_parquet(outputs / "curated" /
                                                                                 "manifest.parquet")
    page = render(tmp_path, params, {"evaluate": {"vae": {"psnr": 20.0, "num_images": 2}}})
    assert "a1: input | reconstruction<br>Photo: Ann Lee (https://www.pexels.com/photo/1/)" in page
    assert "b2: input | reconstruction<" in page and "Photo: unknown" not in page
