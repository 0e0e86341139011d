"""math-verify, asked in worker processes with a time bound: `equal(gold, answer, ...)`.

grpo/answers.py decides what it can by its own rules and asks here whether two extracted values (LaTeX)
are equal where only a computer-algebra comparison can tell. math-verify (Hugging Face's, on sympy) can
run for minutes (9^{9^{9}} is computed exactly, simplify() has no bound), and its own bound is SIGALRM,
which works on a process's main thread only; a Python thread cannot be stopped. So each process that asks
forks workers (os.fork, so that a daemonic multiprocessing worker may fork too) that answer over a pipe.
A question waits at most until its deadline; a worker that overruns is killed, the question counts as a
timeout (`timeouts()`, logged) and its answer as wrong, and the next question forks a new worker in
milliseconds (this process has math-verify imported and warm). Workers end with their process: at exit,
on shutdown(), or at EOF on their pipe when the process dies.
"""

from __future__ import annotations

import atexit
import cmath
import functools
import gc
import logging
import math
import multiprocessing.connection
import os
import re
import signal
import threading
import time
import warnings

import math_verify

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_idle: list[_Worker] = []       # workers waiting for a question
_live: dict[int, _Worker] = {}  # every worker of this process, by pid
_warm = False                   # math-verify has compared once in this process
_timeouts = 0
# A tower of numeric powers (9^{9^9}), a huge factorial or exponent: never worth a worker's time
_HOPELESS = re.compile(r"\d\s*(?:\^|\*\*)\s*[{(\s]*\d+\s*(?:\^|\*\*)|\d{4,}\s*!|(?:\^|\*\*)\s*[{(\s]*-?\d{4,}")


def hopeless(latex: str, max_chars: int = 300, max_depth: int = 12) -> bool:
    """Too long, too deeply nested, or a tower of numeric powers: not worth asking."""
    depth = deepest = 0
    for c in latex[:max_chars + 1]:
        depth += (c in "([{") - (c in ")]}")
        deepest = max(deepest, depth)
    return not latex or len(latex) > max_chars or deepest > max_depth or _HOPELESS.search(latex) is not None


def equal(gold: str, answer: str, set_relation: bool, deadline: float) -> bool:
    """math-verify's verdict on gold and answer (LaTeX): verify(parse(gold), parse(answer)) with
    `allow_set_relation_comp=set_relation`, else equal at three sample points; False when no verdict comes
    by `deadline` (time.monotonic(); a timeout, counted and logged) or the worker fails."""
    if _warm_up():  # once per process, math-verify's lazy imports: the question still gets half a second
        deadline = max(deadline, time.monotonic() + 0.5)
    if time.monotonic() >= deadline:  # the call's time went to earlier questions: this one is not asked
        return _timed_out(gold, answer)
    with _lock:
        worker = _idle.pop() if _idle else None
    worker = worker or _Worker()
    reply = worker.ask((gold, answer, set_relation), deadline - time.monotonic())
    if reply is None:  # overran or died: a wrong answer, and a new worker next time
        worker.stop()
        return _timed_out(gold, answer)
    with _lock:
        if worker.pid in _live:  # not stopped meanwhile by shutdown() in another thread
            _idle.append(worker)
    return reply


def _timed_out(gold: str, answer: str) -> bool:
    global _timeouts
    with _lock:
        _timeouts += 1
        n = _timeouts
    if n <= 3 or math.log10(n).is_integer():
        _log.warning(f"verify: no verdict from math-verify in time on answer {answer[:80]!r} against gold "
                     f"{gold[:80]!r}; judged wrong ({n} so far in this process: math_verify_worker.timeouts()).")
    return False


def timeouts() -> int:
    """How many questions of this process got no verdict in time (each judged a wrong answer)."""
    return _timeouts


def shutdown() -> None:
    """Stop this process's workers (done at exit too); the next question starts a new one."""
    with _lock:
        workers, _idle[:] = list(_live.values()), []
    for worker in workers:
        worker.stop()


def _warm_up() -> bool:
    """Compare once in this process (0.4 to 0.7 s: lazy imports), so that every worker forked from it starts
    warm; True when it did so now."""
    global _warm
    with _lock:
        if _warm:
            return False
        logging.getLogger("math_verify").setLevel(logging.ERROR)  # "Timeout is disabled": ours bounds it
        x, y = _parse("\\frac{1}{2}+x^{2}"), _parse("(x+1)^2 - 2x - \\frac{1}{2}")
        _warm = math_verify.verify(x, y, timeout_seconds=None) or _same_at_points(x[0], y[0]) or True
        return True


@functools.lru_cache(maxsize=1024)  # a group's gold is parsed once, whatever its G answers
def _parse(latex: str) -> list:
    config = [math_verify.LatexExtractionConfig(boxed_match_priority=0), math_verify.ExprExtractionConfig()]
    return math_verify.parse(f"${latex}$", config, parsing_timeout=None) or math_verify.parse(
        latex, config, parsing_timeout=None)


def _same_at_points(x, y, rel_tol: float = 1e-6) -> bool:
    """Expressions with variables equal, in complex numbers, at three points of mixed signs: what
    math-verify's real-valued symbols miss (\\sqrt{x}\\sqrt{x} == x), without |x| == x or \\sqrt{x^2} == x."""
    import sympy
    both = isinstance(x, sympy.Expr) and isinstance(y, sympy.Expr)
    symbols = sorted(x.free_symbols | y.free_symbols, key=str) if both else []
    for k in range(3 if symbols else 0):
        point = {s: sympy.Rational((-1) ** (i + k) * (53 + 37 * i + 29 * k), 100) for i, s in enumerate(symbols)}
        u, v = (complex(sympy.N(e.doit().subs(point), 20)) for e in (x, y))
        if not (cmath.isfinite(u) and cmath.isfinite(v) and abs(u - v) <= max(rel_tol * max(abs(u), abs(v)), 1e-12)):
            return False
    return bool(symbols)


class _Worker:
    """A forked process answering (gold, answer, set_relation) -> bool."""

    def __init__(self):
        self.conn, there = multiprocessing.connection.Pipe()
        with warnings.catch_warnings():  # Python 3.12 warns on fork with threads: the child runs _serve only
            warnings.simplefilter("ignore", DeprecationWarning)
            self.pid = os.fork()
        if self.pid == 0:
            self.conn.close()
            _serve(there)
        there.close()
        self.owner = os.getpid()
        with _lock:
            _live[self.pid] = self

    def ask(self, question: tuple, timeout: float) -> bool | None:
        """The worker's reply, or None when none comes within `timeout` seconds or it has died."""
        try:
            self.conn.send(question)
            return bool(self.conn.recv()) if self.conn.poll(max(timeout, 0.0)) else None
        except (OSError, EOFError):
            return None

    def stop(self) -> None:
        with _lock:
            _live.pop(self.pid, None)
        self.conn.close()
        if self.owner == os.getpid():
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def _serve(conn) -> None:
    """A worker's loop: questions in, verdicts out, until its pipe closes; then os._exit, so that none of
    the parent's atexit handlers runs twice."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's; its exit closes our pipe
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not train.py's checkpoint-and-exit handler
        gc.freeze()  # the parent's objects stay shared: the collector never touches (and copies) them
        while True:
            try:
                gold, answer, set_relation = conn.recv()
            except (EOFError, OSError):
                break
            try:
                golds, answers = _parse(gold), _parse(answer)
                verdict = math_verify.verify(golds, answers, allow_set_relation_comp=set_relation, timeout_seconds=None
                                             ) or bool(golds and answers and _same_at_points(golds[0], answers[0]))
            except Exception:
                verdict = False
            conn.send(bool(verdict))
    finally:
        os._exit(0)


def _forget_workers() -> None:
    """In any forked child: the parent's workers are not its own; close its copies of their pipes, so that
    they still see EOF when the parent goes."""
    global _lock
    for worker in list(_live.values()):
        worker.conn.close()
    _lock = threading.Lock()
    _live.clear()
    _idle.clear()


os.register_at_fork(after_in_child=_forget_workers)
atexit.register(shutdown)
