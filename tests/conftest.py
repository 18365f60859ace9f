import copy

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

import tiedmoe_titan.spec  # noqa: F401  (CPU support, train specs)
from tiedmoe_titan.models import FAMILIES
from tiedmoe_titan.testing.shard_check import CheckConfig, reference
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


def ce_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def tokens(batch=2, seq=32, vocab=2048):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


def assert_equals_torchtitan_model(ours, theirs, seed: int) -> None:
    """An untied model (G=1) is torchtitan's: the same parameter and buffer names, the
    same init from the same seed (``ours`` was initialised with ``seed``), bit-equal
    logits and gradients equal to rounding."""
    torch.manual_seed(seed)
    with torch.no_grad():
        theirs.init_weights()
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert ours_sd.keys() == theirs_sd.keys()
    for k in ours_sd:
        torch.testing.assert_close(ours_sd[k], theirs_sd[k], rtol=0, atol=0, msg=k)

    x = tokens()
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    ce_loss(ours(x), x).backward()
    ce_loss(theirs(x), x).backward()
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs_params[name].grad, rtol=1e-6, atol=1e-7, msg=name)


def assert_tied_equals_untied_with_copied_experts(tied, untied) -> None:
    """Give ``untied`` (same shape, one expert set per layer) the tied model's weights,
    each layer's experts copied from the bank it reads; then logits must agree and each
    bank's gradient must equal the sum of its copies' gradients."""
    layout = tied.model_args.tie_layout()
    banks = {layer: tied.layers[str(layer)].moe.experts for layer in layout.moe_layers}
    with torch.no_grad():
        tied_params = dict(tied.named_parameters())
        for name, p in untied.named_parameters():
            if ".moe.experts." in name:
                layer, weight = int(name.split(".")[1]), name.rsplit(".", 1)[1]
                p.copy_(getattr(banks[layer], weight))
            else:
                p.copy_(tied_params[name])

    x = tokens()
    torch.testing.assert_close(tied(x), untied(x), rtol=1e-6, atol=1e-6)
    ce_loss(tied(x), x).backward()
    ce_loss(untied(x), x).backward()
    untied_params = dict(untied.named_parameters())
    for name, p in tied.named_parameters():
        if ".moe.experts." in name:
            owner, weight = int(name.split(".")[1]), name.rsplit(".", 1)[1]
            copies = [untied_params[f"layers.{layer}.moe.experts.{weight}"].grad for layer in layout.bank_of(owner).layers]
            torch.testing.assert_close(p.grad, torch.stack(copies).sum(0), rtol=1e-5, atol=1e-7, msg=name)
        else:
            torch.testing.assert_close(p.grad, untied_params[name].grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _root_logger_handlers():
    """A test that runs the trainer in-process calls torchtitan's ``init_logger``, which
    attaches a handler to the stream pytest captured for that test; once the test ends the
    stream is closed, and the next log line (any test's) prints a "Logging error" to stderr."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def load_all(checkpoint_dir) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint (model, optimizer, expert bias, ...)."""
    metadata = FileSystemReader(str(checkpoint_dir)).read_metadata()
    state = {
        key: torch.empty(md.size, dtype=md.properties.dtype)
        for key, md in metadata.state_dict_metadata.items()
        if hasattr(md, "size")
    }
    dcp.load(state, checkpoint_id=str(checkpoint_dir), no_dist=True)
    return state


@pytest.fixture(autouse=True, scope="session")
def _data_cache(tmp_path_factory):
    """Text inputs are tokenized into a cache (tiedmoe_titan.data.text_cache): the tests'
    own, shared by the session (the bundled corpus is tokenized once), inherited by the
    trainers they start."""
    import os

    os.environ["TIEDMOE_DATA_CACHE"] = str(tmp_path_factory.mktemp("data-cache"))


def assert_matches_single_process(
    result: dict, fields: dict, *, loss_rel: float, state_atol: float, grad_rel: float | None = None
) -> None:
    """A parallel layout's run (``shard_check``) against one process training the same
    weights on the same tokens: losses, first-step gradients (each within ``grad_rel``
    of its largest entry; skipped when None) and final weights."""
    ref = reference(CheckConfig.from_fields(fields))
    assert result["losses"] == pytest.approx(ref["losses"], rel=loss_rel)
    if grad_rel is not None:
        assert result["grads"].keys() == ref["grads"].keys()
        for name, grad in ref["grads"].items():
            scale = grad.abs().max().item() + 1e-12
            assert (result["grads"][name] - grad).abs().max().item() / scale < grad_rel, name
    assert result["state"].keys() == ref["state"].keys()
    for name, value in ref["state"].items():
        torch.testing.assert_close(result["state"][name], value, rtol=0, atol=state_atol, msg=name)
