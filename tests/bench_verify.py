"""What the accuracy reward costs per completion, on the demo's data and on math-style data
(docs/PERFORMANCE.md). Run from the repository root:

    python -m tests.bench_verify [--groups 250] [--math_verify_repo PATH]

Each data set is G = 8 completions per gold, mostly wrong (as early in training), scored by
rewards.accuracy_reward one group at a time, as train.py scores them. "mean" is the reward's time over
all completions, divided by their number (the first call forks math-verify's worker, and is included);
"worst" is the slowest single answers.judge call on a gold already read. With --math_verify_repo (a
checkout of github.com/huggingface/Math-Verify) it also reports how many of that library's own test
cases verify judges as their labels say, and how many math-verify alone does. It always reports verify's
accuracy on tests/test_answers.py's forms of vision-language models' answers (VLM_FORMS).
"""

import argparse
import random
import statistics
import time

from grpo import answers, rewards

G = 8


def demo_groups(n: int, rng: random.Random) -> list[tuple[str, str, list[str]]]:
    """The demo's questions (colour as a multiple choice, left or right in a word), each with G tagged
    answers drawn from the valid ones, as the format warm-up leaves the model: right by chance only."""
    from demo import demo_rows

    groups = []
    for row in demo_rows("test")[:n]:
        valid = list("ABCD") if "Choices:" in row["problem"] else ["left", "right"]
        answers_ = [f"<think>I see.</think><answer>{rng.choice(valid)}</answer>" for _ in range(G)]
        groups.append((row["solution"], row["problem"], answers_))
    return groups


def math_groups(n: int, rng: random.Random) -> list[tuple[str, str, list[str]]]:
    """Numbers, decimals, fractions and expressions: per gold one answer right in another form, one
    right as written, six wrong of the same kind."""
    groups = []
    for i in range(n):
        a, b, c = rng.randint(2, 60), rng.randint(2, 9), rng.randint(1, 9)
        kind = i % 5
        if kind == 0:
            gold, same, wrong = f"{a * b}", f"{a * b}.0", lambda: str(rng.randint(1, 500))
        elif kind == 1:
            gold, same, wrong = f"{a}.{c}", f"{a}{'{,}'}{c}", lambda: f"{rng.randint(1, 60)}.{rng.randint(0, 9)}"
        elif kind == 2:
            gold, same, wrong = f"\\frac{{{a}}}{{{b}}}", f"{a}/{b}", lambda: f"\\frac{{{rng.randint(1, 60)}}}{{{rng.randint(2, 9)}}}"
        elif kind == 3:
            gold, same = f"{b}x + {a}", f"{a} + {b}x"
            wrong = lambda: f"{rng.randint(2, 9)}x + {rng.randint(2, 60)}"
        else:
            gold, same = f"{b}\\sqrt{{{c}}}", f"\\sqrt{{{b * b * c}}}"
            wrong = lambda: f"{rng.randint(2, 9)}\\sqrt{{{rng.randint(1, 9)}}}"
        texts = [same, gold] + [wrong() for _ in range(G - 2)]
        groups.append((f"<answer>{gold}</answer>", "Compute it.",
                       [f"<think>Working.</think><answer>{t}</answer>" for t in texts]))
    return groups


def timing(groups) -> dict:
    """Mean ms per completion through accuracy_reward, the slowest single judge, and how many of the
    comparisons went to math-verify."""
    asked = []
    ask = answers._math_verify

    def counted(*args):
        asked.append(1)
        return ask(*args)

    answers._math_verify = counted
    try:
        start, right = time.perf_counter(), 0
        for solution, problem, texts in groups:
            right += sum(rewards.accuracy_reward(texts, [solution] * G, [problem] * G))
        total = time.perf_counter() - start
    finally:
        answers._math_verify = ask
    single = []
    for solution, problem, texts in groups:
        gold = answers.read_gold(solution, problem)
        for text in texts:
            t = time.perf_counter()
            answers.judge(text, gold)
            single.append(time.perf_counter() - t)
    n = len(single)
    return {"completions": n, "right": int(right), "mean_ms": 1000 * total / n, "median_ms": 1000 * statistics.median(single),
            "worst_ms": 1000 * max(single), "to_math_verify": len(asked), "timeouts": answers.timeouts()}


def alone(gold: str, pred: str) -> bool:
    """math-verify's verdict by itself, as its README calls it."""
    import math_verify

    return bool(math_verify.verify(math_verify.parse(gold), math_verify.parse(pred)))


def vision_language_forms() -> None:
    """tests/test_answers.py's VLM_FORMS (Unicode, names, a yes or no with its reason, units, currencies), judged by
    verify, each form apart, and by math-verify alone; and verify's mean time a case (its gold read each time)."""
    from tests.test_answers import VLM_FORMS

    start = time.perf_counter()
    verdicts = [answers.verify(p, g, q) is e for _, p, g, q, e in VLM_FORMS]
    seconds = time.perf_counter() - start
    forms = {form: [v for (f, *_), v in zip(VLM_FORMS, verdicts) if f == form] for form, *_ in VLM_FORMS}
    theirs = sum(alone(g, p) is e for _, p, g, q, e in VLM_FORMS)
    print(f"vision-language forms ({len(VLM_FORMS)}): verify {sum(verdicts) / len(verdicts):.2f} ("
          + ", ".join(f"{form} {sum(v)}/{len(v)}" for form, v in forms.items())
          + f"; {1000 * seconds / len(VLM_FORMS):.1f} ms a case), math-verify alone {theirs / len(VLM_FORMS):.2f}")


def held_out(repo: str) -> None:
    """tests/test_answers.py's multiple-choice cases, and Math-Verify's own test cases (tests/test_all.py:
    core; test_numina_cases.py, test_open_thoughts.py: hard), judged by verify and by math-verify alone."""
    import importlib.util
    import sys

    from tests.test_answers import CHOICE, test_free_text_multiple_choice

    choice = CHOICE + list(test_free_text_multiple_choice.pytestmark[0].args[1])  # its parametrize table
    ours = sum(answers.verify(p, g, q) is e for p, g, q, e in choice)
    theirs = sum(alone(g, p) is e for p, g, q, e in choice)
    print(f"multiple choice ({len(choice)}): verify {ours / len(choice):.2f}, math-verify alone {theirs / len(choice):.2f}")
    for name, files in (("core", ["test_all"]), ("hard", ["test_numina_cases", "test_open_thoughts"])):
        cases = []
        for file in files:
            spec = importlib.util.spec_from_file_location(f"tests.{file}", f"{repo}/tests/{file}.py")
            module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # they import tests.test_all
            spec.loader.exec_module(module)
            for fn in vars(module).values():
                for mark in getattr(fn, "pytestmark", []):
                    if mark.name == "parametrize":
                        keys = [k.strip() for k in mark.args[0].split(",")]
                        cases += [dict(zip(keys, getattr(v, "values", v))) for v in mark.args[1]]
        ours = sum(answers.verify(c["pred"], c["gold"]) == bool(c["expected"]) for c in cases)
        theirs = sum(alone(c["gold"], c["pred"]) == bool(c["expected"]) for c in cases)
        print(f"math-verify's {name} cases ({len(cases)}): verify {ours / len(cases):.2f} ({ours}), math-verify "
              f"alone {theirs / len(cases):.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=200, help="Groups of G = 8 answers per data set.")
    parser.add_argument("--math_verify_repo", default=None, help="A Math-Verify checkout: also report accuracy on its tests.")
    args = parser.parse_args()
    rng = random.Random(0)
    for name, groups in (("demo", demo_groups(args.groups, rng)), ("math", math_groups(args.groups, rng))):
        r = timing(groups)
        print(f"{name}: {r['completions']} completions, {r['right']} right; accuracy reward {r['mean_ms']:.2f} ms mean, "
              f"judge {r['median_ms']:.2f} ms median, {r['worst_ms']:.1f} ms worst; {r['to_math_verify']} "
              f"comparisons asked math-verify, {r['timeouts']} timeouts")
    vision_language_forms()
    if args.math_verify_repo:
        held_out(args.math_verify_repo)
    answers.shutdown()


if __name__ == "__main__":
    main()
