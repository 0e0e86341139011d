"""grpo/math_verify_worker.py: math-verify's verdicts from forked workers, and their time bound. A worker is
killed when a verify call's VERIFY_SECONDS are spent; the bound must hold on the main thread, in a thread and
in worker processes, forked (a multiprocessing.Pool's are daemonic, and may not start children through
multiprocessing) or spawned, and no worker may outlive its process. Verdicts are worked out by hand."""

import multiprocessing
import os
import subprocess
import sys
import threading
import time

import pytest

from grpo import answers, math_verify_worker
from grpo.answers import verify
from grpo.math_verify_worker import equal, hopeless

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def soon() -> float:
    return time.monotonic() + answers.VERIFY_SECONDS


def test_equal_is_math_verify_on_two_values():
    assert equal("x^2-1", "(x-1)(x+1)", False, soon()) is True
    assert equal("x", "|x|", False, soon()) is False  # equal for x >= 0 only
    # A set gold against a relation: math-verify compares them only when asked to (the gold's notation says interval)
    assert equal("[2, \\infty)", "x \\geq 2", True, soon()) is True
    assert equal("[2, \\infty)", "x \\geq 2", False, soon()) is False


def test_a_question_after_the_deadline_is_not_asked_and_counts():
    before = math_verify_worker.timeouts()
    assert equal("x+1", "1+x", False, time.monotonic() - 1) is False
    assert math_verify_worker.timeouts() == before + 1


@pytest.mark.parametrize("latex, expected", [
    ("x^2+1", False), ("(" * 12 + "1" + ")" * 12, False), ("x^{999}", False),
    ("9^{9^{9}}", True), ("2**3**4", True), ("1000000!", True), ("x^{2000}", True),  # towers, huge numbers
    ("(" * 13 + "1" + ")" * 13, True), ("x" * 301, True), ("", True),  # deeper than 12, longer than 300, empty
])
def test_hopeless(latex, expected):
    assert hopeless(latex) is expected


OVERRUNS = "(x+1)^{999}"  # simplify() expands it: a minute and more, unless stopped
SLOW = [
    "9^{9^{9}}", "2^{2^{2^{2^{100}}}}", "10^{10^{10}}", "1000000!", "9^{999999}", "(x+1)^{2000}", OVERRUNS,
    "\\sin(" * 11 + "x" + ")" * 11, "\\sin(" * 60 + "x" + ")" * 60, "x^{" * 40 + "2" + "}" * 40,
    "x+" * 5_000 + "1", "(" * 5_000 + "1" + ")" * 5_000, "\\frac{1}{2}" * 1_000,
]


def timed_verdicts(texts: list[str]) -> tuple[list[bool], float, int]:
    """(verdicts of each text against 4, the slowest call in seconds, timeouts during the calls). The
    process's one warm-up of math-verify (0.4 to 0.7 s, whatever the input) is done first, apart."""
    math_verify_worker._warm_up()
    before, verdicts, worst = math_verify_worker.timeouts(), [], 0.0
    for text in texts:
        start = time.monotonic()
        verdicts.append(verify(f"<answer>{text}</answer>", "<answer>4</answer>"))
        worst = max(worst, time.monotonic() - start)
    return verdicts, worst, math_verify_worker.timeouts() - before


def worker_pids() -> list[int]:
    verify("<answer>x + 1</answer>", "<answer>1 + x</answer>")  # starts one if none is there
    return list(math_verify_worker._live)


def test_the_bound_on_the_main_thread():
    verdicts, worst, timeouts = timed_verdicts(SLOW)
    assert verdicts == [False] * len(SLOW) and worst < 2.0
    assert timeouts >= 1  # (x+1)^{999} runs into the bound; the towers, factorials and long texts never start
    verdicts, worst, timeouts = timed_verdicts([OVERRUNS])
    assert verdicts == [False] and timeouts == 1 and worst < 2.0  # counted, each time
    start = time.monotonic()  # the questions of one call share its second: those after it are not asked
    assert verify("\\{(x+1)^{999}, (x+2)^{999}, (x+3)^{999}\\}", "\\{4, 5, 6\\}") is False
    assert time.monotonic() - start < 2.0
    assert verify("<answer>2x + 2</answer>", "<answer>2(x+1)</answer>") is True  # a new worker answers next


def test_the_bound_in_a_thread():
    out = {}
    thread = threading.Thread(target=lambda: out.update(r=timed_verdicts(["9^{9^{9}}", OVERRUNS, "x" * 10_000])))
    thread.start()
    thread.join(10)
    verdicts, worst, timeouts = out["r"]
    assert verdicts == [False, False, False] and timeouts == 1
    assert answers.VERIFY_SECONDS <= worst < 2.0  # the overrun ran its full second, and was stopped there


def timed_in_a_process(texts: list[str]) -> tuple[list[bool], float, int, list[int]]:
    return (*timed_verdicts(texts), worker_pids())


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_the_bound_in_a_worker_process_which_leaves_no_worker(method):
    with multiprocessing.get_context(method).Pool(1) as pool:  # daemonic workers
        verdicts, worst, timeouts, pids = pool.apply(timed_in_a_process, (["9^{9^{9}}", OVERRUNS],))
    assert verdicts == [False, False] and worst < 2.0 and timeouts == 1 and len(pids) == 1
    assert gone(pids[0])  # the pool's process ended, so its worker read EOF and left


def gone(pid: int, wait: float = 5.0) -> bool:
    """Has the process ended (or ended and waits, a zombie, to be reaped by whoever adopted it)?"""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("exit_call", ["sys.exit(0)", "os._exit(0)", "os.kill(os.getpid(), signal.SIGKILL)"])
def test_workers_end_with_their_process(exit_call):
    """At exit (atexit), and without it (os._exit, SIGKILL: the worker's pipe reaches EOF): no worker is left."""
    code = ("import os, signal, sys; from grpo import answers, math_verify_worker as w; "
            "answers.verify('<answer>x+1</answer>', '<answer>1+x</answer>'); "
            f"print(*w._live, flush=True); {exit_call}")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    pids = [int(pid) for pid in done.stdout.split()]
    assert len(pids) == 1 and gone(pids[0])


def test_shutdown_stops_this_process_workers():
    pids = worker_pids()
    assert pids and all(not gone(pid, wait=0) for pid in pids)
    math_verify_worker.shutdown()
    assert math_verify_worker._live == {} and all(gone(pid) for pid in pids)
    assert verify("<answer>x^2 - 1</answer>", "<answer>(x-1)(x+1)</answer>") is True  # and the next call starts one
