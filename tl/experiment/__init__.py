"""Experiments: one file compares backbones, layers, classifiers and fine-tuning.

spec.py     the experiment file (TOML): its tables, checked before any work
splits.py   one split of the images for every strategy
cache.py    the content-addressed feature cache that experiments share
plan.py     the steps, their keys, and which are done
runner.py   `run`: the steps in order, each skipped when done, then the report
report.py   leaderboard, tidy results, report.html, and their statistics

result = tl.experiment.run("experiments/flowers.toml")
print(result.leaderboard.head(), result.report)
"""

from tl.experiment.cache import FeatureCache
from tl.experiment.runner import ExperimentResult, run
from tl.experiment.spec import ExperimentSpec, load_spec

__all__ = ["ExperimentResult", "ExperimentSpec", "FeatureCache", "load_spec", "run"]
