"""lm-eval task YAMLs for the paper's benchmarks on local data (see lsm_tasks.py for where the data goes)."""
