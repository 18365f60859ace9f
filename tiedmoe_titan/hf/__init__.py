"""Hugging Face interop: import OLMoE / Qwen3-MoE checkpoints, export tied models.

* ``tiedmoe-export CHECKPOINT OUTDIR --format hf-untied|hf-tied`` (``export.py``)
* ``tiedmoe-import HF_DIR OUTDIR [--tie-group-size G ...]`` (``importer.py``)
* ``load_tied_pretrained(path)`` rebuilds an hf-tied export as a transformers model
  whose tied layers share one experts module (``tied_loader.py``).

Written and tested against ``transformers==5.23.0`` (the ``hf`` extra); see docs/hf.md.
Importing this package does not import transformers: the core package does not need it.
"""

from .errors import HFInteropError
from .tied_loader import load_tied_pretrained

__all__ = ["HFInteropError", "load_tied_pretrained"]
