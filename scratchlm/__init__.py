"""scratchlm: a decoder-only GPT built from scratch, from raw text to modern inference.

The package follows the data flow of the learning path:

    raw text -> scratchlm.data (prepare, splits, manifests)
             -> scratchlm.tokenizers (char, byte, byte-level BPE)
             -> scratchlm.data (token shards, batch loader)
             -> scratchlm.models (bigram baselines, ...)

Each stage is a plain Python API; ``scratchlm.cli`` only parses arguments and calls it.
"""

__version__ = "0.1.0"
