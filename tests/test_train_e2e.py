"""End to end: `deepspeed --num_gpus 2 train.py` with ZeRO-3 and ZeRO-2 on the tiny Qwen2-VL, and plain
`python train.py` as one process (gloo ranks on DeepSpeed's CPU accelerator)."""

import glob
import json
import os
import sys

import pytest
from conftest import FAMILY_NAMES, read_metrics, read_wandb_run, run_command, wandb_offline_env

COMMON = ["--num_generations", "4", "--per_device_train_batch_size", "2", "--max_completion_length", "16",
          "--learning_rate", "1e-4", "--logging_steps", "1", "--log_completions_steps", "1", "--max_pixels", "6272"]


def _scalars(output_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = glob.glob(os.path.join(output_dir, "runs", "*", "events.out.tfevents.*"))
    accumulator = EventAccumulator(events)
    accumulator.Reload()
    return accumulator


@pytest.mark.parametrize("ds_config, stage", [("zero3.json", 3), ("zero2.json", 2)])
def test_deepspeed_two_ranks(format_warmed_model, colour_dataset, tmp_path, ds_config, stage):
    out = str(tmp_path / "run")
    log = run_command(["deepspeed", "--num_gpus", "2", "train.py", "--deepspeed", ds_config, "--output_dir", out,
                "--model_name_or_path", format_warmed_model, "--dataset_name", colour_dataset, "--max_steps", "3",
                "--beta", "0.04", "--save_steps", "2", "--save_total_limit", "1", "--gradient_accumulation_steps", "2",
                "--gradient_checkpointing", "true", "--report_to", "tensorboard", "wandb", *COMMON], tmp_path,
                env=wandb_offline_env(tmp_path))
    # The shared-prompt path (the default) under ZeRO-3 or ZeRO-2 on two ranks, with gradient checkpointing.
    assert f"ZeRO stage {stage}" in log and "2 rank(s)" in log and "prompts shared by their group" in log
    assert "sampled in 1 generate call(s) per rank; 2 micro-batch(es) of 2 prompts each" in log
    # The tiny checkpoint lists Qwen2-VL's two end ids (and its sampling defaults, which are not used).
    assert "a completion ends at the first of ['<|im_end|>', '<|endoftext|>']" in log
    assert "never the checkpoint's sampling defaults" in log

    scalars = _scalars(out)
    tags = set(scalars.Tags()["scalars"])
    for tag in ("reward/mean", "reward/std", "reward/accuracy", "reward/format", "advantage/std",
                "advantage/equal_reward_group_fraction", "completion/length_mean", "completion/length_min",
                "completion/length_max", "completion/truncated_fraction", "loss/loss", "loss/kl",
                "loss/clip_ratio", "loss/entropy", "optim/grad_norm", "optim/learning_rate",
                "time/generate_seconds", "time/score_seconds", "time/logps_seconds", "time/update_seconds",
                "memory/update_peak_gb"):
        assert tag in tags, f"{tag} missing from TensorBoard: {sorted(tags)}"
    assert [e.step for e in scalars.Scalars("reward/mean")] == [1, 2, 3]
    assert "completions/text_summary" in scalars.Tags()["tensors"]  # sample completions as text

    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert 0.0 <= m["reward/accuracy"] <= 1.0 and 0.0 <= m["reward/format"] <= 1.0
        assert m["completion/length_min"] <= m["completion/length_mean"] <= m["completion/length_max"] <= 16
        assert m["loss/kl"] >= 0.0  # k3 is never negative
    assert any(m["reward/format"] > 0 for m in metrics)  # the warmed-up model writes the format
    assert any(m["optim/grad_norm"] > 0.0 for m in metrics)  # a policy gradient reached the weights
    assert metrics[0]["loss/kl"] < 1e-6 < metrics[-1]["loss/kl"]  # the policy leaves the reference after updating

    # completions.jsonl: every completion of both ranks at every step (log_completions_steps 1):
    # 2 ranks x (2 prompts x 2 accumulation steps) x G=4, each with its rewards, its advantage, and
    # its group's signal.
    with open(os.path.join(out, "completions.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert [(m["step"], m["rank"]) for m in lines] == [(s, r) for s in (1, 2, 3) for r in (0, 1) for _ in range(16)]
    for m in lines:
        assert m["reward"] == pytest.approx(m["rewards"]["accuracy"] + m["rewards"]["format"])
        assert 0 <= m["row"] < 8 and m["images"] == 1 and m["videos"] == 0
    for start in range(0, len(lines), 4):  # a group: one prompt's 4 completions
        group = lines[start:start + 4]
        assert len({(m["step"], m["rank"], m["prompt"], m["row"]) for m in group}) == 1
        rewards = [m["reward"] for m in group]
        assert all(m["group_has_signal"] == (max(rewards) > min(rewards)) for m in group)
        assert sum(m["advantage"] for m in group) == pytest.approx(0.0, abs=1e-5)  # group-normalised
    assert sorted(os.listdir(os.path.join(out, "plots"))) == ["completion.png", "loss.png", "rewards.png"]

    # wandb (offline, rank 0 alone): the run's name, every flag as its config, TensorBoard's scalars
    # under the same names and steps with metrics.jsonl's values, each step's completions of both
    # ranks as a table with the prompts' pictures, and the plots once at the end.
    run = read_wandb_run(out)
    assert run["name"] == "run"
    from grpo.config import GRPOArguments

    assert {field for field in GRPOArguments.__dataclass_fields__} <= set(run["config"])
    assert run["config"]["learning_rate"] == 1e-4 and run["config"]["report_to"] == ["tensorboard", "wandb"]
    logged = [entry for entry in run["history"] if "reward/mean" in entry]
    assert [entry["_step"] for entry in logged] == [1, 2, 3]
    # (wandb keeps one history row per step: the step's table and the last step's plots are in it too)
    assert {key for entry in logged for key in entry if not key.startswith(("_", "completions/", "plots/"))} == tags
    for entry, m in zip(logged, metrics):
        assert entry["reward/mean"] == pytest.approx(m["reward/mean"]) and entry["loss/kl"] == pytest.approx(m["loss/kl"])
    assert [entry["_step"] for entry in run["history"] if "completions/_type" in entry] == [1, 2, 3]
    assert {key for entry in run["history"] for key in entry if key.startswith("plots/") and key.endswith("/_type")} == {
        "plots/completion/_type", "plots/loss/_type", "plots/rewards/_type"}
    assert len(run["tables"]) == 3
    for step, table in zip((1, 2, 3), run["tables"]):
        columns = table["columns"]
        assert columns == ["step", "rank", "row", "image", "problem", "completion", "solution", "accuracy", "format",
                           "reward", "advantage"]
        rows = [dict(zip(columns, row)) for row in table["data"]]
        expected = [m for m in lines if m["step"] == step]
        assert [(r["rank"], r["row"], r["completion"], r["accuracy"], r["format"]) for r in rows] == [
            (m["rank"], m["row"], m["completion"], m["rewards"]["accuracy"], m["rewards"]["format"]) for m in expected]
        assert [r["advantage"] for r in rows] == pytest.approx([m["advantage"] for m in expected])
        pictures = {r["image"]["path"] for r in rows}
        assert pictures <= set(table["images"]) and all(os.path.getsize(table["images"][p]) > 0 for p in pictures)
    # The checkpoint names the wandb run, for a resume to continue it.
    with open(os.path.join(out, "checkpoint-2", "trainer_state.json")) as f:
        assert json.load(f)["wandb_run_id"] == run["id"]

    # save_steps 2 wrote checkpoint-2; the final model is in output_dir; both load.
    from transformers import AutoModelForImageTextToText, AutoProcessor

    assert os.path.isdir(os.path.join(out, "checkpoint-2"))
    for folder in (os.path.join(out, "checkpoint-2"), out):
        assert glob.glob(os.path.join(folder, "*.safetensors"))
        model = AutoModelForImageTextToText.from_pretrained(folder)
        AutoProcessor.from_pretrained(folder)
    # Saved in the layout a plain save writes (the starting model's file), not ZeRO-3 loading's ([ZeRO-3 key names]).
    assert _saved_keys(out) == _saved_keys(os.path.join(out, "checkpoint-2")) == _saved_keys(format_warmed_model)
    # The final weights moved away from the initial ones.
    start = AutoModelForImageTextToText.from_pretrained(format_warmed_model)
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(), start.parameters()))
    assert moved > 0.0


def test_ranks_given_one_prompt_sample_differently_and_end_clean(tiny_model, tmp_path_factory, tmp_path):
    """[one seed for all ranks] Two rows holding the same prompt and picture, one per rank: at step 1
    both ranks sample from the same weights and the same prompt, and train.py seeds them from one
    --seed; their completions must differ (rank r draws from seed + r). And the run ends clean on every
    rank: its process group destroyed ([exit abort]), its shared-memory buffer unlinked ([leaked
    shared memory]: the autouse fixture fails the test on a leftover)."""
    from conftest import colour_rows, save_rows

    import datasets

    row = colour_rows(1)[0]
    twins = save_rows(tmp_path_factory, "twins", [row, dict(row)], {"image": datasets.Image()})
    out = tmp_path / "run"
    env = {"GRPO_TEST_FAULTS": json.dumps({"report_exit": str(tmp_path / "exit")})}
    run_command(["deepspeed", "--num_gpus", "2", "tests/fault_worker.py", "--deepspeed", "zero3.json",
                 "--output_dir", str(out), "--model_name_or_path", tiny_model, "--dataset_name", twins,
                 "--max_steps", "1", "--num_generations", "4", "--per_device_train_batch_size", "1",
                 "--max_completion_length", "8", "--beta", "0", "--save_steps", "0", "--report_to", "none",
                 "--log_completions_steps", "1", "--max_pixels", "3136"], tmp_path, env=env)
    with open(out / "completions.jsonl") as f:
        lines = [json.loads(line) for line in f]
    by_rank = {rank: [m["completion"] for m in lines if m["rank"] == rank] for rank in (0, 1)}
    assert len(by_rank[0]) == len(by_rank[1]) == 4
    assert {m["problem"] for m in lines} == {row["problem"]}  # one prompt on both ranks
    assert by_rank[0] != by_rank[1], by_rank  # 4 completions of up to 8 tokens from a random model: equal only if seeded alike
    for rank in (0, 1):
        with open(tmp_path / f"exit.{rank}") as f:
            assert json.load(f) == {"status": 0, "process_group_alive": False}


@pytest.mark.parametrize("loss_type", ["dapo"])
def test_plain_python_one_process(tiny_model, colour_dataset, tmp_path, loss_type):
    """No launcher: a world of one; num_iterations 2 reuses the rollout with stored old log-probs."""
    out = str(tmp_path / "run")
    log = run_command([sys.executable, "train.py", "--output_dir", out, "--model_name_or_path", tiny_model,
                "--dataset_name", colour_dataset, "--max_steps", "2", "--beta", "0", "--num_iterations", "2",
                "--loss_type", loss_type, "--epsilon_high", "0.28", "--report_to", "none", "--save_steps", "2",
                "--share_prompt", "false",
                *COMMON], tmp_path)
    assert "1 rank(s)" in log and "2 update(s) per rollout" in log and "prompts repeated G times" in log
    assert "ZeRO stage 0 (one process: nothing to partition" in log
    # --save_steps 2 with --max_steps 2: the last step is saved as a checkpoint too (as HF's Trainer
    # does), with the run's arguments beside the weights.
    with open(os.path.join(out, "checkpoint-2", "training_args.json")) as f:
        assert json.load(f)["loss_type"] == loss_type
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["loss/kl"] == 0.0 for m in metrics)  # beta 0: no reference, no KL
    assert not glob.glob(os.path.join(out, "runs"))  # --report_to none: no TensorBoard
    assert glob.glob(os.path.join(out, "*.safetensors"))


@pytest.mark.parametrize("launcher", ["plain_python", "deepspeed_zero3"])
def test_compiled_decode_in_train_py_samples_what_eager_samples(launcher, tiny_model, colour_dataset, tmp_path):
    """--compile_decode true in the real loop, the policy inside DeepSpeed's engine, whose hooks on the
    model's forward cannot be compiled (the engine's timer changes at every step and from the third
    synchronises; ZeRO-3 resets its coordinator at every forward: [auto-compile]): three steps sample
    exactly the completions of the same run decoded eagerly, on one process and on two ZeRO-3 ranks,
    compiled once (the prompts' lengths stay in one cache bucket: no recompile), nothing falling back."""
    command = {"plain_python": [sys.executable, "train.py"],
               "deepspeed_zero3": ["deepspeed", "--num_gpus", "2", "train.py", "--deepspeed", "zero3.json"]}[launcher]
    completions, logs = {}, {}
    for compiled in ("false", "true"):
        out = str(tmp_path / f"compile-{compiled}")
        logs[compiled] = run_command([*command, "--output_dir", out, "--model_name_or_path", tiny_model,
                                      "--dataset_name", colour_dataset, "--max_steps", "3", "--beta", "0.04",
                                      "--report_to", "none", "--save_steps", "0", "--compile_decode", compiled, *COMMON],
                                     tmp_path, env={"TORCH_LOGS": "recompiles"})
        with open(os.path.join(out, "completions.jsonl")) as f:
            completions[compiled] = [(m["step"], m["rank"], m["prompt"], m["completion"]) for m in map(json.loads, f)]
    ranks = 2 if launcher == "deepspeed_zero3" else 1
    assert [step for step, *_ in completions["true"]] == [s for s in (1, 2, 3) for _ in range(8 * ranks)]
    assert completions["true"] == completions["false"]
    assert "[compile_decode]" not in logs["true"] and "Recompiling" not in logs["true"]


def test_real_vocabulary_one_process(tiny_qwen2_5_vl_real_vocab, colour_dataset, tmp_path):
    """train.py on the tiny Qwen2.5-VL with Qwen's real vocabulary (151,936 logits a position, the published
    end ids and sampling defaults), shared prompts and a reference model, as one process: before the first
    update the reference's log-probs equal the policy's over the whole vocabulary (KL 0), after it they
    differ (a reward that differs between the untrained model's completions gives it a policy gradient),
    and the saved model keeps its 151,936 rows."""
    from transformers import AutoConfig

    out = str(tmp_path / "run")
    log = run_command([sys.executable, "train.py", "--output_dir", out, "--model_name_or_path", tiny_qwen2_5_vl_real_vocab,
                       "--dataset_name", colour_dataset, "--max_steps", "2", "--beta", "0.04", "--report_to", "none",
                       "--save_steps", "0", "--reward_funcs", "format", "tests.faulty_rewards:characters", *COMMON,
                       "--learning_rate", "2e-3"], tmp_path)
    assert "a completion ends at the first of ['<|im_end|>', '<|endoftext|>'] (ids [151645, 151643]" in log
    assert "never the checkpoint's sampling defaults" in log and "prompts shared by their group" in log
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[0]["loss/kl"] < 1e-6 < metrics[1]["loss/kl"]
    assert AutoConfig.from_pretrained(out).get_text_config().vocab_size == 151_936


def test_prompts_prepared_ahead_change_no_rollout(format_warmed_model, mixed_dataset, tmp_path):
    """Each step's prompts read and processed on 2 background threads while the step before trains
    (--dataloader_num_workers 2), or by the step itself (0): the same completions and rewards at every step at
    the same seed (the threads keep the steps' order and draw no random numbers). Rows of 1, 2 and 0 pictures."""
    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"workers-{workers}"
        run_command([sys.executable, "train.py", "--output_dir", str(out), "--model_name_or_path", format_warmed_model,
                     "--dataset_name", mixed_dataset, "--max_steps", "4", "--report_to", "none", "--save_steps", "0",
                     "--dataloader_num_workers", str(workers), *COMMON], tmp_path)
        runs[workers] = ((out / "completions.jsonl").read_text(), [m["reward/mean"] for m in read_metrics(out)])
    assert runs[0] == runs[2]
    assert runs[0][0].count("\n") == 4 * 2 * 4  # steps x prompts x G


# --- every model family through train.py ---------------------------------------------------------

FAMILY_STEP = ["--num_generations", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
               "--max_completion_length", "6", "--beta", "0.04", "--learning_rate", "1e-4", "--logging_steps", "1",
               "--report_to", "none", "--save_steps", "0", "--max_pixels", "12544"]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_one_grpo_step_per_family(family, family_models, mixed_dataset, tmp_path):
    """One optimizer step (two micro-batches, a reference model) of each family on rows with one
    image, two images and none, loaded through --model_name_or_path like a real checkpoint."""
    out = str(tmp_path / "run")
    log = run_command([sys.executable, "train.py", "--output_dir", out, "--model_name_or_path", family_models(family),
                       "--dataset_name", mixed_dataset, "--max_steps", "1", *FAMILY_STEP], tmp_path)
    assert "of them text-only" in log
    (metrics,) = read_metrics(out)
    assert metrics["step"] == 1 and metrics["completion/length_mean"] > 0


@pytest.mark.parametrize("family", ["aria", "llava_onevision"])
def test_text_only_micro_batch_beside_images_under_zero3(family, family_models, image_and_text_only_dataset, tmp_path):
    """Two ranks, ZeRO-3, one prompt each: every step one rank's micro-batch is text-only while the
    other's has an image. Without the blank-image pass the text-only rank skips the vision tower's
    weight gathering and the ranks wait on each other forever ([text-only rank]); here they finish, and the
    frozen-vision-tower flag trains the rest."""
    out = str(tmp_path / "run")
    extra = ["--freeze_vision_tower", "true"] if family == "llava_onevision" else []
    log = run_command(["deepspeed", "--num_gpus", "2", "train.py", "--deepspeed", "zero3.json", "--output_dir", out,
                       "--model_name_or_path", family_models(family), "--dataset_name", image_and_text_only_dataset,
                       "--max_steps", "2", "--num_generations", "2", "--per_device_train_batch_size", "1",
                       "--max_completion_length", "6", "--beta", "0.04", "--learning_rate", "1e-4",
                       "--logging_steps", "1", "--report_to", "none", "--save_steps", "0", "--gradient_checkpointing",
                       "true", *extra], tmp_path, timeout=240)
    assert "ZeRO stage 3" in log and "2 rank(s)" in log and "1 of them text-only" in log
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    assert _saved_keys(out) == _saved_keys(family_models(family))  # the family's own layout


def _saved_keys(folder: str) -> list[str]:
    """The tensor names in a model folder's safetensors files, as another reader (vLLM) sees them."""
    from safetensors import safe_open

    keys = []
    for path in glob.glob(os.path.join(folder, "*.safetensors")):
        with safe_open(path, "pt") as f:
            keys += f.keys()
    return sorted(keys)


def test_video_rows_train(family_models, video_dataset, tmp_path):
    """Rows holding a video (its frames), an image or neither, in one run of a Qwen family."""
    out = str(tmp_path / "run")
    log = run_command([sys.executable, "train.py", "--output_dir", out, "--model_name_or_path", family_models("qwen2_vl"),
                       "--dataset_name", video_dataset, "--max_steps", "1", *FAMILY_STEP, "--max_pixels", "3136"],
                      tmp_path)
    assert "6 prompts" in log and "2 of them text-only" in log
    assert [m["step"] for m in read_metrics(out)] == [1]


def _torchrun_two_nodes(args: list[str], cwds: list[str], tmp_path, timeout: int = 900) -> list[tuple[int, str]]:
    """train.py as two single-process nodes of one torchrun job on this machine (`torchrun --nnodes 2
    --node_rank 0|1 --nproc_per_node 1`), node i started in cwds[i]; (exit status, output) per node."""
    import signal
    import socket
    import subprocess

    from conftest import REPO

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=REPO)
    nodes = [subprocess.Popen(["torchrun", "--nnodes", "2", "--node_rank", str(i), "--nproc_per_node", "1",
                               "--master_addr", "127.0.0.1", "--master_port", str(port),
                               os.path.join(REPO, "train.py"), *args],
                              cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for i, cwd in enumerate(cwds)]
    results = []
    for node in nodes:
        try:
            output, _ = node.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in nodes:
                os.killpg(other.pid, signal.SIGKILL)
            pytest.fail("torchrun nodes still running after the timeout (killed)")
        results.append((node.returncode, output))
    (tmp_path / "log.txt").write_text("\n\n".join(output for _, output in results))
    return results


def test_torchrun_two_nodes(tiny_model, colour_dataset, tmp_path):
    """open-r1-multimodal launched with torchrun: two nodes of one process each (here both on this
    machine, the rendezvous on localhost) train under zero3.json's ZeRO-3, as the deepspeed launcher does."""
    out = str(tmp_path / "run")
    results = _torchrun_two_nodes(["--model_name_or_path", tiny_model, "--dataset_name", colour_dataset,
                                   "--output_dir", out, "--max_steps", "2", "--beta", "0", "--save_steps", "0",
                                   *COMMON], [str(tmp_path)] * 2, tmp_path)
    assert [status for status, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert "2 rank(s)" in results[0][1] and "ZeRO stage 3" in results[0][1]
    assert [m["step"] for m in read_metrics(out)] == [1, 2]


def test_an_output_dir_the_nodes_do_not_share_stops_the_run(tiny_model, colour_dataset, tmp_path):
    """Two nodes whose --output_dir are different folders (the same relative path from different
    working folders, as a node-local disk would be) stop before loading anything, with one line that
    says so, instead of resuming different checkpoints or waiting on each other forever."""
    cwds = [tmp_path / "node0", tmp_path / "node1"]
    for cwd in cwds:
        cwd.mkdir()
    results = _torchrun_two_nodes(["--model_name_or_path", tiny_model, "--dataset_name", colour_dataset,
                                   "--output_dir", "out", "--max_steps", "2", *COMMON],
                                  [str(cwd) for cwd in cwds], tmp_path, timeout=300)
    assert all(status != 0 for status, _ in results)
    errors = [line for line in results[0][1].splitlines() if "train.py: error:" in line]
    assert len(errors) == 1 and "--output_dir: 'out' is not one folder for every rank: rank(s) [1]" in errors[0], \
        results[0][1][-3000:]
    assert "train.py: error:" not in results[1][1]  # said once, by rank 0
    assert not (cwds[0] / "out" / "metrics.jsonl").exists() and not (cwds[1] / "out" / "metrics.jsonl").exists()
