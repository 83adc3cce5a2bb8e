"""One module per command, each a thin composition of config, data, models and the engine."""
