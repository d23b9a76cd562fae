"""Fault injection: SIGKILL mid-run, a full disk, an unwritable or too small output folder, a torn line.

Each killed run is continued (`--resume` for training, a plain rerun for the resumable stages) and compared
with a run that was never interrupted: nothing lost, nothing written twice. The kill points are
deterministic: a checkpoint folder appearing, or a loopback server that holds the judge's answers after the
first ones until the process is dead. Other kill tests live next to their stage: tests/test_resume.py (sft),
tests/test_generate.py::test_sigkill_mid_run_then_resume (generate).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rounding import PATHS, tolerance
from zephyr import io
from zephyr.cli import main
from zephyr.core.errors import ZephyrError
from zephyr.training.tracking import read_metrics

ROOT = Path(__file__).parents[1]
TINY_CHAT = ROOT / "recipes" / "data" / "tiny_chat.jsonl"
TINY_PAIRS = ROOT / "recipes" / "data" / "tiny_pairs.jsonl"


def env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def start(*argv: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "zephyr", *argv],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def kill_when(proc: subprocess.Popen, ready) -> None:
    """SIGKILL `proc` as soon as `ready()` holds; fail if it ends first (nothing would be tested)."""
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(
                f"the run ended before the kill point: {proc.stderr.read().decode()[-2000:]}"
            )
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


def assert_same_run(straight: Path, resumed: Path) -> None:
    """The resumed run logs every step once, with the losses of the uninterrupted one, and ends with its weights:
    up to the rounding of that many steps in two processes (tests/rounding.py). A resume that lost the
    optimizer state, the data order or the schedule moves the weights by about the learning rate, 1e-3 here."""
    lines = [[m for m in read_metrics(run / "metrics.jsonl") if "loss" in m] for run in (straight, resumed)]
    assert [m["step"] for m in lines[1]] == [m["step"] for m in lines[0]]
    rounds = PATHS * len(lines[0])
    losses = [m["loss"] for m in lines[0]]
    assert [m["loss"] for m in lines[1]] == pytest.approx(losses, abs=tolerance(losses, roundings=rounds))
    expected = load_file(straight / "final" / "model.safetensors")
    got = load_file(resumed / "final" / "model.safetensors")
    assert expected.keys() == got.keys()
    allowed = tolerance(list(expected.values()), roundings=rounds)  # the model's largest weight
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=allowed, rtol=0, msg=key)


# ---------------------------------------------------------------------------------------------------------
# dpo: SIGKILL after a checkpoint, debris of a crash while saving, --resume


def dpo_recipe(path: Path, model_dir: Path) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "dpo": {
                    "model": str(model_dir),
                    "train_data": str(TINY_PAIRS),
                    "max_samples": 16,
                    "max_length": 128,
                    "max_prompt_length": 64,
                    "per_device_batch_size": 2,
                    "num_epochs": 1,
                    "learning_rate": 1e-3,
                    "warmup_ratio": 0.25,
                    "precision": "fp32",
                    "save_steps": 2,
                    "save_total_limit": 2,
                    "seed": 11,
                }
            }
        )
    )
    return path


@pytest.mark.slow
def test_dpo_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_model_dir, one_thread):
    recipe = dpo_recipe(tmp_path / "dpo.yaml", tiny_model_dir)
    straight = tmp_path / "straight"
    assert main(["dpo", str(recipe), f"dpo.output_dir={straight}"]) == 0

    killed = tmp_path / "killed"
    proc = start("dpo", str(recipe), f"dpo.output_dir={killed}")
    kill_when(proc, lambda: (killed / "checkpoint-2" / "trainer_state.json").exists())
    assert not (killed / "final").exists()
    # What a crash inside a save and inside a metrics line leaves: a temp folder, a checkpoint folder
    # without its state file, a torn last line.
    (killed / ".tmp-checkpoint-4").mkdir(exist_ok=True)
    (killed / ".tmp-checkpoint-4" / "model.safetensors").write_bytes(b"\x00" * 100)
    (killed / "checkpoint-6").mkdir()
    (killed / "checkpoint-6" / "config.json").write_text("{")
    with (killed / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 0.69')

    assert main(["dpo", str(recipe), f"dpo.output_dir={killed}", "--resume"]) == 0
    assert_same_run(straight, killed)
    assert not (killed / ".tmp-checkpoint-4").exists()


# ---------------------------------------------------------------------------------------------------------
# feedback: SIGKILL between chunks (the judge is held), a torn line, rerun


class GatedFeedbackServer:
    """The loopback OpenAI server of tests/test_feedback_runner.py with an honest judge that answers its
    first `open_calls` calls and holds the rest until `gate` is set; `judged` lists the prompt numbers."""

    def __init__(self, open_calls: int | None):
        from test_feedback_runner import FeedbackServer
        from test_judge import formatted_answer, quality

        gate = threading.Event()
        judged: list[int] = []

        class Gated(FeedbackServer):
            def judge_answer(self, messages) -> str:
                with self.lock:
                    index = self.judge_calls
                    self.judge_calls += 1
                    judged.append(int(re.search(r"question (\d+)\?", messages[-1]["content"]).group(1)))
                if open_calls is not None and index >= open_calls:
                    gate.wait(60)
                return formatted_answer(messages, lambda text, aspect: quality(text))

        self.gate, self.judged = gate, judged
        self.server = Gated()
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def feedback_recipe(path: Path, prompts: Path, out: Path, url: str) -> Path:
    from test_feedback_runner import QUALITY

    generators = [{"model": f"openai:{n}@{url}", "name": n, "max_retries": 0} for n in QUALITY]
    path.write_text(
        yaml.safe_dump(
            {
                "feedback": {
                    "prompts": str(prompts),
                    "output_dir": str(out),
                    "generators": generators,
                    "completions_per_prompt": 2,
                    "judge": {"model": {"model": f"openai:judge@{url}", "name": "judge", "temperature": 0.0}},
                    "eval_fraction": 0.0,
                }
            }
        )
    )
    return path


def sorted_lines(path: Path) -> list[str]:
    """The records of a file in a fixed order, without the judge's id (it names the server's port)."""
    records = [{k: v for k, v in r.items() if k != "judge"} for r in io.read_jsonl_resumable(path)]
    return sorted(json.dumps(r, sort_keys=True) for r in records)


@pytest.mark.slow
def test_feedback_sigkill_between_chunks_then_rerun_rates_every_prompt_once(tmp_path, monkeypatch):
    from test_feedback_runner import write_prompts
    from zephyr.core.config import FeedbackConfig

    chunk = FeedbackConfig().chunk_prompts  # the default

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    n = chunk + 16  # two chunks
    prompts = write_prompts(tmp_path / "prompts.jsonl", n)
    with GatedFeedbackServer(open_calls=None) as ref:
        straight = tmp_path / "straight"
        assert (
            main(["feedback", str(feedback_recipe(tmp_path / "a.yaml", prompts, straight, ref.server.url))])
            == 0
        )

    killed = tmp_path / "killed"
    with GatedFeedbackServer(open_calls=chunk) as srv:  # the second chunk's judging waits
        recipe = feedback_recipe(tmp_path / "b.yaml", prompts, killed, srv.server.url)
        proc = start("feedback", str(recipe))
        rated = killed / "rated.jsonl"
        kill_when(proc, lambda: rated.exists() and rated.read_bytes().count(b"\n") == chunk)
        with rated.open("a") as f:  # and a crash in the middle of a line
            f.write('{"prompt_id": "p70", "prompt": "quest')
        srv.gate.set()
        time.sleep(0.2)  # requests the dead process left in the socket buffers are answered first
        rerun_from = len(srv.judged)
        assert main(["feedback", str(recipe)]) == 0
        rerun = srv.judged[rerun_from:]

    assert sorted(rerun) == list(range(chunk, n))  # the rated prompts were never judged again
    records = io.read_records(killed / "rated.jsonl", "rated").records  # valid, every prompt_id once
    assert len(records) == n
    assert sorted_lines(killed / "rated.jsonl") == sorted_lines(straight / "rated.jsonl")
    assert sorted_lines(killed / "pairs.jsonl") == sorted_lines(straight / "pairs.jsonl")


# ---------------------------------------------------------------------------------------------------------
# eval mt-bench: SIGKILL while judging, rerun reuses the answers


class ChatServer(ThreadingHTTPServer):
    """OpenAI chat completions on loopback for a model and a judge. Answers are fixed by the request; the
    judge (a request holding "[[rating]]") rates by a hash, and after `open_judge_calls` waits for `gate`."""

    daemon_threads = True

    def __init__(self, open_judge_calls: int | None = None):
        super().__init__(("127.0.0.1", 0), _ChatHandler)
        self.lock = threading.Lock()
        self.model_calls = 0
        self.judge_calls = 0
        self.open_judge_calls = open_judge_calls
        self.gate = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def answer(self, messages: list[dict]) -> str:
        text = messages[-1]["content"]
        digest = int(hashlib.sha256(text.encode()).hexdigest(), 16)
        if any("[[rating]]" in m["content"] for m in messages):  # in the system prompt for turn 2
            with self.lock:
                index = self.judge_calls
                self.judge_calls += 1
            if self.open_judge_calls is not None and index >= self.open_judge_calls:
                self.gate.wait(60)
            return f"The answer is fine. Rating: [[{digest % 10 + 1}]]"
        with self.lock:
            self.model_calls += 1
        return f"Answer {digest % 1000} to a question of {len(text)} characters."


class _ChatHandler(BaseHTTPRequestHandler):
    server: ChatServer

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = self.server.answer(body["messages"])
        reply = {
            "id": "x",
            "object": "chat.completion",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5},
        }
        data = json.dumps(reply).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client was killed while this answer waited


def serve(server: ChatServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


def stop(server: ChatServer, thread: threading.Thread) -> None:
    server.gate.set()
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def mt_bench_args(url: str, out: Path) -> list[str]:
    model, judge = f"openai:m@{url}", f"openai:j@{url}"
    return ["eval", "mt-bench", "--model", model, "--judge", judge, "--out", str(out), "--limit", "6"]


def comparable(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in ("model", "judge")}  # the specs hold the port


@pytest.mark.slow
def test_mt_bench_sigkill_while_judging_then_rerun_reuses_the_answers(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    ref = ChatServer()
    thread = serve(ref)
    try:
        assert main(mt_bench_args(ref.url, tmp_path / "straight")) == 0
    finally:
        stop(ref, thread)

    srv = ChatServer(open_judge_calls=5)
    thread = serve(srv)
    killed = tmp_path / "killed"
    try:
        proc = start(*mt_bench_args(srv.url, killed))
        kill_when(proc, lambda: (killed / "answers.jsonl").exists() and srv.judge_calls > 5)
        model_calls = srv.model_calls
        srv.gate.set()
        assert main(mt_bench_args(srv.url, killed)) == 0
    finally:
        stop(srv, thread)
    assert model_calls == 12 and srv.model_calls == model_calls  # 6 questions x 2 turns, never again
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())
    again = json.loads((killed / "results.json").read_text())
    assert comparable(again) == comparable(straight)
    assert (killed / "answers.jsonl").read_text().replace(srv.url, "") == (
        tmp_path / "straight" / "answers.jsonl"
    ).read_text().replace(ref.url, "")


# ---------------------------------------------------------------------------------------------------------
# eval mc: SIGKILL at a random moment, rerun


def write_mc(path: Path, n: int) -> Path:
    rows = [
        {"id": f"q{i}", "query": f"What is {i} plus {i}?", "choices": [str(2 * i), str(2 * i + 1)], "gold": 0}
        for i in range(n)
    ]
    io.write_jsonl(path, rows)
    return path


@pytest.mark.slow
def test_mc_sigkill_while_scoring_then_rerun(tmp_path, tiny_model_dir, one_thread):
    n = 2000
    data = write_mc(tmp_path / "mc.jsonl", n)
    straight = tmp_path / "straight"
    args = ["eval", "mc", "--model", str(tiny_model_dir), "--data", str(data), "--batch-size", "2"]
    assert main([*args, "--out", str(straight)]) == 0

    killed = tmp_path / "killed"
    proc = start(*args, "--out", str(killed))
    stderr = bytearray()

    def read_stderr() -> None:
        for chunk in iter(lambda: proc.stderr.read1(4096), b""):
            stderr.extend(chunk)

    reader = threading.Thread(target=read_stderr)
    reader.start()
    while b"Scoring items" not in stderr:  # tqdm's first line: the model is loaded, scoring begins
        assert proc.poll() is None, bytes(stderr[-2000:]).decode()
        time.sleep(0.02)
    # a random moment of the scoring, as a share of the straight run's scoring time: mid-scoring on a fast
    # machine and a slow one alike
    scoring = json.loads((straight / "results.json").read_text())["seconds"]
    time.sleep(random.Random(20).uniform(0.1, 0.5) * scoring)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    reader.join(timeout=10)
    proc.stderr.close()
    assert not (killed / "results.json").exists()  # killed before it finished: nothing half-written

    assert main([*args, "--out", str(killed)]) == 0
    assert io.read_jsonl_resumable(killed / "items.jsonl") == io.read_jsonl_resumable(
        straight / "items.jsonl"
    )
    keep = ("acc", "acc_norm", "counts", "score")
    got, expected = (json.loads((d / "results.json").read_text()) for d in (killed, straight))
    assert {k: got[k] for k in keep} == {k: expected[k] for k in keep}
    assert got["counts"]["items"] == n


# ---------------------------------------------------------------------------------------------------------
# The output folder: preflight, a full disk mid-run


def sft_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "sft",
        "recipes/smollm2/sft.yaml",
        f"sft.model={model_dir}",
        f"sft.train_data={TINY_CHAT}",
        f"sft.output_dir={out}",
        "sft.max_samples=12",
        "sft.max_length=64",
        "sft.per_device_batch_size=2",
        "sft.eval_fraction=0",
        "sft.max_steps=6",
        "sft.save_steps=2",
        "sft.precision=fp32",
        "sft.learning_rate=1e-3",
        *extra,
    ]


def test_an_output_folder_that_cannot_be_created_fails_before_training(capsys, tmp_path, tiny_model_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "run"
    assert main(sft_args(tiny_model_dir, out)) == 2
    err = capsys.readouterr().err
    assert err == f"error: output folder {out}: cannot create it (Not a directory)\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_fails_before_training(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert main(sft_args(tiny_model_dir, out)) == 2
    finally:
        out.chmod(0o700)
    err = capsys.readouterr().err
    assert err == f"error: output folder {out}: not writable (Permission denied)\n"
    assert list(out.iterdir()) == []


def test_too_little_free_space_fails_before_training(capsys, tmp_path, tiny_model_dir, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=300 << 20))
    out = tmp_path / "run"
    assert main(sft_args(tiny_model_dir, out)) == 2
    assert capsys.readouterr().err == (
        f"error: output folder {out}: only 300.0 MiB free on its disk, at least 1.0 GiB needed; "
        "free some space or choose another folder\n"
    )
    assert not (out / "metrics.jsonl").exists()


def test_check_output_dir_floor_and_checkpoint_size(tmp_path, monkeypatch, tiny_llama_factory):
    from zephyr.training.prepare import checkpoint_bytes

    model = tiny_llama_factory(64)
    n = sum(p.numel() for p in model.parameters())
    assert checkpoint_bytes(model, torch.float32) == n * (4 + 4 + 8)
    assert checkpoint_bytes(model, torch.bfloat16) == n * (2 + 4 + 8)
    model.model.embed_tokens.weight.requires_grad_(False)  # frozen weights have no optimizer state
    frozen = model.model.embed_tokens.weight.numel()
    assert checkpoint_bytes(model, torch.float32) == n * 8 + (n - frozen) * 8
    # bf16 master weights: the folder, accelerate's copy and both moments in bf16
    assert checkpoint_bytes(model.bfloat16(), torch.bfloat16) == n * (2 + 2) + (n - frozen) * 4

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=5000))
    assert io.check_output_dir(tmp_path / "a" / "b", min_free_bytes=5000) == tmp_path / "a" / "b"
    with pytest.raises(ZephyrError, match=r"only 4.9 KiB free on its disk, at least 4.9 KiB needed") as info:
        io.check_output_dir(tmp_path / "a" / "b", min_free_bytes=5001)
    assert str(tmp_path / "a" / "b") in str(info.value)
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the probe file is gone


@pytest.mark.slow
def test_a_full_disk_while_saving_stops_cleanly_and_resumes(
    capsys, tmp_path, tiny_model_dir, monkeypatch, one_thread
):
    from zephyr.training import checkpoint

    straight = tmp_path / "straight"
    assert main(sft_args(tiny_model_dir, straight)) == 0

    real_write = checkpoint._write_model_folder
    calls = {"n": 0}

    def fills_the_disk(accelerator, model, tokenizer, target, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # checkpoint-4: half written, then no space
            (target / "model.safetensors").write_bytes(b"\x00" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(accelerator, model, tokenizer, target, *args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(checkpoint, "_write_model_folder", fills_the_disk)
    capsys.readouterr()
    assert main(sft_args(tiny_model_dir, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"error: {out / 'checkpoint-4'}: cannot write: the disk is full (No space left on device); "
        f"the last complete checkpoint is {out / 'checkpoint-2'}; free space and rerun with --resume"
    )
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-2"]  # no half checkpoint

    monkeypatch.setattr(checkpoint, "_write_model_folder", real_write)
    assert main([*sft_args(tiny_model_dir, out), "--resume"]) == 0
    assert_same_run(straight, out)


def test_a_full_disk_while_appending_is_a_clear_error():
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    with pytest.raises(ZephyrError) as info:
        io.append_jsonl("/dev/full", {"prompt_id": "p1"})
    assert str(info.value) == "/dev/full: cannot write: the disk is full (No space left on device)"


def test_a_full_disk_while_writing_a_file_leaves_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "pairs.jsonl"
    io.write_jsonl(path, [{"a": 1}])

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(ZephyrError, match="the disk is full"):
        io.write_jsonl(path, [{"a": 2}, {"a": 3}])
    monkeypatch.undo()
    assert io.read_jsonl_resumable(path) == [{"a": 1}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]  # the temp file is removed


# ---------------------------------------------------------------------------------------------------------
# Numerics


@pytest.mark.slow
def test_a_nan_loss_stops_the_command_and_names_the_last_good_checkpoint(
    capsys, tmp_path, tiny_model_dir, monkeypatch, one_thread
):
    from zephyr.stages.sft import run as sft

    real_loss = sft.SFTTask.loss
    calls = {"n": 0}

    def poisoned(self, model, batch):
        calls["n"] += 1
        out = real_loss(self, model, batch)
        return out if calls["n"] != 5 else type(out)(loss_sum=out.loss_sum * float("inf"))

    monkeypatch.setattr(sft.SFTTask, "loss", poisoned)
    out = tmp_path / "run"
    assert main(sft_args(tiny_model_dir, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"error: step 5: loss is inf; stopped, nothing of this step saved; "
        f"the last good checkpoint is {out / 'checkpoint-4'}"
    )
    assert not (out / "final").exists()
    weights = load_file(out / "checkpoint-4" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
