"""tiedmoe_titan: tied-expert Mixture-of-Experts on torchtitan.

Importing the package does nothing by itself: ``tiedmoe_titan.tying`` is pure Python.
``tiedmoe_titan.models`` makes torchtitan's models run on CPU (``compat.enable``), and
``tiedmoe_titan.spec`` registers the train specs ``tiedmoe_qwen3``, ``tiedmoe_olmoe``
and ``tiedmoe_deepseek`` with torchtitan, so that torchtitan's own trainer builds a tied
model from a TOML with ``[model] name = "tiedmoe_olmoe"`` when given
``--experimental.custom_import tiedmoe_titan.spec``.
"""
