"""Data: sources (jsonl, Parquet, ArrayRecord, TFDS, synthetic), tokenizers, IFT formats, packing.

Entry point for training: `make_batch_iterator(data_cfg, tokenizer, seq_len=, batch_size=, seed=)`.
"""

from lora_jax.data.errors import DataError
from lora_jax.data.formats import (TEMPLATES, detect_format, encode_cpt_example,
                                   encode_ift_example, format_prompt)
from lora_jax.data.packing import pack_documents
from lora_jax.data.pipeline import BatchIterator, make_batch_iterator
from lora_jax.data.sources import load_records
from lora_jax.data.tokenizers import ByteTokenizer, check_vocab, load_tokenizer

__all__ = [
    "DataError", "TEMPLATES", "detect_format", "encode_cpt_example", "encode_ift_example",
    "format_prompt", "pack_documents", "BatchIterator", "make_batch_iterator", "load_records",
    "ByteTokenizer", "check_vocab", "load_tokenizer",
]
