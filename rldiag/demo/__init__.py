"""The rldiag demo: GRPO on a tiny Llama built from a config, on the CPU, recorded with rldiag.

- :mod:`rldiag.demo.config`: :class:`DemoConfig`, every knob (cheap to import);
- :mod:`rldiag.demo.model`: the character tokenizer and the tiny Llama (no download);
- :mod:`rldiag.demo.task`: the synthetic task and its verifiable reward;
- :mod:`rldiag.demo.train`: the trainer, top to bottom (imports torch, transformers and TRL);
- :mod:`rldiag.demo.summary`: what happened, read back from the run directory.

``rldiag demo`` runs it; docs/demo.md explains the run and what the diagnostics show.
"""

from rldiag.demo.config import DemoConfig

__all__ = ["DemoConfig"]
