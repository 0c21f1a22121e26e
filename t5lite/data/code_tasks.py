"""Code generation scored by execution: the pass@k estimator and a small built-in Python task.

`t5lite_code` (registered by `register_code_task`, not on import): "inputs" is a function's
signature and docstring, "targets" its body; a completion is run in the sandbox (`sandbox.py`)
with the problem's hidden asserts, which ride along as the string feature "tests" (read by the
task's postprocess_fn, dropped by the training pipeline). Its metric decodes `samples`
completions per problem at `temperature` and reports pass@1 and pass@10 (Chen et al. 2021,
"Evaluating Large Language Models Trained on Code") in percent.

The task uses the byte-level vocabulary by default: the default SentencePiece vocabulary
normalises whitespace as T5's does, which loses the newlines and indentation Python needs. In
bytes, prompts are at most 125 long and solutions 228 (with EOS one more): feature lengths below
that cut a prompt at its start, a solution at its end.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Sequence

import gin
import numpy as np
import seqio

from t5lite.data import metrics, sandbox, sources
from t5lite.data.instructions import keep_prompt_end
from t5lite.data.vocab import get_vocabulary

KS = (1, 10)
SAMPLES, TEMPERATURE = 10, 0.8
_VALIDATION_ONE_IN = 3


def pass_at_k(n, c, k: int):
    """The unbiased estimate of pass@k from `n` samples of which `c` pass: 1 - C(n-c, k) / C(n, k),
    the chance that at least one of k samples drawn without replacement passes.

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials. `n` and
    `c` are numbers or arrays (one entry per problem, broadcast together); the result has their shape.
    """
    n, c = np.broadcast_arrays(np.asarray(n), np.asarray(c))
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"pass@k needs a positive integer k, got {k!r}.")
    if not (np.issubdtype(n.dtype, np.integer) and np.issubdtype(c.dtype, np.integer)):
        raise ValueError(f"pass@k needs integer sample counts n and c, got {n.dtype} and {c.dtype}.")
    if np.any(n < k):
        raise ValueError(f"pass@{k} needs at least {k} samples per problem; got n={n.min()}.")
    if np.any((c < 0) | (c > n)):
        raise ValueError("pass@k needs 0 <= c <= n for every problem (c counts the passing samples among n).")
    i = np.arange(1, n.max(initial=k) + 1)
    in_product = (i > (n - c)[..., None]) & (i <= n[..., None])
    product = np.prod(np.where(in_product, 1.0 - k / i, 1.0), axis=-1)
    estimate = np.where(n - c < k, 1.0, 1.0 - product)
    return float(estimate) if estimate.ndim == 0 else estimate


@dataclasses.dataclass(frozen=True)
class CodeProblem:
    """A function to write: `prompt` (signature and docstring), a reference `solution` (the body)
    and hidden `tests` (assert statements) that a completion must pass."""

    name: str
    prompt: str
    solution: str
    tests: str


def _problem(signature: str, doc: str, body: str, *checks: str) -> CodeProblem:
    indent = lambda text: "".join(f"    {line}\n" for line in text.splitlines())
    return CodeProblem(
        name=signature.split("(")[0],
        prompt=f'def {signature}:\n    """{doc}"""\n',
        solution=indent(body),
        tests="".join(f"assert {check}\n" for check in checks),
    )


PROBLEMS: tuple[CodeProblem, ...] = (
    _problem("add(a, b)", "Return the sum of a and b.", "return a + b", "add(1, 2) == 3", "add(-4, 4) == 0"),
    _problem(
        "reverse_string(s)",
        "Return s with its characters in reverse order.",
        "return s[::-1]",
        "reverse_string('abc') == 'cba'",
        "reverse_string('') == ''",
    ),
    _problem(
        "is_palindrome(s)",
        "Return True if s reads the same forwards and backwards.",
        "return s == s[::-1]",
        "is_palindrome('level')",
        "not is_palindrome('levels')",
        "is_palindrome('')",
    ),
    _problem(
        "fizzbuzz(n)",
        "Return the FizzBuzz strings for 1..n: 'Fizz' for multiples of 3, 'Buzz' of 5, 'FizzBuzz' of both.",
        "out = []\n"
        "for i in range(1, n + 1):\n"
        "    word = ('Fizz' if i % 3 == 0 else '') + ('Buzz' if i % 5 == 0 else '')\n"
        "    out.append(word or str(i))\n"
        "return out",
        "fizzbuzz(5) == ['1', '2', 'Fizz', '4', 'Buzz']",
        "fizzbuzz(15)[-1] == 'FizzBuzz'",
        "fizzbuzz(0) == []",
    ),
    _problem(
        "count_vowels(s)",
        "Return how many vowels (a, e, i, o, u, either case) s contains.",
        "return sum(ch in 'aeiouAEIOU' for ch in s)",
        "count_vowels('Hello World') == 3",
        "count_vowels('xyz') == 0",
        "count_vowels('AEIOU') == 5",
    ),
    _problem(
        "max_of_list(xs)",
        "Return the largest number of the non-empty list xs.",
        "return max(xs)",
        "max_of_list([3, 9, 2]) == 9",
        "max_of_list([-5, -2]) == -2",
    ),
    _problem(
        "factorial(n)",
        "Return n! for an integer n >= 0.",
        "result = 1\nfor i in range(2, n + 1):\n    result *= i\nreturn result",
        "factorial(0) == 1",
        "factorial(5) == 120",
    ),
    _problem(
        "fibonacci(n)",
        "Return the n-th Fibonacci number, where fibonacci(0) == 0 and fibonacci(1) == 1.",
        "a, b = 0, 1\nfor _ in range(n):\n    a, b = b, a + b\nreturn a",
        "fibonacci(0) == 0",
        "fibonacci(1) == 1",
        "fibonacci(10) == 55",
    ),
    _problem(
        "is_prime(n)",
        "Return True if the integer n is a prime number.",
        "if n < 2:\n    return False\nreturn all(n % d for d in range(2, int(n**0.5) + 1))",
        "is_prime(2)",
        "is_prime(13)",
        "not is_prime(1)",
        "not is_prime(21)",
    ),
    _problem(
        "sum_of_squares(n)",
        "Return 1*1 + 2*2 + ... + n*n.",
        "return sum(i * i for i in range(1, n + 1))",
        "sum_of_squares(3) == 14",
        "sum_of_squares(0) == 0",
    ),
    _problem(
        "count_words(s)",
        "Return the number of whitespace-separated words in s.",
        "return len(s.split())",
        "count_words('the quick  brown fox') == 4",
        "count_words('   ') == 0",
    ),
    _problem(
        "capitalize_words(s)",
        "Return the words of s, each capitalized, joined by single spaces.",
        "return ' '.join(word.capitalize() for word in s.split())",
        "capitalize_words('hello big world') == 'Hello Big World'",
        "capitalize_words('') == ''",
    ),
    _problem(
        "remove_duplicates(xs)",
        "Return the elements of xs without repeats, in the order they first appear.",
        "seen = set()\nout = []\nfor x in xs:\n"
        "    if x not in seen:\n        seen.add(x)\n        out.append(x)\nreturn out",
        "remove_duplicates([3, 1, 3, 2, 1]) == [3, 1, 2]",
        "remove_duplicates([]) == []",
    ),
    _problem(
        "flatten(lists)",
        "Return one list holding the elements of each list in lists, in order.",
        "return [x for inner in lists for x in inner]",
        "flatten([[1, 2], [], [3]]) == [1, 2, 3]",
        "flatten([]) == []",
    ),
    _problem(
        "second_largest(xs)",
        "Return the second largest distinct value of xs (which has at least two distinct values).",
        "return sorted(set(xs))[-2]",
        "second_largest([4, 1, 4, 3]) == 3",
        "second_largest([1, 2]) == 1",
    ),
    _problem(
        "gcd(a, b)",
        "Return the greatest common divisor of the positive integers a and b.",
        "while b:\n    a, b = b, a % b\nreturn a",
        "gcd(12, 18) == 6",
        "gcd(7, 5) == 1",
    ),
    _problem(
        "celsius_to_fahrenheit(c)",
        "Convert a temperature from degrees Celsius to degrees Fahrenheit.",
        "return c * 9 / 5 + 32",
        "celsius_to_fahrenheit(100) == 212",
        "celsius_to_fahrenheit(-40) == -40",
    ),
    _problem(
        "is_anagram(a, b)",
        "Return True if the strings a and b have the same letters in the same numbers.",
        "return sorted(a) == sorted(b)",
        "is_anagram('listen', 'silent')",
        "not is_anagram('abc', 'abd')",
    ),
    _problem(
        "running_sum(xs)",
        "Return the list of prefix sums of xs: element i is xs[0] + ... + xs[i].",
        "total = 0\nout = []\nfor x in xs:\n    total += x\n    out.append(total)\nreturn out",
        "running_sum([1, 2, 3]) == [1, 3, 6]",
        "running_sum([]) == []",
    ),
    _problem(
        "count_char(s, ch)",
        "Return how many times the character ch occurs in s.",
        "return s.count(ch)",
        "count_char('banana', 'a') == 3",
        "count_char('banana', 'z') == 0",
    ),
    _problem(
        "digit_sum(n)",
        "Return the sum of the decimal digits of the integer n >= 0.",
        "return sum(int(d) for d in str(n))",
        "digit_sum(1234) == 10",
        "digit_sum(0) == 0",
    ),
    _problem(
        "even_numbers(xs)",
        "Return the even numbers of xs, in order.",
        "return [x for x in xs if x % 2 == 0]",
        "even_numbers([1, 2, 3, 4]) == [2, 4]",
        "even_numbers([1, 3]) == []",
    ),
    _problem(
        "merge_sorted(a, b)",
        "Merge the sorted lists a and b into one sorted list.",
        "out, i, j = [], 0, 0\n"
        "while i < len(a) and j < len(b):\n"
        "    if a[i] <= b[j]:\n"
        "        out.append(a[i])\n"
        "        i += 1\n"
        "    else:\n"
        "        out.append(b[j])\n"
        "        j += 1\n"
        "return out + a[i:] + b[j:]",
        "merge_sorted([1, 4, 6], [2, 3, 7]) == [1, 2, 3, 4, 6, 7]",
        "merge_sorted([], [1]) == [1]",
    ),
    _problem(
        "char_frequency(s)",
        "Return a dict mapping each character of s to the number of times it occurs.",
        "counts = {}\nfor ch in s:\n    counts[ch] = counts.get(ch, 0) + 1\nreturn counts",
        "char_frequency('abca') == {'a': 2, 'b': 1, 'c': 1}",
        "char_frequency('') == {}",
    ),
    _problem(
        "is_sorted(xs)",
        "Return True if xs is in non-decreasing order.",
        "return all(x <= y for x, y in zip(xs, xs[1:]))",
        "is_sorted([1, 2, 2, 5])",
        "not is_sorted([3, 1])",
        "is_sorted([])",
    ),
    _problem(
        "to_binary(n)",
        "Return the binary representation of the integer n >= 0 as a string, without a prefix.",
        "return bin(n)[2:]",
        "to_binary(5) == '101'",
        "to_binary(0) == '0'",
    ),
    _problem(
        "rotate_left(xs, k)",
        "Return xs rotated left by k positions (k may exceed len(xs)).",
        "if not xs:\n    return []\nk %= len(xs)\nreturn xs[k:] + xs[:k]",
        "rotate_left([1, 2, 3, 4], 1) == [2, 3, 4, 1]",
        "rotate_left([1, 2, 3], 5) == [3, 1, 2]",
        "rotate_left([], 2) == []",
    ),
    _problem(
        "median(xs)",
        "Return the median of the non-empty list of numbers xs.",
        "ys = sorted(xs)\nmid = len(ys) // 2\nreturn ys[mid] if len(ys) % 2 else (ys[mid - 1] + ys[mid]) / 2",
        "median([3, 1, 2]) == 2",
        "median([4, 1, 3, 2]) == 2.5",
    ),
)


def split_of(problem: CodeProblem) -> str:
    """The problem's split: about a third are "validation", chosen by a hash of the name so that
    adding problems moves none of the others."""
    return "validation" if zlib.crc32(problem.name.encode()) % _VALIDATION_ONE_IN == 0 else "train"


@functools.cache
def examples(split: str) -> tuple[dict[str, str], ...]:
    """{"inputs": prompt, "targets": reference body, "tests": hidden asserts} records of `split`."""
    return tuple(
        {"inputs": p.prompt, "targets": p.solution, "tests": p.tests} for p in PROBLEMS if split_of(p) == split
    )


def program(prompt: str, completion: str, tests: str) -> str:
    """The source the sandbox runs: the function, then its tests.

    The completion is a function body, so it ends at its first unindented line: code a model
    writes after the function (a new definition, a call, a copy of a test) is not run.
    """
    lines = completion.splitlines()
    end = next((i for i, line in enumerate(lines) if line.strip() and not line[0].isspace()), len(lines))
    return prompt + "\n".join(lines[:end]).rstrip() + "\n\n" + tests


def postprocess(text: str, example=None, is_target: bool = False):
    """seqio's postprocess_fn: a target becomes {"prompt", "tests"}, which the metric needs to run
    completions; a prediction stays its text."""
    if not is_target:
        return text
    return {"prompt": _decoded(example["inputs_pretokenized"]), "tests": _decoded(example["tests"])}


def _decoded(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def make_pass_at_k_metric(
    samples: int = SAMPLES,
    temperature: float = TEMPERATURE,
    ks: Sequence[int] = KS,
    limits: sandbox.Limits = sandbox.DEFAULT_LIMITS,
    max_workers: int = 2,
):
    """A seqio metric over `samples` completions per problem (decoded at `temperature`): pass@k in
    percent for each of `ks` up to `samples`, the completions run `max_workers` at a time."""
    reported = tuple(k for k in ks if k <= samples)
    if not reported:
        raise ValueError(f"pass_at_k_metric: no k of {tuple(ks)} is <= samples={samples}; pass@k needs k samples.")

    @metrics.sampled(samples=samples, temperature=temperature)
    def pass_at_k_metric(targets: Sequence[dict], predictions: Sequence[Sequence[str]]) -> dict[str, float]:
        n = _check_samples(targets, predictions, max(reported))
        programs = [program(t["prompt"], c, t["tests"]) for t, cs in zip(targets, predictions) for c in cs]
        passed = np.array([r.passed for r in sandbox.run_programs(programs, limits, max_workers)])
        correct = passed.reshape(len(targets), n).sum(axis=1)
        return {f"pass@{k}": 100.0 * float(np.mean(pass_at_k(n, correct, k))) for k in reported}

    return pass_at_k_metric


def _check_samples(targets: Sequence[dict], predictions: Sequence[Sequence[str]], k_max: int) -> int:
    """The number of samples per problem, the same for all; ValueError naming what is wrong."""
    if len(targets) != len(predictions):
        raise ValueError(f"pass_at_k_metric: got {len(predictions)} lists of samples for {len(targets)} targets.")
    if not targets:
        raise ValueError("pass_at_k_metric needs at least one example.")
    for i, (target, samples) in enumerate(zip(targets, predictions)):
        if not isinstance(target, dict) or not {"prompt", "tests"} <= set(target):
            raise ValueError(
                f"pass_at_k_metric: target {i} is {type(target).__name__}, not the {{'prompt', 'tests'}} "
                "dict of the task's postprocess_fn (is the task's postprocess_fn code_tasks.postprocess?)."
            )
        if isinstance(samples, str) or not all(isinstance(s, str) for s in samples):
            raise ValueError(
                f"pass_at_k_metric: example {i} needs a list of sampled strings, got {type(samples).__name__} "
                f"{str(samples)[:80]!r}."
            )
    counts = sorted({len(samples) for samples in predictions})
    if len(counts) != 1 or counts[0] < k_max:
        raise ValueError(
            f"pass_at_k_metric needs the same number of samples (>= {k_max}) for every example; got {counts}."
        )
    return counts[0]


pass_at_k_metric = make_pass_at_k_metric()


@gin.configurable(module="t5lite.data")
def register_code_task(
    name: str = "t5lite_code",
    vocabulary: str | seqio.Vocabulary | None = "bytes",
    samples: int = SAMPLES,
    temperature: float = TEMPERATURE,
    max_workers: int = 2,
) -> str:
    """Registers the built-in code task (see the module docstring) and returns its name."""
    vocab = get_vocabulary(vocabulary)
    metric = make_pass_at_k_metric(samples, temperature, max_workers=max_workers)
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=sources.RecordsSource(examples),
        output_features={key: seqio.Feature(vocab, add_eos=True) for key in ("inputs", "targets")},
        preprocessors=[seqio.preprocessors.tokenize, keep_prompt_end, seqio.preprocessors.append_eos_after_trim],
        postprocess_fn=postprocess,
        metric_fns=[metric],
    )
    return name
