"""Our BPE tokenizer as a Hugging Face fast tokenizer: tokenizer.json + tokenizer_config.json.

Ours is GPT-2's byte-level BPE, so it maps onto `tokenizers` pieces one for one: a BPE model with our
vocab and our merges in rank order; the ByteLevel pre-tokenizer, whose regex is GPT-2's pattern, the
one ours splits with (tinylm/tokenizer/pretokenize.py), and no added prefix space (ours adds none);
the ByteLevel decoder; and our special tokens as added tokens, which cut the text before the regex
runs, as `PreTokenizer.split_specials` does. tests/test_export.py proves the ids equal on the whole
validation sample.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from tinylm.files import write_json, write_text
from tinylm.tokenizer.bpe import EOT, Tokenizer, token_to_str


def hf_tokenizer(tokenizer: Tokenizer) -> HFTokenizer:
    """The `tokenizers` equivalent of `tokenizer`: the same ids for every text, the same text back."""
    vocab = json.loads(tokenizer.vocab_json())  # token string -> id, special tokens spelled as they are
    merges = [(token_to_str(left), token_to_str(right)) for left, right in tokenizer.merges]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    # GPT-2's post-processor: it only maps offsets back to the text, and adds no token.
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.get)
    # normalized=False: matched on the raw text, as ours are; they are in the vocab, so keep their ids.
    hf.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    return hf


def write_hf_tokenizer(tokenizer: Tokenizer, directory: Path, model_max_length: int) -> None:
    """tokenizer.json and tokenizer_config.json in `directory`, so that `AutoTokenizer.from_pretrained`
    gives a fast tokenizer with <|endoftext|> as bos/eos and no token added to what it encodes."""
    write_text(directory / "tokenizer.json", hf_tokenizer(tokenizer).to_str(pretty=True) + "\n")
    write_json(directory / "tokenizer_config.json", {
        # The generic fast class reads tokenizer.json as written; a model-specific class (GPT2Tokenizer,
        # LlamaTokenizer) would rebuild its own pipeline around our vocab instead.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        # We train documents as `story <|endoftext|>`: no BOS before, no EOS added after.
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        # Decoding gives the exact text back, not GPT-2's "cleaned up" spaces before punctuation.
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    })
