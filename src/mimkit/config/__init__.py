"""One config system: OmegaConf structured schemas, YAML/JSON files, familiar flags and dotted overrides.

Layers, later wins: schema defaults <- preset (the demo when no data path is given anywhere, a CPU-sized one for
built-in data) <- config file <- command-line flags <- `section.key=value` overrides. The section layout is seed
001's (`model / optimization / schedule / data / checkpointing / logging / misc`), so its JSON files load as they are.

One model name is one architecture: `model.kwargs` belong to the `model.type` named beside them, so a layer that
names another model drops the kwargs of the layers beneath it (a preset's kwargs never apply under a user's
`--model`), and a layer taken from a checkpoint (origin starting with ARCH_ORIGIN) replaces them whole.

schema.py  the sections and their defaults, value constraints
layers.py  files and presets read, layers merged and validated, run folders named
flags.py   the Flag table type, argparse registration, the layered builder every command uses, check_rules
"""

from mimkit.config.layers import (  # noqa: F401
    ARCH_ORIGIN, PRESET_DIR, RUNS_DIR, _get, build_config, float_list, input_size, load_file, new_run_dir,
    note_output, note_results, parse_dotlist, recording_outputs, resolve_output_dir, same_model, save_config,
    to_container, validate,
)
from mimkit.config.schema import *  # noqa: F401,F403
from mimkit.config.schema import CONSTRAINTS  # noqa: F401
from mimkit.config.flags import (  # noqa: F401  (after layers and schema: it builds on both)
    GRAD_CKPT_FLAG, STRATEGY_FLAG, TRACKING_FLAGS, TRAINING_FLAGS, ArgParser, Flag, add_arguments, check_rules,
    config_from_args, parse_command, str_list, take_leftovers,
)
