"""gpu_check.py --quick: every check of the GPU script run on this CPU with the demo's tiny model, held to
what each check must find whatever the machine (the figures themselves are the GPU's to give)."""

import json
import math

import torch

import gpu_check

PROMPTS, G = 2, 2  # --quick's prompts and completions per prompt


def test_quick_run_finds_what_each_check_must(tmp_path):
    results = gpu_check.main(["--quick", "--out", str(tmp_path)])

    # 1. Shared and plain log-probs are one number each, up to float32 rounding: a log-softmax over V
    # logits is accurate to a few eps of log V (its size for near-uniform logits); 32 of them is the
    # margin for the two paths summing in a different order. Completion positions one off (planted) moved
    # them by 1.6e-4 on this model, 7x the margin.
    logps = results["logps"]
    tolerance = 32 * torch.finfo(torch.float32).eps * math.log(512)  # the demo's vocabulary: under 512 ids
    assert results["dtype"] == "float32" and results["attention"] == "sdpa"
    assert 0 <= logps["max_abs_difference"] <= tolerance, logps
    assert logps["mean_abs_difference"] <= logps["max_abs_difference"]
    assert 0 < logps["tokens"] <= PROMPTS * G * 8

    # 2. The compiled decode step samples exactly the eager one's tokens at one seed, in one graph.
    decode = results["decode"]
    assert decode["completions"] == PROMPTS * G and decode["identical_completions"] == PROMPTS * G, decode
    assert decode["graphs_compiled"] == 1 and not decode["fell_back_to_eager"]
    assert decode["eager_tokens_per_second"] == PROMPTS * G * 8 / decode["eager_seconds"]

    # 3. The merge undone bit for bit: the log-probs, and the weights (whose drift in the last bits a model
    # this small can round away in every log-prob).
    assert results["lora"]["logps_after_equal_before"] is True
    assert results["lora"]["weights_after_equal_before"] is True

    # 4. One rank: the stage-0 run (train.py's default file), and stages 2 and 3 not run, with the reason.
    train = {row["stage"]: row for row in results["train"]}
    assert sorted(train) == [0, 2, 3]
    assert train[0]["run"] and not train[2]["run"] and not train[3]["run"]
    assert "a world of one runs stage 0" in train[2]["why"] and train[2]["why"] == train[3]["why"]
    row = train[0]
    assert row["exit"] == 0, row.get("error")
    assert row["rollouts_per_second"] == PROMPTS * G / row["time/step_seconds"]
    assert all(f"time/{phase}_seconds" in row for phase in ("generate", "logps", "update"))

    # The table: a row per check and per run, none failed; the JSON holds what was returned.
    table = (tmp_path / "gpu_check.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    assert [row.split(" | ")[0] for row in rows] == [
        "| log-probs, shared vs plain (sdpa)", "| decode, compiled vs eager", "| LoRA (r 16), merged vs unmerged sampling",
        "| train.py, ZeRO stage 0 (no --deepspeed: zero3.json), 1 rank(s)",
        "| train.py, ZeRO stage 2 (--deepspeed zero2.json), 1 rank(s)",
        "| train.py, ZeRO stage 3 (--deepspeed zero3.json), 1 rank(s)"]
    assert "rollouts/s" in rows[3] and "not run on 1 rank" in rows[4] and "not run on 1 rank" in rows[5]
    assert "failed" not in table and "FELL BACK" not in table
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == json.loads(json.dumps(results))
