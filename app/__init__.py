"""The rldiag dashboard: a Dash app over a folder of runs (``rldiag dashboard [PATH]``).

Installed with rldiag as the top-level package ``app``; build one with :func:`app.app.create_app`.
"""
