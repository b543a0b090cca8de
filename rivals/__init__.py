"""The rivals of the paper's method, each in one place, each as its authors' code runs it: credit
rules (credit.py), what the DRM scores (scores.py), searches (search.py), reward losses and the
noise ensemble (reward.py). Each kind has one table; a new rival is one function there and one
row."""
