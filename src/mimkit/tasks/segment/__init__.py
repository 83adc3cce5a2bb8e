"""`mimkit segment`: UperNet on an MAE encoder (MMSegmentation's recipe), mIoU, --eval and --predict.

config.py  the command's flags, schema and checks, the sliding window
setup.py   the segmenter from a checkpoint or encoder, run settings of a checkpoint
infer.py   whole / sliding-window inference, predictions and overlays
eval.py    --eval / --predict from a checkpoint alone; the per-class report and results.json
recipe.py  the recipe, top to bottom: config -> model, data -> engine loop with evaluation -> report
"""

from mimkit.tasks.segment.recipe import *  # noqa: F401,F403  (the command's surface: add_arguments, run, ...)
