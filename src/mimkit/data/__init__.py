"""Data: folders, built-in sets, transforms; `open_dataset` is the entry point tasks call."""
