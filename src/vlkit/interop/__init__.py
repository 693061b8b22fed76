"""Weight formats: vlkit's own directories (native.py); Hugging Face and open_clip converters join here."""

from vlkit.interop.native import ModelFormatError, load_model, load_state_dict, save_model

__all__ = ["ModelFormatError", "load_model", "load_state_dict", "save_model"]
