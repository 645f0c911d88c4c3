"""The demo's synthetic task: a verifiable reward on short strings, checkable by a one-line rule.

Each prompt is a few distinct letters followed by ``=``; a completion is scored letter by letter (partial
credit). Tasks:

- ``copy``: write the prompt's letters back in order (``cab=`` -> ``cab``);
- ``reverse``: write them back reversed (``cab=`` -> ``bac``);
- ``subset``: write ``length`` letters, each of which appears in the prompt (``cab=`` -> ``bbca`` scores 1).
  Many completions are right, so a healthy policy keeps real entropy while its reward rises.

Example::

    prompts = make_prompts(100, seed=0)
    reward = make_reward("subset")
    reward(prompts=["cab="], completions=["bbcx"])   # [0.75]
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

ALPHABET = "abcdefgh"
"""Letters prompts and completions are made of; the tokenizer has one token per letter plus ``=``."""
SEPARATOR = "="
TASKS = ("copy", "reverse", "subset")


def make_prompts(n: int, *, seed: int, letters: int = 4, alphabet: str = ALPHABET) -> list[str]:
    """``n`` prompts of ``letters`` distinct letters and ``=``; the same ``seed`` gives the same prompts."""
    if not 1 <= letters <= len(alphabet):
        raise ValueError(f"letters={letters} must be between 1 and {len(alphabet)}")
    rng = random.Random(seed)
    return ["".join(rng.sample(alphabet, letters)) + SEPARATOR for _ in range(n)]


def target(task: str, prompt: str) -> str:
    """The reference answer of ``copy``/``reverse`` (``subset`` has many; see :func:`score`)."""
    letters = prompt.rstrip(SEPARATOR)
    if task == "copy":
        return letters
    if task == "reverse":
        return letters[::-1]
    raise ValueError(f"task {task!r} has no single target")


def score(task: str, prompt: str, completion: str, length: int) -> float:
    """Reward in [0, 1]: the share of the ``length`` expected letters that are right."""
    if task == "subset":
        allowed = set(prompt.rstrip(SEPARATOR))
        return sum(ch in allowed for ch in completion[:length]) / length
    want = target(task, prompt)
    return sum(a == b for a, b in zip(completion, want)) / len(want)


def make_reward(task: str, length: int = 4) -> Callable[..., list[float]]:
    """A TRL reward function (``prompts``, ``completions`` -> one float each) for ``task``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")

    def reward(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        return [score(task, p, c, length) for p, c in zip(prompts, completions)]

    reward.__name__ = f"{task}_reward"
    return reward
