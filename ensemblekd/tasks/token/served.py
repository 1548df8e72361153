"""What serves a token student without ensemblekd when it is a Hugging Face causal LM (a CausalLM
of ensemblekd.lm: tiny_gpt2, tiny_llama, from_pretrained): its save_pretrained directory beside
student.pt (HF_STUDENT_DIR, with the shared tokenizer when there is one), and the MLflow model
logged for the run: MLflow's own transformers flavor, a text-generation pipeline over that same
directory (texts in, generated texts out). A student of any other kind, or one trained without a
tokenizer (synthetic ids), is logged as next-token probabilities instead (Task.served)."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from ensemblekd.config import Config
from ensemblekd.lm import hf_causal_lm, load_tokenizer, save_causal_lm
from ensemblekd.models import load_student
from ensemblekd.tasks.base import HF_STUDENT_DIR, save_hf_student
from ensemblekd.tasks.token.batches import read_token_split
from ensemblekd.tasks.token.vocabulary import tokenizer_path

PIP_REQUIREMENTS = ["torch", "transformers"]   # what loading the logged model needs (not ensemblekd)
# The served model decodes greedily, as the report's continuations do. Said to the pipeline at every
# call: transformers' text-generation pipeline samples (temperature 0.7) unless told otherwise, and a
# generation config cannot say do_sample=False (a default value, left out of what the pipeline reads).
GREEDY = {"do_sample": False}


def save_student_hf(cfg: Config, student_uri: str) -> str | None:
    """The student at student_uri as a save_pretrained directory in HF_STUDENT_DIR beside it, with
    the shared tokenizer (data.tokenizer, a directory or a .gguf, saved as a tokenizer directory)
    and its special ids in the configs; its generation config stops at evaluate.max_new_tokens new
    tokens, as the report's continuations do. None when the student is no Hugging Face causal LM."""
    student = load_student(cfg.student, student_uri)
    if hf_causal_lm(student) is None:
        return None
    path = tokenizer_path(cfg)
    tokenizer = load_tokenizer(path) if path else None
    return save_hf_student(student_uri, lambda directory: save_causal_lm(student, directory, tokenizer,
                                                                            cfg.evaluate.max_new_tokens))


def generates_text(cfg: Config, student: torch.nn.Module) -> bool:
    """Whether the student is served as a text generator: a Hugging Face causal LM with a tokenizer."""
    return tokenizer_path(cfg) is not None and hf_causal_lm(student) is not None


def example_prompts(cfg: Config, tokenizer: Any) -> list[str]:
    """The logged input example: evaluate.prompts (two at most), else the start of a validation sequence."""
    if cfg.evaluate.prompts:
        return list(cfg.evaluate.prompts[:2])
    tokens, lengths, _ = read_token_split(cfg, cfg.data.val)
    return [tokenizer.decode(tokens[0, :min(8, int(lengths[0]))].tolist())]


def outputs_text(tags: dict[str, str]) -> dict[str, str]:
    """The logged model's tags, saying it outputs text where they say the default, probabilities."""
    return {key: "text" if value == "probabilities" else value for key, value in tags.items()}


def log_text_generation(cfg: Config, student: torch.nn.Module, name: str, tags: dict[str, str]) -> None:
    """Log the student in the active MLflow run as the model `name`, with MLflow's transformers
    flavor: a text-generation pipeline over the directory save_student_hf writes (a string column of
    prompts in; each prompt and its greedy continuation out, evaluate.max_new_tokens tokens at most,
    ending at the tokenizer's end-of-sequence token).

    Nothing is downloaded and MLflow has nothing to warn of: the pipeline is made from a local
    directory, the model card is given (so MLflow asks the Hub for none; it declares no license, the
    one thing MLflow would warn of then) and so are the pip requirements (none inferred: MLflow's
    own default list for transformers names torchvision, which is not installed)."""
    import mlflow
    from huggingface_hub import ModelCard
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    path = tokenizer_path(cfg)
    assert path is not None  # generates_text(cfg, student)
    tokenizer = load_tokenizer(path)
    prompts = example_prompts(cfg, tokenizer)
    teachers = ", ".join(t.name for t in cfg.teachers)
    card = ModelCard("---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags: [ensemblekd]\n---\n"
                     f"A causal LM distilled by ensemblekd (task token) from the teachers {teachers}. "
                     "Its license follows from theirs and from its training text's.\n")
    signature = ModelSignature(Schema([ColSpec("string")]), Schema([ColSpec("string")]))
    with tempfile.TemporaryDirectory() as tmp:
        directory = os.path.join(tmp, HF_STUDENT_DIR)   # MLflow records it as the source model's name
        save_causal_lm(student, directory, tokenizer, cfg.evaluate.max_new_tokens)
        generator = pipeline("text-generation", tokenizer=AutoTokenizer.from_pretrained(directory, local_files_only=True),
                             model=AutoModelForCausalLM.from_pretrained(directory, local_files_only=True))
        mlflow.transformers.log_model(generator, name=name, task="text-generation", signature=signature,
                                      input_example=prompts, model_config=GREEDY, model_card=card,
                                      pip_requirements=PIP_REQUIREMENTS, tags=outputs_text(tags))
