"""Central evaluation of the global adapter.

Classification: the label words are scored at the answer position (argmax over the label words'
first tokens, or over whole label sequences when first tokens collide): accuracy and macro-F1.
Instruction data: loss/perplexity on the answer tokens, plus ROUGE-L of greedy generations on a
small sample (only when asked: generation is slow on CPU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F

from fl_dplora.data import Example, TaskData, _render_prompt, collate, encode_example
from fl_dplora.forward import answer_logits, attach_prefix, first_answer_positions, label_first_tokens


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """scikit-learn's macro-F1 over the classes that occur in the labels or the predictions (a class
    never predicted scores 0), so the number compares with published ones."""
    from sklearn.metrics import f1_score

    if not y_true:
        return 0.0
    return float(f1_score(list(y_true), list(y_pred), average="macro", zero_division=0))


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(reference: str, candidate: str) -> float:
    """ROUGE-L F1 of Google's rouge-score package (its tokenization, Porter stemming), as reported
    in the literature."""
    return float(_rouge_scorer().score(reference, candidate)["rougeL"].fmeasure)


@torch.no_grad()
def evaluate(model, tokenizer, task: TaskData, examples: Sequence[Example], max_len: int,
             batch_size: int = 16, rouge_samples: int = 0, system_prompt: str = "auto",
             prefix_cache: str = "off", with_predictions: bool = False) -> dict[str, float]:
    """Loss/perplexity on the answer tokens; accuracy, macro-F1 and the majority rate for classification.
    `with_predictions` adds each example's predicted label index and label probabilities."""
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    encoded = attach_prefix(model, [encode_example(tokenizer, ex, max_len, system_prompt) for ex in examples], prefix_cache)
    label_first = label_first_tokens(tokenizer, task.label_words) if task.kind == "classification" else []
    distinct_first = len(set(label_first)) == len(label_first)

    total_loss, total_tokens, scored, trues = 0.0, 0, [], []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad).items()}
        logits, targets, rows = answer_logits(model, batch)
        total_loss += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
        total_tokens += int(targets.numel())
        if task.kind == "classification" and distinct_first:
            scored.append(logits[first_answer_positions(rows)][:, label_first].float().cpu())
            trues += [ex.label for ex in examples[start : start + batch_size]]
    if task.kind == "classification" and not distinct_first:
        scored = [_score_full_labels(model, tokenizer, task, examples, max_len, batch_size, system_prompt)]
        trues = [e.label for e in examples]
    scores = torch.cat(scored) if scored else torch.zeros(0, len(task.label_words))
    preds = scores.argmax(-1).tolist()

    loss = total_loss / max(1, total_tokens)
    out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "num_examples": len(examples)}
    if task.kind == "classification":
        out["accuracy"] = sum(int(p == t) for p, t in zip(preds, trues)) / max(1, len(trues))
        out["macro_f1"] = macro_f1(trues, preds)
        # the accuracy of always answering the most frequent label of these very examples
        out["majority_rate"] = max(trues.count(c) for c in set(trues)) / max(1, len(trues)) if trues else 0.0
        if with_predictions:
            out["predictions"] = preds
            out["probabilities"] = scores.softmax(-1).tolist()
    if rouge_samples and task.kind == "generation":
        out["rouge_l"] = _rouge_on_sample(model, tokenizer, examples[:rouge_samples], max_len, system_prompt)
    return out


def _score_full_labels(model, tokenizer, task, examples, max_len, batch_size, system_prompt="auto") -> torch.Tensor:
    """Sum of log-probs of each whole label sequence; used when label words share a first token."""
    scores = torch.zeros(len(examples), len(task.label_words))
    for j, word in enumerate(task.label_words):
        for start in range(0, len(examples), batch_size):
            chunk = [Example(e.prompt, word) for e in examples[start : start + batch_size]]
            enc = [encode_example(tokenizer, e, max_len, system_prompt) for e in chunk]
            device = next(model.parameters()).device
            batch = {k: v.to(device) for k, v in collate(enc, tokenizer.pad_token_id).items()}
            logits, targets, rows = answer_logits(model, batch)
            lp = -F.cross_entropy(logits.float(), targets, reduction="none")
            scores[start : start + len(chunk), j] = torch.zeros(len(chunk)).index_add(0, rows.cpu(), lp.cpu())
    return scores


def generate_answer(model, tokenizer, ex: Example, max_len: int, system_prompt: str = "auto",
                    max_new_tokens: int = 48) -> str:
    """Greedy continuation of an example's prompt (on the model's device)."""
    device = next(model.parameters()).device
    ids = tokenizer(_render_prompt(tokenizer, ex.prompt, system_prompt), add_special_tokens=False,
                    return_tensors="pt").input_ids[:, -max_len:].to(device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _rouge_on_sample(model, tokenizer, examples: Sequence[Example], max_len: int, system_prompt: str = "auto") -> float:
    vals = [rouge_l(ex.answer, generate_answer(model, tokenizer, ex, max_len, system_prompt)) for ex in examples]
    return sum(vals) / max(1, len(vals))
