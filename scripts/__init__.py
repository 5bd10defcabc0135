"""Maintenance and GPU-diagnosis scripts, run from the repository root as ``python -m scripts.<name>`` (the shell
scripts as ``bash scripts/<name>.sh``). Tests never import from here."""
