"""Train specs of the tied families, registered with torchtitan's registry when this
module is imported (as torchtitan's own model packages register theirs)."""

from __future__ import annotations

from torchtitan.components.loss import build_cross_entropy_loss
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.protocols.train_spec import TrainSpec, get_train_spec, register_train_spec

from .data import build_local_text_dataloader, build_local_validator
from .models.flavor_file import FlavorTable
from .metrics import build_tied_metrics_processor
from .models import FAMILIES
from .optim import build_tied_optimizers
from .parallelize import parallelize_tied
from .tokenizer import build_tokenizer

SPEC_PREFIX = "tiedmoe_"


def train_spec(family: str) -> TrainSpec:
    model_cls, flavors = FAMILIES[family]
    return TrainSpec(
        model_cls=model_cls,
        model_args=FlavorTable(flavors),  # named flavors, or a path to a flavor .json (models/flavor_file.py)
        parallelize_fn=parallelize_tied,
        pipelining_fn=None,
        build_optimizers_fn=build_tied_optimizers,
        build_lr_schedulers_fn=build_lr_schedulers,
        build_dataloader_fn=build_local_text_dataloader,
        build_tokenizer_fn=build_tokenizer,
        build_loss_fn=build_cross_entropy_loss,
        build_validator_fn=build_local_validator,
        build_metrics_processor_fn=build_tied_metrics_processor,
    )


def register_train_specs() -> None:
    for family in FAMILIES:
        name = SPEC_PREFIX + family
        try:
            get_train_spec(name)
        except ValueError:
            register_train_spec(name, train_spec(family))


register_train_specs()
