"""The rivals of the paper's method, each in one place, each as its authors' code runs it: credit
rules (credit.py), what the DRM scores (scores.py), objectives (objectives.py), searches
(search.py), reward losses and the noise ensemble (reward.py). Each script reaches them through one
door (policy.py for train_policy.py, search.py for sample.py, reward.py for train_reward.py)."""
