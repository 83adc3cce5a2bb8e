"""mimkit.models: MAE-family models, the registry and weight interop."""

from mimkit.models.mae import FREEZE_MODES, LOSS_MODES, MaskedAutoencoderViT
from mimkit.models.registry import create_model, list_models, register_model

__all__ = ["MaskedAutoencoderViT", "create_model", "list_models", "register_model", "FREEZE_MODES", "LOSS_MODES"]
