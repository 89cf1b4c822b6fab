"""The advisor: measure a dataset's size and its similarity to the backbone's
source, name its cs231n scenario, and write (and run) the comparison that checks it.

measure.py  the measurements: counts, layer profile, learning curve, head confidence
rules.py    pure decisions: thresholds, scenario, recommended and contrasting strategies
advice.py   `advise`: the measurements on cached codes, advice.json, experiment.toml

advice = tl.advise("data/flowers", tl.BackboneSettings("vgg16"), run=True)
print(advice.recommendation.scenario, advice.outcome.text)
"""

from tl.advisor.advice import Advice, advise

__all__ = ["Advice", "advise"]
