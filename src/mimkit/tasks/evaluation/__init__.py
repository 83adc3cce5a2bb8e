"""What the evaluation commands (knn, rankme, linprobe, finetune, and segment's encoder) share.

common.py    encoders from any checkpoint, labelled data, results files, the classifier evaluation
config.py    the classifier commands' schemas and flags (linprobe, finetune), their checks
features.py  frozen-encoder feature extraction
"""
