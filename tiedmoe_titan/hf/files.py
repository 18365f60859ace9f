"""Hugging Face weight folders: safetensors files, sharded with an index or not."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping

import torch

from .errors import HFInteropError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsFolder(Mapping):
    """The tensors of a folder's safetensors files, read lazily by name."""

    def __init__(self, folder: str):
        from safetensors import safe_open

        index = os.path.join(folder, INDEX_FILE)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(folder, SINGLE_FILE)):
            weight_map = None
        else:
            raise HFInteropError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}: save the model with safe_serialization")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        self._handles = {name: safe_open(os.path.join(folder, name), framework="pt") for name in files}
        self._file_of = weight_map or {key: SINGLE_FILE for key in self._handles[SINGLE_FILE].keys()}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._handles[self._file_of[key]].get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._file_of[key]].get_slice(key).get_shape())


def write_safetensors(state: Mapping[str, torch.Tensor], folder: str, max_shard_size: str = "5GB") -> list[str]:
    """Write ``state`` as Hugging Face does (shards plus an index above ``max_shard_size``).

    Tensors may be views sharing storage (a bank's experts, or one bank written for
    several layers); each shard copies its own tensors when it is written, so memory
    holds the source state and one shard."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(dict(state), max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: state[name].clone() for name in names}, os.path.join(folder, filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}, "weight_map": split.tensor_to_filename}
        with open(os.path.join(folder, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
    return list(split.filename_to_tensors)


def make_output_folder(folder: str) -> None:
    """Create ``folder``; an existing non-empty one is refused rather than mixed into."""
    if os.path.isdir(folder) and os.listdir(folder):
        raise HFInteropError(f"{folder} exists and is not empty: choose a new output folder")
    os.makedirs(folder, exist_ok=True)
