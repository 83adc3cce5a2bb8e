"""`mimkit continual`: continual MAE pretraining over a domain sequence, with forgetting measured.

config.py  the command's flags (seed 000's names), schema and checks
stages.py  one stage per domain: its config, the hook that records it, the resumable sequence state
eval.py    held-out reconstruction and k-NN of every stage on every domain
report.py  the stage x domain matrices, forgetting / BWT, the heatmap, results files
recipe.py  the recipe, top to bottom: config -> for each domain: pretrain stage -> evaluate -> report
"""

from mimkit.tasks.continual.recipe import *  # noqa: F401,F403  (the command's surface: add_arguments, run, ...)
