"""`mimkit incremental`: class-incremental learning (seed 004): tasks of disjoint classes, a growing classifier,
anti-forgetting methods.

config.py   schema, flags and checks of `mimkit incremental`
data.py     class order, task splits, CIFAR-10/100 python layout, the CIFAR augmentation
model.py    backbone (CIFAR ResNet-18 or an MAE ViT encoder) + a head over the classes seen so far
methods.py  KD, EMA teachers, masked-feature distillation, reservoir replay: step function and loop hooks
report.py   accuracy matrix, metrics, printed table, CSV / JSON, the PNG
precise_bn.py  BatchNorm statistics recomputed after each task
resume.py   resuming a sequence mid-task; the checkpoints it reads
recipe.py   the recipe, top to bottom: config -> for each task: train -> evaluate all seen -> report
"""

from mimkit.tasks.incremental.recipe import *  # noqa: F401,F403  (the command's surface: add_arguments, run, ...)
