"""Meet the tools people already run: Prometheus exposition and experiment-tracker exporters."""
