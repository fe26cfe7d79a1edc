"""Gemini pairwise judge (seed Sec. 11) against a local fake Gemini server, through the real google-genai client."""
from __future__ import annotations

import importlib.util
import io
import json
import logging
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_llm_server import (  # noqa: E402
    Reply,
    Script,
    gemini_error,
    gemini_images,
    gemini_text,
    gemini_texts,
    gemini_verdict,
)
from conftest import params_section  # noqa: E402
from llm_fixtures import GEMINI_KEY as KEY  # noqa: E402
from llm_fixtures import llm_env, seed_text, serve  # noqa: E402,F401

from ultraflux.cli.judge import main as cli_judge  # noqa: E402
from ultraflux.evaluation import judge as J  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("llm_env")


def _png(color: tuple[int, int, int], size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


GOOD = _png((200, 30, 30))
BAD = _png((30, 30, 200))
BAD2 = _png((30, 200, 30))


def prefer_good(request: dict) -> Reply:
    """A consistent judge: prefers the GOOD image wherever it is shown."""
    imgs = gemini_images(request)
    if imgs[0] == GOOD:
        return gemini_verdict("A", 90, 40)
    if imgs[1] == GOOD:
        return gemini_verdict("B", 40, 90)
    return gemini_verdict("tie", 50, 50)


server = serve(gemini=prefer_good)


def cfg(server, **kw):
    return params_section("judge", **{"model": "gemini-2.5-flash", "base_url": server.url, "thinking": True,
                                      "max_retries": 4, "backoff_base_s": 0.001, "backoff_max_s": 0.005,
                                      "timeout_s": 5.0, "concurrency": 1, **kw})


def make_pairs(tmp_path: Path, spec: list[tuple[bytes, bytes]]) -> list[dict]:
    pairs = []
    for i, (a, b) in enumerate(spec):
        pa, pb = tmp_path / "A" / f"{i}.png", tmp_path / "B" / f"{i}.png"
        pa.parent.mkdir(exist_ok=True)
        pb.parent.mkdir(exist_ok=True)
        pa.write_bytes(a)
        pb.write_bytes(b)
        pairs.append({"id": f"p{i}", "image_a": pa, "image_b": pb, "prompt": f"a test prompt {i}"})
    return pairs


def read_verdicts(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------------ prompt text
def test_prompt_is_seed_verbatim():
    seed = seed_text("Prompt 11.1")
    if seed is None:
        pytest.skip("seed supplement not available")
    assert J.JUDGE_PROMPT in seed
    assert J.JUDGE_PROMPT.startswith("You are an impartial image aesthetics judge.")
    assert J.JUDGE_PROMPT.rstrip().endswith("}\n```")


def test_validate_answer():
    ok = J.validate_answer('{"preferred": "B", "a_score": 10, "b_score": 90, "reasons": "x"}')
    assert ok == {"preferred": "B", "a_score": 10, "b_score": 90, "reasons": "x"}
    assert J.validate_answer('```json\n{"preferred": "tie", "a_score": 50, "b_score": 50.0, "reasons": ""}\n```')["preferred"] == "tie"
    assert J.validate_answer('{"preferred": " b ", "a_score": 0, "b_score": 100, "reasons": ""}')["preferred"] == "B"
    assert J.validate_answer(J.JudgeAnswer(preferred="A", a_score=1, b_score=2, reasons="r"))["a_score"] == 1
    for bad in ["", "nope", "[]", '{"preferred": "C", "a_score": 1, "b_score": 2, "reasons": ""}',
                '{"preferred": "A", "a_score": 101, "b_score": 2, "reasons": ""}',
                '{"preferred": "A", "a_score": 1.5, "b_score": 2, "reasons": ""}',
                '{"preferred": "A", "a_score": true, "b_score": 2, "reasons": ""}',
                '{"preferred": "A", "a_score": "5", "b_score": 2, "reasons": ""}',
                '{"preferred": "A", "a_score": 1, "b_score": 2, "reasons": 3}',
                '{"preferred": "A", "a_score": 1, "b_score": 2}',
                '{"preferred": "A", "a_score": 1, "b_score": 2, "reasons": "", "extra": 1}']:
        with pytest.raises(J.InvalidAnswer):
            J.validate_answer(bad)


def test_answer_errors_say_what_is_wrong():
    with pytest.raises(J.InvalidAnswer, match="not valid JSON"):
        J.validate_answer("I prefer A")
    with pytest.raises(J.InvalidAnswer, match=r"a_score: Input should be less than or equal to 100 \(got 180\)"):
        J.validate_answer('{"preferred": "A", "a_score": 180, "b_score": 2, "reasons": ""}')
    with pytest.raises(J.InvalidAnswer, match="empty answer"):
        J.validate_answer("  ")


def test_wilson_ci():
    lo, hi = J.wilson_ci(7, 10)
    assert lo == pytest.approx(0.3968, abs=1e-4) and hi == pytest.approx(0.8922, abs=1e-4)
    assert J.wilson_ci(0, 0) is None
    lo, hi = J.wilson_ci(0, 5)
    assert lo == 0.0 and 0 < hi < 1
    assert J.wilson_ci(5, 5)[1] == 1.0 and all(type(x) is float for x in J.wilson_ci(2, 4))  # JSON-ready floats


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 90)).save(buf, format=fmt)
    return buf.getvalue()


def test_mime_from_pillow_format(server, tmp_path):
    webp, bmp = _encoded("WEBP"), _encoded("BMP")
    pairs = make_pairs(tmp_path, [(webp, bmp)])
    pairs[0]["image_a"] = pairs[0]["image_a"].rename(tmp_path / "A" / "0.bin")  # the name says nothing
    s = J.judge_pairs(pairs, cfg(server), None, tmp_path / "out", progress=False)
    assert s["judged"] == 1
    parts = server.requests[0]["body"]["contents"][0]["parts"]
    mimes = [(p.get("inlineData") or p.get("inline_data")) for p in parts[:2]]
    assert [m.get("mimeType", m.get("mime_type")) for m in mimes] == ["image/webp", "image/png"]
    sent_a, sent_b = gemini_images(server.requests[0])
    assert sent_a == webp  # a format Gemini takes is sent as it is ...
    assert Image.open(io.BytesIO(sent_b)).format == "PNG"  # ... any other is re-encoded losslessly
    assert Image.open(io.BytesIO(sent_b)).tobytes() == Image.open(io.BytesIO(bmp)).tobytes()
    assert read_verdicts(tmp_path / "out")[0]["encoding"] == "png"


def test_unreadable_image_is_recorded(server, tmp_path):
    s = J.judge_pairs(make_pairs(tmp_path, [(b"not an image", GOOD)]), cfg(server), None, tmp_path / "out",
                      progress=False)
    assert s["status"] == "failed" and server.requests == []
    assert "UnidentifiedImageError" in read_verdicts(tmp_path / "out")[0]["error"]


def test_oversized_payload_is_reencoded_jpeg(server, tmp_path):
    s = J.judge_pairs(make_pairs(tmp_path, [(GOOD, BAD)]), cfg(server, inline_limit_mb=1e-5), None, tmp_path / "out",
                      progress=False)
    assert s["judged"] == 1
    imgs = gemini_images(server.requests[0])
    assert all(i[:3] == b"\xff\xd8\xff" for i in imgs)
    inline = server.requests[0]["body"]["contents"][0]["parts"][0]
    inline = inline.get("inlineData") or inline.get("inline_data")
    assert inline.get("mime_type", inline.get("mimeType")) == "image/jpeg"
    assert read_verdicts(tmp_path / "out")[0]["encoding"] == "jpeg95"


# ------------------------------------------------------------------------------------------------ orders and verdicts
def test_both_orders_sent_and_request_shape(server, tmp_path):
    pairs = make_pairs(tmp_path, [(GOOD, BAD)])
    s = J.judge_pairs(pairs, cfg(server), tmp_path / "cache", tmp_path / "out", progress=False)
    assert s["status"] == "ok" and s["pairs"] == 1 and s["wins_a"] == 1 and s["wins_b"] == 0 and s["ties"] == 0
    assert server.count("gemini") == 2
    r1, r2 = server.requests
    assert r1["path"] == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert r1["headers"]["x-goog-api-key"] == KEY  # the key is used on the wire, and only there
    assert gemini_images(r1) == [GOOD, BAD] and gemini_images(r2) == [BAD, GOOD]
    # images first, then Prompt 11.1 verbatim, then the generation-prompt context
    parts = r1["body"]["contents"][0]["parts"]
    assert [("inlineData" in p or "inline_data" in p) for p in parts] == [True, True, False, False]
    assert gemini_texts(r1) == [J.JUDGE_PROMPT, J.GENERATION_PROMPT_CONTEXT.format(prompt="a test prompt 0")]
    gc = r1["body"]["generationConfig"]
    assert gc["responseMimeType"] == "application/json"
    assert set(gc["responseSchema"]["properties"]) == {"preferred", "a_score", "b_score", "reasons"}
    assert gc["responseSchema"]["properties"]["preferred"]["enum"] == ["A", "B", "tie"]
    score_schema = gc["responseSchema"]["properties"]["a_score"]
    assert {"type": "INTEGER", "minimum": 0, "maximum": 100}.items() <= score_schema.items()
    assert gc["responseSchema"]["required"] == ["preferred", "a_score", "b_score", "reasons"]
    assert "additionalProperties" not in gc["responseSchema"]  # not in the Gemini Developer API's schema
    tc = gc["thinkingConfig"]
    assert tc.get("thinkingBudget", tc.get("thinking_budget")) == -1  # thinking on (dynamic budget)
    (v,) = read_verdicts(tmp_path / "out")
    assert v["status"] == "ok" and v["verdict"] == "A" and v["orders_agree"] is True
    assert v["orders"]["AB"]["answer"]["preferred"] == "A" and v["orders"]["BA"]["answer"]["preferred"] == "B"
    assert v["orders"]["AB"]["preferred_image"] == "A" and v["orders"]["BA"]["preferred_image"] == "A"
    assert v["score_a_mean"] == 90 and v["score_b_mean"] == 40
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["wins_a"] == 1


def test_thinking_off_sends_zero_budget(server, tmp_path):
    J.judge_pairs(make_pairs(tmp_path, [(GOOD, BAD)]), cfg(server, thinking=False), None, None, progress=False)
    tc = server.requests[0]["body"]["generationConfig"]["thinkingConfig"]
    assert tc.get("thinkingBudget", tc.get("thinking_budget")) == 0


def test_position_bias_is_a_tie(server, tmp_path):
    server.gemini = lambda req: gemini_verdict("A", 80, 60)  # always prefers whatever is shown first
    s = J.judge_pairs(make_pairs(tmp_path, [(GOOD, BAD), (BAD, GOOD)]), cfg(server), None, tmp_path / "out", progress=False)
    assert (s["wins_a"], s["wins_b"], s["ties"], s["invalid"]) == (0, 0, 2, 0)
    assert server.count("gemini") == 4
    assert all(v["verdict"] == "tie" and v["orders_agree"] is False for v in read_verdicts(tmp_path / "out"))


def test_agreement_counts_and_rates(server, tmp_path):
    pairs = make_pairs(tmp_path, [(GOOD, BAD), (GOOD, BAD2), (BAD, GOOD), (BAD, BAD2)])
    s = J.judge_pairs(pairs, cfg(server, concurrency=3), tmp_path / "cache", tmp_path / "out", progress=False)
    assert (s["wins_a"], s["wins_b"], s["ties"], s["invalid"], s["judged"]) == (2, 1, 1, 0, 4)
    assert s["win_rate_a"] == pytest.approx(0.5) and s["win_rate_a_ci95"] == pytest.approx(J.wilson_ci(2, 4))
    assert s["pref_rate_a"] == pytest.approx(2 / 3)
    assert s["model"] == "gemini-2.5-flash" and s["requests"] == 8
    assert [v["id"] for v in read_verdicts(tmp_path / "out")] == ["p0", "p1", "p2", "p3"]


# ----------------------------------------------------------------------------------------------------------- retries
@pytest.mark.parametrize("first", [gemini_error(429, "quota"), gemini_error(503, "overloaded"), gemini_error(500, "boom")])
def test_transient_error_then_success(server, tmp_path, first):
    server.gemini = Script([first, first], default=prefer_good)
    s = J.judge_pairs(make_pairs(tmp_path, [(GOOD, BAD)]), cfg(server), None, tmp_path / "out", progress=False)
    assert s["status"] == "ok" and s["wins_a"] == 1 and s["invalid"] == 0
    assert server.count("gemini") == 4  # 2 failures + one success per order
    (v,) = read_verdicts(tmp_path / "out")
    assert v["orders"]["AB"]["attempts"] == 3 and v["orders"]["BA"]["attempts"] == 1
    assert [e["status"] for e in v["orders"]["AB"]["errors"]] == [first.status, first.status]


def test_retry_after_header_is_bounded(server, tmp_path):
    server.gemini = Script([gemini_error(429, "slow down", retry_after="3600")], default=prefer_good)
    s = J.judge_pairs(make_pairs(tmp_path, [(GOOD, BAD)]), cfg(server, backoff_max_s=0.01), None, None, progress=False)
    assert s["wins_a"] == 1 and s["seconds"] < 5


def test_timeout_then_success(server, tmp_path):
    server.gemini = Script([Reply(200, {}, delay_s=2.0)], default=prefer_good)
    s = J.judge_pairs(make_pairs(tmp_path, [(GOOD, BAD)]), cfg(server, timeout_s=0.5), None, tmp_path / "out", progress=False)
    assert s["status"] == "ok" and s["wins_a"] == 1
    (v,) = read_verdicts(tmp_path / "out")
    assert v["orders"]["AB"]["attempts"] == 2 and v["orders"]["AB"]["errors"][0]["kind"] == "transport"


@pytest.mark.parametrize("bad", [
    gemini_text("this is not json"),
    gemini_text('{"preferred": "C", "a_score": 1, "b_score": 2, "reasons": "x"}'),
    gemini_text('{"preferred": "A", "a_score": 180, "b_score": 2, "reasons": "x"}'),
    gemini_text('{"preferred": "A"}'),
    Reply(200, {"candidates": [], "promptFeedback": {"blockReason": "OTHER"}}),
])
def test_malformed_then_valid_is_retried(server, tmp_path, bad):
    server.gemini = Script([bad], default=prefer_good)
    s = J.judge_pairs(make_pairs(tmp_path, [(GOOD, BAD)]), cfg(server), None, tmp_path / "out", progress=False)
    assert s["wins_a"] == 1 and s["invalid"] == 0
    assert server.count("gemini") == 3
    (v,) = read_verdicts(tmp_path / "out")
    assert v["orders"]["AB"]["errors"][0]["kind"] == "invalid"


def test_persistently_malformed_is_invalid_not_invented(server, tmp_path):
    server.gemini = lambda req: gemini_text("I think A looks nicer.")
    s = J.judge_pairs(make_pairs(tmp_path, [(GOOD, BAD)]), cfg(server, max_retries=2), tmp_path / "cache",
                      tmp_path / "out", progress=False)
    assert (s["wins_a"], s["wins_b"], s["ties"], s["invalid"], s["judged"]) == (0, 0, 0, 1, 0)
    assert s["win_rate_a"] is None and s["win_rate_a_ci95"] is None and s["invalid_by_status"] == {"invalid": 1}
    assert server.count("gemini") == 6  # (1 + 2 retries) per order
    (v,) = read_verdicts(tmp_path / "out")
    assert v["status"] == "invalid" and v["verdict"] is None and "not valid JSON" in v["error"]
    assert v["orders"]["AB"]["answer"] is None and len(v["orders"]["AB"]["errors"]) == 3
    # failures are not cached: a re-run asks again
    J.judge_pairs(make_pairs(tmp_path, [(GOOD, BAD)]), cfg(server, max_retries=0), tmp_path / "cache", None, progress=False)
    assert server.count("gemini") == 8


def test_fatal_error_aborts_and_is_recorded(server, tmp_path):
    server.gemini = lambda req: gemini_error(403, "permission denied")
    s = J.judge_pairs(make_pairs(tmp_path, [(GOOD, BAD), (BAD, GOOD), (GOOD, BAD2)]), cfg(server), None,
                      tmp_path / "out", progress=False)
    assert s["status"] == "failed" and s["invalid"] == 3 and s["judged"] == 0 and not J.succeeded(s)
    assert s["error"].startswith("no pair could be judged (3 error); fatal API error: ") and "403" in s["error"]
    assert server.count("gemini") == 1  # not retried, and the remaining requests are not sent
    vs = read_verdicts(tmp_path / "out")
    assert all(v["status"] == "error" for v in vs) and "403" in vs[0]["error"]


def test_fatal_error_after_judged_pairs_is_an_error(server, tmp_path):
    replies = iter([prefer_good, prefer_good])  # pair p0 (both orders) is judged, then the key is revoked
    server.gemini = lambda req: next(replies, lambda r: gemini_error(403, "permission denied"))(req)
    s = J.judge_pairs(make_pairs(tmp_path, [(GOOD, BAD), (BAD, GOOD)]), cfg(server), None, None, progress=False)
    assert s["status"].startswith("error (fatal API error: ClientError: 403") and not J.succeeded(s)
    assert (s["judged"], s["wins_a"], s["invalid"]) == (1, 1, 1) and server.count("gemini") == 3


def test_missing_image_is_recorded(server, tmp_path):
    pairs = make_pairs(tmp_path, [(GOOD, BAD)])
    pairs.append({"id": "gone", "image_a": tmp_path / "nope.png", "image_b": tmp_path / "nope2.png", "prompt": "x"})
    s = J.judge_pairs(pairs, cfg(server), None, tmp_path / "out", progress=False)
    assert s["status"] == "ok" and s["wins_a"] == 1 and s["invalid"] == 1
    assert read_verdicts(tmp_path / "out")[1]["error"].startswith("cannot read images")


# ------------------------------------------------------------------------------------------------------------- cache
def test_cache_hit_makes_no_request(server, tmp_path):
    pairs = make_pairs(tmp_path, [(GOOD, BAD), (BAD, GOOD)])
    s1 = J.judge_pairs(pairs, cfg(server), tmp_path / "cache", tmp_path / "out1", progress=False)
    assert server.count("gemini") == 4
    s2 = J.judge_pairs(pairs, cfg(server), tmp_path / "cache", tmp_path / "out2", progress=False)
    assert server.count("gemini") == 4 and s2["requests"] == 0
    for k in ("wins_a", "wins_b", "ties", "invalid"):
        assert s1[k] == s2[k]
    assert all(o["cached"] for v in read_verdicts(tmp_path / "out2") for o in v["orders"].values())
    # a different model (or prompt, or image) is a different cache key
    J.judge_pairs(pairs, cfg(server, model="gemini-2.5-pro"), tmp_path / "cache", None, progress=False)
    assert server.count("gemini") == 8
    assert server.requests[-1]["path"] == "/v1beta/models/gemini-2.5-pro:generateContent"


# ------------------------------------------------------------------------------------------------------ key handling
def test_no_key_is_skipped_without_requests(server, tmp_path, monkeypatch):
    monkeypatch.delenv("GEMINI_API_KEY")
    s = J.judge_pairs(make_pairs(tmp_path, [(GOOD, BAD)]), cfg(server), tmp_path / "cache", tmp_path / "out", progress=False)
    assert s["status"] == "skipped (no GEMINI_API_KEY)" and s["pairs"] == 1 and s["judged"] == 0
    assert s["wins_a"] == 0 and s["win_rate_a"] is None
    assert server.requests == []
    assert (tmp_path / "out" / "verdicts.jsonl").read_text() == ""
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["status"] == s["status"]


def test_google_api_key_is_accepted(server, tmp_path, monkeypatch):
    monkeypatch.delenv("GEMINI_API_KEY")
    monkeypatch.setenv("GOOGLE_API_KEY", KEY)
    s = J.judge_pairs(make_pairs(tmp_path, [(GOOD, BAD)]), cfg(server), None, None, progress=False)
    assert s["status"] == "ok" and server.count("gemini") == 2


def test_key_never_leaks(server, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, including the SDKs' and httpx2's
    echo = f"API key not valid: {KEY}. Please pass a valid API key."  # a hostile server echoing the key
    server.gemini = Script([gemini_error(429, echo), gemini_text(f"bad answer {KEY}"), gemini_error(500, echo)],
                           default=prefer_good)
    pairs = make_pairs(tmp_path, [(GOOD, BAD), (BAD, GOOD)])
    s1 = J.judge_pairs(pairs, cfg(server), tmp_path / "cache", tmp_path / "out", progress=True)
    # CLI path too (prints the summary on stdout), with a fatal error echoing the key
    server.gemini = lambda req: gemini_error(400, echo)
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"image": "0.png", "prompt": "p"}) + "\n")
    params = tmp_path / "params.yaml"
    params.write_text("judge:\n  max_retries: 1\n  backoff_base_s: 0.001\n")
    rc = cli_judge([str(tmp_path / "A"), str(tmp_path / "B"), "--prompts", str(tmp_path / "prompts.jsonl"),
                      "--base-url", server.url, "--out", str(tmp_path / "out_cli"), "--cache", str(tmp_path / "cache2"),
                      "--params", str(params), "--model", "gemini-x"])
    assert rc == 1
    assert all(r["headers"].get("x-goog-api-key") == KEY for r in server.requests)  # it was really used
    captured = capsys.readouterr()
    blobs = {"stdout": captured.out, "stderr": captured.err, "logs": caplog.text, "summary": json.dumps(s1)}
    for f in tmp_path.rglob("*"):
        if f.is_file():
            blobs[str(f)] = f.read_bytes().decode("utf-8", "replace")
    assert "retrying" in caplog.text and "failed" in caplog.text  # logs were captured (and mention the failures)
    leaks = [name for name, text in blobs.items() if KEY in text]
    assert leaks == []
    assert "***" in (tmp_path / "out" / "verdicts.jsonl").read_text()  # the echoed key was redacted


# --------------------------------------------------------------------------------------------------------------- CLI
def test_cli_judge(server, tmp_path, capsys):
    make_pairs(tmp_path, [(GOOD, BAD), (BAD, GOOD), (GOOD, BAD2)])
    lines = [{"image": f"{i}.png", "prompt": f"prompt {i}"} for i in range(3)] + [{"image": "missing.png", "prompt": "m"}]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    params = tmp_path / "params.yaml"
    params.write_text("judge:\n  model: gemini-2.5-flash\n  base_url: ''\n  thinking: true\n  max_retries: 4\n"
                      "  backoff_base_s: 0.001\n")
    rc = cli_judge([str(tmp_path / "A"), str(tmp_path / "B"), "--prompts", str(tmp_path / "prompts.jsonl"),
                      "--base-url", server.url, "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"),
                      "--params", str(params), "--no-progress"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["wins_a"], s["wins_b"], s["ties"], s["invalid"], s["pairs"]) == (2, 1, 0, 1, 4)
    assert s["out"] == str(tmp_path / "out")
    vs = read_verdicts(tmp_path / "out")
    assert [v["id"] for v in vs] == ["0.png", "1.png", "2.png", "missing.png"]
    assert vs[0]["prompt"] == "prompt 0" and vs[3]["status"] == "error"
    assert any(gemini_texts(r)[1].endswith("prompt 0") for r in server.requests)


def test_cli_default_out_and_no_key(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GEMINI_API_KEY")
    make_pairs(tmp_path, [(GOOD, BAD)])
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"image": "0.png", "prompt": "p"}) + "\n")
    rc = cli_judge([str(tmp_path / "A"), str(tmp_path / "B"), "--prompts", str(tmp_path / "prompts.jsonl"),
                      "--cache", str(tmp_path / "cache"), "--params", str(tmp_path / "none.yaml")])
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    assert s["status"] == "skipped (no GEMINI_API_KEY)"
    out = Path(s["out"])
    assert out.parent == tmp_path and out.name.startswith("judge_A_vs_B_") and (out / "summary.json").is_file()


def test_cli_bad_inputs(tmp_path, capsys):
    assert cli_judge([str(tmp_path / "x"), str(tmp_path / "y"), "--prompts", str(tmp_path / "p.jsonl")]) == 2
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    (tmp_path / "p.jsonl").write_text("{not json\n")
    assert cli_judge([str(tmp_path / "A"), str(tmp_path / "B"), "--prompts", str(tmp_path / "p.jsonl")]) == 2


def test_cli_exits_non_zero_when_no_pair_is_judged(server, tmp_path, capsys):
    server.gemini = lambda req: gemini_text("I think A looks nicer.")
    make_pairs(tmp_path, [(GOOD, BAD), (BAD, GOOD)])
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"image": f"{i}.png", "prompt": "p"}) + "\n"
                                                    for i in range(2)))
    params = tmp_path / "params.yaml"
    params.write_text("judge:\n  max_retries: 0\n")
    rc = cli_judge([str(tmp_path / "A"), str(tmp_path / "B"), "--prompts", str(tmp_path / "prompts.jsonl"),
                    "--base-url", server.url, "--out", str(tmp_path / "out"), "--params", str(params), "--no-progress"])
    s = json.loads(capsys.readouterr().out)
    assert rc == 1 and s["status"] == "failed" and s["error"] == "no pair could be judged (2 invalid)"
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["status"] == "failed"


def test_cli_bad_params_file(tmp_path, capsys):
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    (tmp_path / "p.jsonl").write_text("")
    (tmp_path / "params.yaml").write_text("judge: [1, 2\n")
    assert cli_judge([str(tmp_path / "A"), str(tmp_path / "B"), "--prompts", str(tmp_path / "p.jsonl"),
                      "--params", str(tmp_path / "params.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------- stage
class _Logger:
    def __init__(self):
        self.artifacts = []

    def log_artifact(self, path, name):
        self.artifacts.append((Path(path), name))


def _run_stage_main(tmp_path, monkeypatch, judge_cfg):
    """stages/judge.py's main() on two tiny sample folders, in a scratch project folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    samples = tmp_path / "outputs" / "samples"
    for model, img in (("dit_stage2", GOOD), ("dit_stage1", BAD)):
        (samples / model / "1x1").mkdir(parents=True)
        (samples / model / "1x1" / "0.png").write_bytes(img)
    (samples / "prompts.json").write_text(json.dumps(["a red square"]))
    spec = importlib.util.spec_from_file_location("judge_stage", ROOT / "stages" / "judge.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    logger = _Logger()
    return stage, logger, (lambda: stage.main({"judge": judge_cfg}, logger))


def test_stage_metrics_and_outputs(server, tmp_path, monkeypatch):
    stage, logger, run = _run_stage_main(tmp_path, monkeypatch, cfg(server))
    metrics = run()
    out = tmp_path / "outputs" / "judge"
    assert metrics["wins_a"] == 1 and metrics["image_a"] == "dit_stage2" and metrics["status"] == "ok"
    assert "seconds" not in metrics and metrics[stage.TIMING_KEY]["judge_s"] >= 0  # wall clock is a timing
    written = json.loads((out / "summary.json").read_text())  # the library's atomic write, not rewritten
    assert written["wins_a"] == 1 and "seconds" in written
    assert (out / "summary.json").read_text() == json.dumps(written, indent=2, sort_keys=True, ensure_ascii=False) \
        + "\n"
    assert logger.artifacts == [(Path("outputs/judge"), "judge")]


def test_stage_fails_when_no_pair_is_judged(server, tmp_path, monkeypatch):
    server.gemini = lambda req: gemini_error(403, "permission denied")
    _, logger, run = _run_stage_main(tmp_path, monkeypatch, cfg(server))
    with pytest.raises(SystemExit, match=r"\[judge\] failed: no pair could be judged \(1 error\)"):
        run()
    assert logger.artifacts  # the verdicts are still logged for inspection
