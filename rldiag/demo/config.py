"""The demo's configuration: every knob, with what it does. Importing this module is cheap (no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TIMING = "38 s of training and 68 s in all (mostly importing torch, transformers and TRL) on a busy 2-core CPU"
"""How long ``rldiag demo`` took, measured (the default run, one torch thread); ``demo --help`` and docs/demo.md
quote it (tests/test_demo.py checks both)."""
DEMO_MARKER = ".rldiag-demo"
"""File that marks a directory as a demo run, so a new demo run may replace it (and nothing else)."""
INFO_FILE = "demo.json"
"""The demo's configuration and the step the regime changed at, written into the run directory."""


@dataclass
class DemoConfig:
    """Every knob of the demo. The defaults make the run of ``rldiag demo`` and sample_logs/collapse.

    Example::

        DemoConfig(out="runs/healthy", change_step=0)   # sample_logs/healthy
    """

    out: str = "runs/demo"
    """Run directory rldiag writes (replaced if it holds an earlier demo run, refused otherwise)."""
    steps: int = 240
    """Optimizer steps in all (both phases)."""
    seed: int = 0
    """Seeds the model weights, the prompts, sampling and TRL: one seed, one run."""
    task: str = "subset"
    """Synthetic task (:data:`rldiag.demo.task.TASKS`)."""
    letters: int = 4
    """Distinct letters per prompt."""
    completion_length: int = 4
    """Letters a completion must write (TRL's max_completion_length)."""
    prompts_per_step: int = 4
    """Prompts per optimizer step; each gets ``num_generations`` completions (one GRPO group)."""
    num_generations: int = 8
    """Completions per prompt (G in the GRPO paper)."""
    lr: float = 3e-4
    """Adam learning rate of the healthy phase (constant schedule)."""
    num_iterations: int = 2
    """Updates per rollout batch in the healthy phase (mu in the GRPO paper)."""
    epsilon: float = 0.2
    """PPO clip eps_low."""
    epsilon_high: float = 0.28
    """PPO clip eps_high (DAPO's clip-higher)."""
    temperature: float = 1.0
    """Sampling temperature."""
    change_step: int = 190
    """Last step of the healthy phase; the regime changes after it (0: never, the healthy run)."""
    lr_factor: float = 40.0
    """After the change the learning rate is ``lr * lr_factor``."""
    stale_iterations: int = 8
    """After the change each rollout batch is reused for this many updates (stale rollouts)."""
    alerts: bool = True
    """Evaluate rldiag's default alert rules while training (written to alerts.jsonl, printed once each)."""
    token_sample_rate: float = 1.0
    """Share of sequences whose token rows are written (statistics always cover every token)."""
    threads: int = 1
    """torch CPU threads. One is fastest for a model this small, and fixing it keeps a seed's numbers the same
    on machines with more cores."""
    quiet: bool = False
    """Print nothing while training."""


def check_out(out: str | Path) -> Path:
    """``out`` as a path if a demo run may be written there: absent, empty, or an earlier demo run (which the
    new run replaces); a one-line :class:`FileExistsError` otherwise. Cheap: ``rldiag demo`` calls it before
    importing torch and TRL, so a wrong ``--out`` is refused at once."""
    path = Path(out)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / DEMO_MARKER).exists())):
        raise FileExistsError(f"{path} exists and is not an rldiag demo run; choose another --out")
    return path
