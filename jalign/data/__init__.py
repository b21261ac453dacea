from jalign.data.formats import DataError, Example, load_sft_examples
from jalign.data.pipeline import build_rows, eval_batches, train_dataset
from jalign.data.tokenizers import Tokenizer, TokenizerError, load_tokenizer

__all__ = ["DataError", "Example", "Tokenizer", "TokenizerError", "build_rows", "eval_batches",
           "load_sft_examples", "load_tokenizer", "train_dataset"]
