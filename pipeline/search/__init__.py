"""Hyper-parameter search: an experiment file's `search` section, run with Optuna.

spec.py reads and checks the section, study.py keeps the Optuna studies (one per group, the
same budget each), trial.py runs one trial as an MLflow child run, run.py is what `pipeline
sweep` does with a search, and worker.py what `pipeline worker` and `--workers` processes do.
"""
