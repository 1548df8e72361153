"""task: token — causal LMs distilled token by token from compressed top-k targets.

Rows are sequences of token ids. A teacher's logits at position j predict token j + 1, so a
sequence of L tokens gives L − 1 stored positions: per position the top-k log-probs of the full
softmax, their ids and the tail mass (ensemblekd.topk). The student trains on every position
whose next token is a target (data.loss_mask, padding excluded) with topk.token_loss; the
strategy's per-token teacher weights come from the same rules as for classification, fed the
sparse targets through topk.rule_inputs. Teachers, student and the store share one vocabulary
(data.vocab_size) and its tokenizer hash (ensemblekd.lm.vocab_hash), recorded in the manifest.

The task is a package of its parts: `codec` (the label shards, written and read), `vocabulary` (the
one vocabulary and tokenizer every model shares), `batches` (the reader: target positions and their
teachers' targets), `served` (a Hugging Face student's save_pretrained directory and its MLflow
text-generation model), and `task` (the Token class the stages call: config checks, labelling, the
objective, evaluation with its report columns, and the served model).
"""

from ensemblekd.tasks.token.batches import (
    Sequences,
    TokenBatch,
    make_batch,
    model_accuracy,
    read_token_split,
    student_positions,
)
from ensemblekd.tasks.token.codec import CODECS, LEVELS, TopK, ZSTD_LEVEL, decode, encode, parquet_options
from ensemblekd.tasks.token.task import NextTokenProbabilities, Token
from ensemblekd.tasks.token.vocabulary import shared_vocabulary, tokenizer_path, vocabulary

__all__ = ["CODECS", "LEVELS", "ZSTD_LEVEL", "NextTokenProbabilities", "Sequences", "Token", "TokenBatch", "TopK",
           "decode", "encode", "make_batch", "model_accuracy", "parquet_options", "read_token_split",
           "shared_vocabulary", "student_positions", "tokenizer_path", "vocabulary"]
