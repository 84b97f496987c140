"""Evaluation: lm-eval adapter (harness), the paper's tasks (tasks/), NIAH (niah), scorers, the milestone sweep.

Submodules are imported on use: lm-eval and rouge-score are the optional `eval` extra.
"""
