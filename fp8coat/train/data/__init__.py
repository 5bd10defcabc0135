"""Training text: corpora (fetched once and cached, or your own files), tokenizers, token files and batches.

    data = prepare_dataset("mix", tokenizer="bpe", vocab_size=16384)        # encodes once, then cached
    train = batch_iterator(data.train_dataset(), batch_size=32, seq_len=512, seed=0, start_step=step)
    val = eval_batches(data.val_dataset(), batch_size=32, seq_len=512, n_batches=8)

Batches are ``torch.int64 (batch, seq_len + 1)`` windows (inputs ``[:, :-1]``, targets ``[:, 1:]``).

Image-text data for vision-language models (:mod:`.vlm_batches`; format, masking and order in ``docs/vlm_data.md``):

    data = prepare_image_text("synthetic", processor, seq_len=None, val_fraction=0.02, seed=0)
    train = data.train_batches(batch_size=16, start_step=step)         # dicts of tensors for model(**batch)
    val = data.val_batches(batch_size=16, n_batches=8)
"""

from .batches import TokenDataset, batch_iterator, eval_batches
from .chat_format import ChatFormat, chat_format_for
from .corpus import Document, cache_dir, describe_source, load_corpus, shakespeare_text
from .image_records import ImageTextRecord, load_image_records, record_texts
from .image_sources import load_image_text
from .split import split_documents
from .synthetic_images import digits_dataset, synthetic_dataset
from .tokenizer import ByteTokenizer, load_tokenizer, train_tokenizer
from .tokens import PreparedData, prepare_dataset
from .vlm_batches import ImageTextData, batch_rows, batch_to, prepare_image_text
from .vlm_tokenizer import vlm_tokenizer

__all__ = [
    "ByteTokenizer",
    "ChatFormat",
    "Document",
    "ImageTextData",
    "ImageTextRecord",
    "PreparedData",
    "TokenDataset",
    "batch_iterator",
    "batch_rows",
    "batch_to",
    "cache_dir",
    "chat_format_for",
    "describe_source",
    "digits_dataset",
    "eval_batches",
    "load_corpus",
    "load_image_records",
    "load_image_text",
    "load_tokenizer",
    "prepare_dataset",
    "prepare_image_text",
    "record_texts",
    "shakespeare_text",
    "split_documents",
    "synthetic_dataset",
    "train_tokenizer",
    "vlm_tokenizer",
]
