"""Training text: corpora (fetched once and cached, or your own files), tokenizers, token files and batches.

    data = prepare_dataset("mix", tokenizer="bpe", vocab_size=16384)        # encodes once, then cached
    train = batch_iterator(data.train_dataset(), batch_size=32, seq_len=512, seed=0, start_step=step)
    val = eval_batches(data.val_dataset(), batch_size=32, seq_len=512, n_batches=8)

Batches are ``torch.int64 (batch, seq_len + 1)`` windows (inputs ``[:, :-1]``, targets ``[:, 1:]``).
"""

from .batches import TokenDataset, batch_iterator, eval_batches
from .corpus import Document, cache_dir, describe_source, load_corpus, shakespeare_text
from .split import split_documents
from .tokenizer import ByteTokenizer, load_tokenizer, train_tokenizer
from .tokens import PreparedData, prepare_dataset

__all__ = [
    "ByteTokenizer",
    "Document",
    "PreparedData",
    "TokenDataset",
    "batch_iterator",
    "cache_dir",
    "describe_source",
    "eval_batches",
    "load_corpus",
    "load_tokenizer",
    "prepare_dataset",
    "shakespeare_text",
    "split_documents",
    "train_tokenizer",
]
