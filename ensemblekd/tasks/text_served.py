"""The served text student (task text), logged as an MLflow "model from code": MLflow keeps this file
with the model and runs it when the model is loaded, so serving needs torch, transformers, pandas
and mlflow, not ensemblekd. Texts in (a DataFrame column `text`, or a list of str), class
probabilities out: softmax at T = 1 of the student's logits, one column per class name, texts
cut to the tokenizer's model_max_length (the student's max_length) as in training.
"""

import mlflow
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel


class TextProbabilities(PythonModel):
    # The input is declared by the logged signature (a string column `text`), not by type hints on
    # predict; this MLflow 3 switch skips its type-hint wrapper (and its warning that there are none).
    _skip_type_hint_validation = True

    def load_context(self, context):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
        path = context.artifacts["model"]
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).eval()
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]

    def predict(self, context, model_input, params=None):
        texts = model_input["text"].tolist() if isinstance(model_input, pd.DataFrame) else list(model_input)
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.tokenizer.model_max_length,
                               return_tensors="pt")
        with torch.no_grad():
            probabilities = torch.softmax(self.model(**batch).logits.float(), dim=-1).numpy()
        return pd.DataFrame(probabilities, columns=self.labels)


mlflow.models.set_model(TextProbabilities())
