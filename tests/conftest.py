import copy

import pytest
import torch

import tiedmoe_titan  # noqa: F401  (CPU support, train specs)
from tiedmoe_titan.models import FAMILIES
from tiedmoe_titan.tying import TieConfig


def flavor_args(family: str, flavor: str = "debug", tying: TieConfig | None = None, **routing):
    """A private copy of a flavor's args (flavors are shared, torchtitan mutates them)."""
    args = copy.deepcopy(FAMILIES[family][1][flavor])
    args.tying = tying or TieConfig()
    for key, value in routing.items():
        setattr(args.routing, key, value)
    return args


def build_model(family: str, tying: TieConfig | None = None, seed: int = 0, **routing):
    args = flavor_args(family, tying=tying, **routing)
    model = FAMILIES[family][0](args)
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_weights()
    return model


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
