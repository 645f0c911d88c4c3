"""The rldiag demo: GRPO on a tiny Llama, on the CPU, recorded with rldiag -- one file, top to bottom.

What happens (``rldiag demo``):

1. A 2-layer Llama (~80k parameters) and a character tokenizer are built from a config: nothing is
   downloaded. The task is synthetic with a verifiable reward (:mod:`rldiag.demo.task`): write 4 letters,
   each of which appears in the prompt.
2. TRL's ``GRPOTrainer`` trains it -- as :class:`~rldiag.record.integrations.trl.RLDiagGRPOTrainer`, which
   records per-token log-probs, old log-probs, entropies, advantages, groups and rewards at gradient time.
3. Healthy phase (steps 1 .. ``change_step`` = 190): each rollout batch feeds ``num_iterations`` = 2 updates
   at a learning rate of 3e-4. Reward rises, entropy falls slowly, almost no token is clipped.
4. After ``change_step`` the regime changes, as a bad config edit or a resume with other settings would
   change it: the learning rate is multiplied by ``lr_factor`` (40) and each rollout batch is reused for
   ``stale_iterations`` (8) updates. Nothing is written into the logs by hand; the training does the rest:
   the policy moves far from the one that sampled its data (KL and clipping spike, the importance ratios
   grow heavy tails), the entropy collapses within a few steps, and soon no prompt group carries a gradient.

``change_step = 0`` gives the healthy run alone (sample_logs/healthy).

Example::

    from rldiag.demo.config import DemoConfig
    from rldiag.demo.train import main
    run_dir = main(DemoConfig(out="runs/demo", seed=0))
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback, ProgressCallback  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from rldiag.alerts import AlertConfig  # noqa: E402
from rldiag.demo.config import DEMO_MARKER, INFO_FILE, DemoConfig, check_out  # noqa: E402
from rldiag.demo.model import build_model, build_tokenizer  # noqa: E402
from rldiag.demo.task import ALPHABET, SEPARATOR, make_prompts, make_reward  # noqa: E402
from rldiag.record.integrations.trl import RLDiagGRPOTrainer  # noqa: E402
from rldiag.schema import TOKENIZER_DIR  # noqa: E402


class RegimeChange(TrainerCallback):
    """After step ``change_step``: multiply the learning rate, reuse each rollout batch ``stale_iterations`` times.

    It acts on the live trainer between two optimizer steps. TRL reads ``trainer.num_iterations`` each time it
    decides whether to generate, so the next rollout batch is reused the new number of times.
    """

    def __init__(self, cfg: DemoConfig, trainer: RLDiagGRPOTrainer) -> None:
        self.cfg, self.trainer = cfg, trainer
        self.applied_at: int | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.cfg.change_step and state.global_step == self.cfg.change_step and self.applied_at is None:
            new_lr = self.cfg.lr * self.cfg.lr_factor
            for group in kwargs["optimizer"].param_groups:
                group["lr"] = new_lr
            scheduler = kwargs["lr_scheduler"]
            scheduler.base_lrs = [new_lr] * len(scheduler.base_lrs)  # constant schedule: lr = base_lr
            self.trainer.num_iterations = self.cfg.stale_iterations
            self.applied_at = int(state.global_step)
            if not self.cfg.quiet:
                print(
                    f"  -- after step {state.global_step}: learning rate {self.cfg.lr:g} -> {new_lr:g}, each "
                    f"rollout batch now reused {self.cfg.stale_iterations}x --",
                    flush=True,
                )
        return control


class Progress(TrainerCallback):
    """A line every ``every`` steps, from the rldiag metrics the integration adds to the trainer's logs."""

    def __init__(self, total: int, every: int = 20) -> None:
        self.total, self.every, self.start = total, every, time.time()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> Any:
        logs = logs or {}
        step = state.global_step
        if "rldiag/entropy/mean" in logs and (step % self.every == 0 or step == self.total):
            print(
                f"  step {step:4d}/{self.total}  entropy {logs['rldiag/entropy/mean']:6.3f}  "
                f"clipped {logs.get('rldiag/clip/region', float('nan')):6.1%}  "
                f"ratio max {logs.get('rldiag/ratio/max', float('nan')):7.3g}  "
                f"[{time.time() - self.start:5.1f} s]",
                flush=True,
            )
        return control


def print_alert(note: Any) -> None:
    """Alert callback: one line for every firing (alerts.jsonl keeps every event, resolutions included)."""
    if note.event == "firing":
        print(f"  ! alert {note.severity}: {note.summary}", flush=True)


def prepare_out(out: Path) -> None:
    """Empty ``out`` for a new run; refuse a directory that holds anything but an earlier demo run."""
    if check_out(out).exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / DEMO_MARKER).write_text("made by `rldiag demo`; a new demo run may replace this directory\n")


def main(cfg: DemoConfig, on_start: Callable[[Path], Any] | None = None) -> Path:
    """Train, record into ``cfg.out``, return the run directory.

    ``on_start(run_dir)`` is called once the run directory exists, just before training (``--serve`` starts
    the dashboard there).
    """
    if cfg.change_step and not 0 < cfg.change_step < cfg.steps:
        raise ValueError(f"change_step={cfg.change_step} must be between 1 and steps-1 (0: no change)")
    out = Path(cfg.out)
    prepare_out(out)

    # ---- 1. determinism, quiet libraries -------------------------------------------------------------
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    transformers.logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # ---- 2. model, tokenizer, task: built here, nothing downloaded --------------------------------------
    tokenizer = build_tokenizer(ALPHABET + SEPARATOR)
    model = build_model(tokenizer, seed=cfg.seed)
    prompts = make_prompts(cfg.steps * cfg.prompts_per_step, seed=cfg.seed, letters=cfg.letters)
    train_dataset = datasets.Dataset.from_dict({"prompt": prompts})
    reward = make_reward(cfg.task, length=cfg.completion_length)

    # ---- 3. GRPO as TRL runs it, recorded by rldiag ----------------------------------------------------
    scratch = Path(tempfile.mkdtemp(prefix="rldiag-demo-"))  # TRL's output_dir; nothing is saved there
    args = GRPOConfig(
        output_dir=str(scratch),
        per_device_train_batch_size=cfg.prompts_per_step * cfg.num_generations,
        num_generations=cfg.num_generations,
        max_completion_length=cfg.completion_length,
        max_steps=cfg.steps,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        num_iterations=cfg.num_iterations,
        epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high,
        beta=0.0,
        temperature=cfg.temperature,
        gradient_checkpointing=False,  # TRL turns it on by default; an 80k-parameter model does not need it
        logging_steps=1,
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    options: dict[str, Any] = {"token_sample_rate": cfg.token_sample_rate}
    if cfg.alerts:
        callbacks = () if cfg.quiet else (print_alert,)
        options["alerts"] = AlertConfig(console=False, callbacks=callbacks)
    trainer = RLDiagGRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        rldiag_run_dir=out,
        rldiag_options=options,
    )
    for cb in (PrinterCallback, ProgressCallback):  # rldiag's progress lines instead of TRL's log dicts
        trainer.remove_callback(cb)

    # ---- 4. the change of regime -------------------------------------------------------------------------
    regime = RegimeChange(cfg, trainer)
    trainer.add_callback(regime)
    if not cfg.quiet:
        trainer.add_callback(Progress(cfg.steps))

    # ---- 5. train --------------------------------------------------------------------------------------
    if on_start is not None:
        on_start(out)
    started = time.time()
    try:
        trainer.train()
    finally:
        if trainer.rldiag_recorder is not None:  # None only on a rank that does not record
            trainer.rldiag_recorder.close()  # publishes the last files and the alerts
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.time() - started

    # ---- 6. what this run was, for the summary and the dashboard ----------------------------------------
    info = {
        "config": dataclasses.asdict(cfg),
        "regime_change_step": regime.applied_at,
        "train_seconds": round(seconds, 1),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": _version("trl"),
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    # the dashboard decodes token ids with a run's own `tokenizer/` folder when it has one
    tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    return out


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
