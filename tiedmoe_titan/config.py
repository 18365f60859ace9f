"""The project's extension of torchtitan's job config.

torchtitan merges this module's ``JobConfig`` into its own when a recipe names it
(``[job] custom_config_module = "tiedmoe_titan.config"``, which ``tiedmoe-train`` and
``tiedmoe-plan`` pass for you), so recipes gain two sections, both overridable from
the command line like any torchtitan key (``--tying.group_size 4``):

* ``[tying]``: which layers share a bank of routed experts (see ``tiedmoe_titan.tying``);
* ``[routing]``: the router's training objective (aux loss, z-loss, expert bias).
"""


from dataclasses import dataclass, field

from .models.family import RoutingConfig
from .tying import TieConfig

CONFIG_MODULE = __name__


@dataclass
class JobConfig:
    tying: TieConfig = field(default_factory=TieConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)


def parse_recipe(recipe: str, overrides: list[str] = ()):
    """A torchtitan job config (with our sections) from a recipe file and CLI overrides."""
    from torchtitan.config import ConfigManager

    args = ["--job.config_file", recipe, "--job.custom_config_module", CONFIG_MODULE, *overrides]
    return ConfigManager().parse_args(args)
