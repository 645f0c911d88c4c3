"""Sub-commands of the ``rldiag`` CLI: one module each, discovered by :mod:`rldiag.cli`."""
