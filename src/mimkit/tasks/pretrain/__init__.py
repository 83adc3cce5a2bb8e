"""`mimkit pretrain`: MAE / LocalMIM pretraining, FreezeOut; the recipe every MAE-style command builds on.

config.py  the command's flags (official MAE / LocalMIM names), presets and the layered config
setup.py   the run's pieces: model, data, optimiser, hooks, the step function
recipe.py  the recipe, top to bottom: config -> model, data, optimiser -> engine loop -> checkpoints, pictures
"""

from mimkit.tasks.pretrain.recipe import *  # noqa: F401,F403  (the command's surface: add_arguments, run, train, ...)
