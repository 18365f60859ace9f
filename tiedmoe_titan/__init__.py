"""tiedmoe_titan: tied-expert Mixture-of-Experts on torchtitan.

Importing the package makes torchtitan usable on CPU (see ``cpu.py``) and registers
the train specs ``tiedmoe_qwen3`` and ``tiedmoe_olmoe`` with torchtitan, so a
torchtitan TOML with ``[model] name = "tiedmoe_olmoe"`` builds a tied model.
"""

from . import cpu

cpu.enable()

from .spec import register_train_specs  # noqa: E402

register_train_specs()
