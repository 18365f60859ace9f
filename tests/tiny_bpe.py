"""A tiny Hugging Face BPE tokenizer folder, trained at test time (nothing downloaded).

Byte-level like OLMoE's and Qwen3's, so any text encodes; ``<|endoftext|>`` is the
eos, and by default there is no bos, as in those models.
"""

import json
import os

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu the of and".split()
EOS = "<|endoftext|>"


def make_hf_tokenizer(folder, vocab_size=320, bos=None, eos=EOS, extra_specials=()):
    """Train a byte-level BPE on a few lines and write tokenizer.json + tokenizer_config.json.

    ``bos``/``eos``: what tokenizer_config.json names (None: the key is null)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [EOS, *extra_specials] + ([bos] if bos and bos != EOS else [])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [" ".join(WORDS[i:] + WORDS[:i]) + f" number {i}." for i in range(len(WORDS))] * 4
    tok.train_from_iterator(lines, trainer)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": bos, "eos_token": eos, "add_bos_token": False}, f)
    return str(folder)
