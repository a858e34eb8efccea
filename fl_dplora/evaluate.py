"""Central evaluation of the global adapter.

Classification: the label words are scored at the answer position (argmax over the label words'
first tokens, or over whole label sequences when first tokens collide): accuracy and macro-F1.
Generation: loss/perplexity on the answer tokens (the first reference), and, when asked
(`max_new_tokens` > 0), greedy generations of every example, batched with the KV cache, scored by
sacrebleu's corpus BLEU against all references of each input (its default 13a tokenization, cased)
and rouge-score's ROUGE-L F1 against the best reference (Porter stemming).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F

from fl_dplora.config import RunConfig
from fl_dplora.data import Example, TaskData, collate, encode_example, render_prompt
from fl_dplora.forward import answer_logits, answer_states, first_answer_positions, label_first_tokens
from fl_dplora.frozen_prefix import attach_prefix, features_key


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


def rouge_l_best(references: Sequence[str], candidate: str) -> float:
    """ROUGE-L F1 against the reference it matches best (rouge-score's `score_multi`)."""
    return float(_rouge_scorer().score_multi(list(references), candidate)["rougeL"].fmeasure)


BLEU_TOKENIZE = "13a"  # sacrebleu's default (mteval-v13a), cased: the setting published E2E numbers use


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu corpus BLEU (0-100) with every reference of each input; inputs may have different
    numbers of references (sacrebleu skips the None that pad the shorter reference lists)."""
    from sacrebleu.metrics import BLEU

    if not hypotheses:
        return 0.0
    width = max(len(r) for r in references)
    streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(width)]
    return float(BLEU(tokenize=BLEU_TOKENIZE).corpus_score(list(hypotheses), streams).score)


BOOTSTRAP_RESAMPLES = 200


def paired_bleu_p_value(baseline: Sequence[str], system: Sequence[str], references: Sequence[Sequence[str]],
                        resamples: int = 1000) -> float:
    """p-value of "system's corpus BLEU differs from baseline's" on the same inputs: sacrebleu's paired
    bootstrap resampling (Koehn 2004; its fixed seed, 12345)."""
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    if list(baseline) == list(system):  # sacrebleu's test gives 1/(resamples+1) here: no difference at all
        return 1.0
    width = max(len(r) for r in references)
    streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(width)]
    test = PairedTest([("baseline", list(baseline)), ("system", list(system))], {"BLEU": BLEU(tokenize=BLEU_TOKENIZE)},
                      streams, test_type="bs", n_samples=resamples)
    _, scores = test()
    return float(scores["BLEU"][1].p_value)


def bleu_bootstrap_se(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                      resamples: int = BOOTSTRAP_RESAMPLES) -> float | None:
    """Standard error of corpus BLEU: the std of BLEU over inputs resampled with replacement (fixed
    seed, so a rerun reports the same SE). Corpus BLEU is not a mean of per-input scores, hence the
    bootstrap. Each input's n-gram statistics are extracted once and resamples sum them, as sacrebleu's
    own significance tests do (re-scoring every resample re-tokenized ~1,900 references 200 times: 35 s
    for the 215 test MRs)."""
    from sacrebleu.metrics import BLEU

    n = len(hypotheses)
    if n < 2:
        return None
    width = max(len(r) for r in references)
    streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(width)]
    metric = BLEU(tokenize=BLEU_TOKENIZE)
    stats = torch.tensor(metric._extract_corpus_statistics(list(hypotheses), streams), dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    draws = [metric._compute_score_from_stats(stats[torch.randint(n, (n,), generator=g)].sum(0).tolist()).score
             for _ in range(resamples)]
    return float(torch.tensor(draws, dtype=torch.float64).std())


_EVAL_STATES: OrderedDict[str, list[torch.Tensor]] = OrderedDict()  # per process, like the prefix cache


@torch.no_grad()
def evaluate(model, tokenizer, task: TaskData, examples: Sequence[Example], max_len: int,
             batch_size: int = 16, max_new_tokens: int = 0, system_prompt: str = "auto",
             prefix_cache: str = "off", with_predictions: bool = False, keep_states: bool = False) -> dict[str, float]:
    """Loss/perplexity on the answer tokens; accuracy, macro-F1 and the majority rate for classification;
    BLEU and ROUGE-L of greedy generations for generation when `max_new_tokens` > 0.
    `with_predictions` adds each example's predicted label index and label probabilities (classification)
    or generated text (generation). `keep_states`: keep the answer states of these examples for the
    next call (a set scored every round); a call with unchanged decoder weights then reuses them."""
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    encoded = attach_prefix(model, [encode_example(tokenizer, ex, max_len, system_prompt) for ex in examples], prefix_cache)
    label_first = label_first_tokens(tokenizer, task.label_words) if task.kind == "classification" else []
    distinct_first = len(set(label_first)) == len(label_first)

    # the answer states of a round that changed no decoder weight (a head-only round) are the last
    # round's: its evaluation is the heads' matmul (the key hashes every weight below the heads)
    key = features_key(model, encoded) if keep_states else None
    key = key and f"{key}:{batch_size}"
    cached = _EVAL_STATES.get(key) if key else None
    states = []
    total_loss, total_tokens, scored, trues = 0.0, 0, [], []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad).items()}
        if key:
            states.append(cached[len(states)] if cached else answer_states(model, batch))
        logits, targets, rows = answer_logits(model, batch, states[-1] if key else None)
        total_loss += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
        total_tokens += int(targets.numel())
        if task.kind == "classification" and distinct_first:
            scored.append(logits[first_answer_positions(rows)][:, label_first].float().cpu())
            trues += [ex.label for ex in examples[start : start + batch_size]]
    if key and not cached:
        _EVAL_STATES[key] = states
        while len(_EVAL_STATES) > 2:  # the monitored set (the test part is scored once)
            _EVAL_STATES.popitem(last=False)
    if task.kind == "classification" and not distinct_first and examples:
        scored = [_score_full_labels(model, tokenizer, task, examples, max_len, batch_size, system_prompt)]
        trues = [e.label for e in examples]
    scores = torch.cat(scored) if scored else torch.zeros(0, max(1, len(task.label_words)))
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
    if max_new_tokens and task.kind == "generation":
        texts = generate_batch(model, tokenizer, [ex.prompt for ex in examples], max_len, system_prompt,
                               max_new_tokens, batch_size)
        refs = [ex.references or (ex.answer,) for ex in examples]
        out["bleu"] = corpus_bleu(texts, refs)
        out["bleu_se"] = bleu_bootstrap_se(texts, refs)
        rouge = torch.tensor([rouge_l_best(r, t) for r, t in zip(refs, texts)], dtype=torch.float64)
        out["rouge_l"] = float(rouge.mean()) if len(rouge) else 0.0
        out["rouge_l_se"] = float(rouge.std() / math.sqrt(len(rouge))) if len(rouge) > 1 else None
        if with_predictions:
            out["generations"] = texts
    return out


TEST_SAMPLES = 5  # generated texts kept with a test-part score: the same first test inputs in every run


def score_test_part(model, tokenizer, task: TaskData, cfg: RunConfig) -> dict | None:
    """The task's test part (data-to-text, fin-sentiment), scored once with the final adapter (or the base
    model for zero-shot): reported, never used to choose anything. Every prediction stays (paired tests
    between runs need them: the same inputs, in the same order, in every run); the first five, next to
    their input and answer, are for people to read. `max-test-samples` > 0 keeps the first N inputs."""
    n = cfg.data.max_test_samples
    examples = task.test[:n] if n > 0 else task.test
    if not examples:
        return None
    result = evaluate(model, tokenizer, task, examples, cfg.data.max_seq_len, max_new_tokens=cfg.data.max_new_tokens,
                      system_prompt=cfg.data.system_prompt, prefix_cache=cfg.model.prefix_cache, with_predictions=True)
    result["num_inputs"] = len(examples)
    if task.kind == "classification":
        result.pop("probabilities", None)
        acc = result["accuracy"]
        result["accuracy_se"] = math.sqrt(acc * (1.0 - acc) / len(examples))
        result["labels"] = [ex.label for ex in examples]
        result["samples"] = [{"input": ex.prompt, "predicted": task.label_words[p], "label": task.label_words[ex.label]}
                             for ex, p in zip(examples[:TEST_SAMPLES], result["predictions"])]
        return result
    result["samples"] = [{"input": ex.prompt, "generated": t, "references": list(ex.references)}
                         for ex, t in zip(examples[:TEST_SAMPLES], result["generations"])]
    return result


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


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: Sequence[str], max_len: int, system_prompt: str = "auto",
                   max_new_tokens: int = 64, batch_size: int = 16) -> list[str]:
    """Greedy continuations of the prompts (in the training prompt format), `batch_size` at a time,
    left-padded, with transformers' KV cache; prompts of similar length are batched together."""
    from transformers import GenerationConfig

    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # our own config: the model's (sampling temperature, lengths) must not change what greedy means
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                           pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    ids = [tokenizer(render_prompt(tokenizer, p, system_prompt), add_special_tokens=False).input_ids[-max_len:]
           for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    texts = [""] * len(ids)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(ids[i]):] = torch.tensor(ids[i])
            mask[row, width - len(ids[i]):] = 1
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=gen)
        for row, i in enumerate(chunk):
            texts[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    return texts


def generate_answer(model, tokenizer, ex: Example, max_len: int, system_prompt: str = "auto",
                    max_new_tokens: int = 64) -> str:
    """Greedy continuation of one example's prompt."""
    return generate_batch(model, tokenizer, [ex.prompt], max_len, system_prompt, max_new_tokens)[0]
