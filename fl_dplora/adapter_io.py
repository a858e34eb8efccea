"""The adapter after training: reopen a finished run, score it, ask it, export it.

A run directory holds `summary.json` (its resolved run config, final eval and privacy block) and
`adapter/` (the PEFT adapter and, with `label-head = true`, the head next to it). Everything here
reads the model, tokenization and task from that config, so a user repeats no flag; any key can be
overridden (`--run-config`), e.g. another `task` file to score the adapter on.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fl_dplora import adapter_record
from fl_dplora.config import SCHEMA, ConfigError, RunConfig, resolve
from fl_dplora.run_dir import check_writable_dir

_RUN_ONLY = adapter_record.RUN_ONLY
DATA_LICENCES = {  # the built-in tasks' data (fl_dplora/data_files/*/SOURCE.md)
    "fin-sentiment": "MIT (Twitter Financial News Sentiment, zeroshot/twitter-financial-news-sentiment)",
    "medical-qa": "MIT (PubMedQA, github.com/pubmedqa/pubmedqa)",
    "general-instruct": "CC BY-SA 3.0 (databricks-dolly-15k)",
    "data-to-text": "CC BY-SA 4.0 (E2E NLG, github.com/tuetschek/e2e-dataset)",
}
DATA_LICENCES["fin-sentiment-v1"] = DATA_LICENCES["fin-sentiment"]
# the Hugging Face Hub ids of the built-in tasks' data: a model card's `datasets:` metadata
HUB_DATASETS = {
    "fin-sentiment": "zeroshot/twitter-financial-news-sentiment",
    "medical-qa": "qiaojin/PubMedQA",
    "general-instruct": "databricks/databricks-dolly-15k",
    "data-to-text": "tuetschek/e2e_nlg",
}
HUB_DATASETS["fin-sentiment-v1"] = HUB_DATASETS["fin-sentiment"]


# The bundled GGUF (model_loading.SMOLLM2_GGUF) is a Q4_1 quantization of this hub model: its loadable base.
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise ConfigError(f"--run: {run_dir} has no summary.json (give the output dir of a finished run)")
    try:
        summary = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"--run: {path} is not valid JSON ({exc})") from None
    if not isinstance(summary.get("config"), dict):
        raise ConfigError(f"--run: {path} holds no run config")
    return summary


def run_config(run_dir: str | Path, overrides: Mapping[str, Any] | None = None,
               summary: Mapping[str, Any] | None = None) -> RunConfig:
    """The run's own resolved config (from `summary`, else its summary.json), `overrides` on top."""
    summary = summary if summary is not None else read_summary(run_dir)
    saved = {k: v for k, v in summary["config"].items() if k in SCHEMA and k not in _RUN_ONLY}
    return resolve({**saved, **dict(overrides or {})})


def adapter_dir(run_dir: str | Path) -> Path:
    folder = Path(run_dir) / "adapter"
    check_adapter_dir(folder, "--run")
    return folder


def check_adapter_dir(folder: str | Path, flag: str = "--adapter") -> None:
    if not (Path(folder) / "adapter_config.json").is_file():
        raise ConfigError(f"{flag}: {folder} has no adapter_config.json (give a run's adapter/ folder or its output dir)")


def load_adapted_model(cfg: RunConfig, folder: str | Path, task):
    """Base model + the saved adapter (+ label head), ready to evaluate; refuses a head trained on
    other label words than `task`'s."""
    from peft import PeftModel

    from fl_dplora import label_head
    from fl_dplora.forward import label_first_tokens
    from fl_dplora.model_loading import device_for_training, load_base_model, tokenizer_for
    from fl_dplora.models import record_frozen_dtype

    base = load_base_model(cfg.model.name, cfg.train.seed, cfg=cfg, device=device_for_training())
    try:
        model = PeftModel.from_pretrained(base, str(folder))  # LoRA factors in float32 whatever the base dtype
    except (RuntimeError, ValueError, KeyError) as exc:  # PEFT's size-mismatch wall, or modules it lacks
        wrong = adapter_record.wrong_base(folder, cfg.model.name)
        if wrong:
            raise ConfigError(wrong) from None
        raise ConfigError(f"adapter: {folder} does not fit model {cfg.model.name} "
                          f"({str(exc).strip().splitlines()[0][:200]}); pass the model it was trained on") from None
    record_frozen_dtype(model, cfg)  # the prefix computes as in training
    head = label_head.load(model, Path(folder))
    if head is not None and head.token_ids.tolist() != label_first_tokens(tokenizer_for(cfg), task.label_words):
        raise ConfigError(f"adapter: its label head scores other label words than task {cfg.data.task}")
    return model


def answer(model, tokenizer, task, cfg: RunConfig, texts: Sequence[str]) -> list[dict[str, Any]]:
    """One answer per input text, through the same prompt and scorer as training and evaluation:
    classification gives the chosen label word and every label's probability, generation the
    greedy continuation."""
    from fl_dplora.data import Example
    from fl_dplora.evaluate import evaluate, generate_answer
    from fl_dplora.task_card import examples_from_rows

    if task.kind == "classification":
        # a text fills the card's text column; a JSON object fills several (e.g. context and question)
        rows = [{**(json.loads(t) if t.lstrip().startswith("{") else {task.card.text_column: t}),
                 task.card.label_column: task.label_words[0]} for t in texts]
        examples = examples_from_rows(task.card, rows, "predict", "predict")
        result = evaluate(model, tokenizer, task, examples, cfg.data.max_seq_len, system_prompt=cfg.data.system_prompt,
                          prefix_cache="off", with_predictions=True)
        return [{"text": t, "answer": task.label_words[p], "probabilities": dict(zip(task.label_words, probs))}
                for t, p, probs in zip(texts, result["predictions"], result["probabilities"])]
    card = task.card
    if card is not None and card.instruction and card.text_column:  # a templated task (data-to-text): wrap the text
        prompts = [card.prompt({card.text_column: t}) for t in texts]
    else:
        prompts = list(texts)
    return [{"text": t, "answer": generate_answer(model, tokenizer, Example(p, ""), cfg.data.max_seq_len,
                                                  cfg.data.system_prompt, cfg.data.max_new_tokens)}
            for t, p in zip(texts, prompts)]


def base_model_ref(cfg: RunConfig) -> tuple[str, str | None]:
    """What an adapter's `base_model_name_or_path` should say for the run's `model`, and why
    `AutoPeftModelForCausalLM` cannot load that base by itself (None when it can)."""
    from fl_dplora.model_loading import SMOLLM2_GGUF, TINY_ALIASES

    name = cfg.model.name
    path = Path(os.path.expanduser(name))
    if name == "smollm2-135m" or (path.suffix == ".gguf" and path.name == SMOLLM2_GGUF):
        return SMOLLM2_HUB_ID, None
    if name in TINY_ALIASES:  # no hub id or folder holds these weights: a value no loader mistakes for one
        return (f"fl-dplora:{name}", f"{name} is a random-init test model that fl-dplora builds in code "
                f"(seed {cfg.train.seed}); no hub id or folder holds it, so only fl-dplora loads this adapter")
    if path.suffix == ".gguf":
        return (str(path.resolve()), "the base is a GGUF file: load it with AutoModelForCausalLM.from_pretrained("
                "folder, gguf_file=name), then PeftModel.from_pretrained(base, this_folder)")
    if path.exists() or name.startswith((".", "/", "~")):  # a local folder (absolute, so it loads from anywhere)
        return str(path.resolve()), None
    return name, None  # a hub id


def name_base_model(folder: str | Path, cfg: RunConfig) -> None:
    """Point the adapter_config.json in `folder` at a base that loads (PEFT writes the loaded
    object's own name: null for a model built in code, a site-packages folder for a GGUF), and
    write fl_dplora.json beside it (the run config: `--adapter DIR` alone rebuilds the model)."""
    path = Path(folder) / "adapter_config.json"
    conf = json.loads(path.read_text())
    base, unloadable = base_model_ref(cfg)
    adapter_record.write(folder, cfg, base)
    conf["base_model_name_or_path"] = base
    # AutoPeft loads the base at this revision: the run's, for the hub id the run itself named
    conf["revision"] = (cfg.model.revision or None) if _on_hub(base, unloadable) and base == cfg.model.name else None
    path.write_text(json.dumps(conf, indent=2, sort_keys=True))


def _on_hub(base: str, unloadable: str | None) -> bool:
    return unloadable is None and not Path(base).is_absolute()


def lora_untrained(folder: str | Path) -> bool:
    """True when every lora_B tensor of the adapter is still zero, its init (PEFT's default for
    plain LoRA and FFA alike): the adapter then computes exactly the base model."""
    from safetensors import safe_open

    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise ConfigError(f"adapter: {folder} has no {ADAPTER_WEIGHTS}")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = [k for k in f.keys() if "lora_B" in k]
            return bool(keys) and all(not f.get_tensor(k).any() for k in keys)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        raise ConfigError(f"adapter: {path} is not a readable safetensors file ({exc})") from None


def _local(value: str) -> bool:
    from fl_dplora.data import looks_like_path

    path = Path(os.path.expanduser(value))
    return path.is_absolute() or value.startswith((".", "~")) or looks_like_path(value) or path.exists()


def public_name(value: str) -> str:
    """A model or task as a card may show it: a local file or folder by its name only, never a path."""
    return f"{Path(os.path.expanduser(value)).name} (a local {'folder' if Path(os.path.expanduser(value)).is_dir() else 'file'})" \
        if _local(value) else value


def _arg(value: str, placeholder: str) -> str:
    """A run-config value for a command in the card: a local path becomes PLACEHOLDER_PATH (its name aside)."""
    return f"{placeholder}_PATH" if _local(str(value)) else str(value)


def card_metadata(cfg: RunConfig, base: str, on_hub: bool) -> dict[str, Any]:
    """The Hub's front matter for the card: licence (the base model's, where fl-dplora knows it, else
    `other`) and the training data's Hub dataset id (built-in tasks, or a hub dataset given as task)."""
    from fl_dplora.model_loading import TINY_ALIASES

    licence = "apache-2.0" if base == SMOLLM2_HUB_ID or cfg.model.name in TINY_ALIASES else "other"
    task = cfg.data.task
    dataset = HUB_DATASETS.get(task) or (task if "/" in task and not _local(task) else None)
    return {"license": licence, "datasets": [dataset] if dataset else [],
            "base_model": base if on_hub else None}


def model_card(summary: Mapping[str, Any], cfg: RunConfig, merged: bool, has_head: bool,
               untrained: bool = False) -> str:
    """README.md of an exported adapter: what it is, how private, how good, whose data; no local path."""
    base, unloadable = base_model_ref(cfg)
    shown_base = public_name(base)
    privacy = summary.get("privacy") or {}
    eps = privacy.get("epsilon")
    mode = privacy.get("mode") or cfg.privacy.dp_mode
    fe = summary.get("final_eval") or {}
    licence = DATA_LICENCES.get(cfg.data.task, "the licence of the data the clients trained on (not known to fl-dplora)")
    scores = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in fe.items()
                       if k in ("accuracy", "macro_f1", "majority_rate", "loss", "perplexity", "num_examples"))
    hub = card_metadata(cfg, base, _on_hub(base, unloadable))
    meta = ["---", *([f"base_model: {base}"] if hub["base_model"] else []),  # the hub's field: hub ids only
            f"license: {hub['license']}",
            *(["datasets:", *(f"- {d}" for d in hub["datasets"])] if hub["datasets"] else []),
            "library_name: " + ("transformers" if merged else "peft"),
            "tags: [fl-dplora, federated-learning, differential-privacy, lora]", "---"]
    top = []  # what a reader must know before using the files, right below the front matter
    if has_head:
        use = (f"`fl-dplora predict --run RUN_DIR TEXT` (and `evaluate --run RUN_DIR`) on the run it came from"
               if merged else f"`fl-dplora predict --adapter THIS_FOLDER --run-config \"model={_arg(cfg.model.name, 'MODEL')} "
               f"task={_arg(cfg.data.task, 'TASK')}\" TEXT` (and `fl-dplora evaluate` with the same flags)")
        top.append("**The label head is a separate file, `label_head.safetensors`**: transformers and PEFT ignore it "
                   f"and give the language model's own answer logits; {use} loads and applies it (docs/label-head.md).")
    if untrained:
        top.append("**Untrained LoRA update**: every LoRA B matrix still equals its initial value (zero), so the "
                   "adapter adds nothing and the merged model equals the base model"
                   + (" (what this run learned is its label head)." if has_head else "."))
    if merged:
        how = "A merged model (the LoRA update folded into the base weights): it loads with `AutoModelForCausalLM.from_pretrained` alone."
    elif unloadable is None and _local(base):  # adapter_config.json names the folder; the card does not
        how = (f"A PEFT LoRA adapter on {shown_base}: `AutoPeftModelForCausalLM.from_pretrained(this_folder)` loads "
               "base and adapter where that folder is, or `PeftModel.from_pretrained(base, this_folder)`.")
    elif unloadable is None:
        how = (f"A PEFT LoRA adapter on `{base}`: `AutoPeftModelForCausalLM.from_pretrained(this_folder)` loads "
               "base and adapter, or `PeftModel.from_pretrained(base, this_folder)`.")
    else:
        how = f"A PEFT LoRA adapter: `AutoPeftModelForCausalLM` cannot load it by itself, as {unloadable}."
    if base == SMOLLM2_HUB_ID != cfg.model.name:
        how += (f" Trained on the bundled Q4_1 GGUF of {SMOLLM2_HUB_ID} (de-quantized); the hub model is its "
                "full-precision original, close to but not bit-identical with the weights it was trained on.")
    lines = [
        *[part for t in top for part in (t, "")],
        f"# fl-dplora adapter: {public_name(cfg.data.task)}",
        "",
        how,
        "",
        "| | |", "|---|---|",
        f"| base model | {public_name(cfg.model.name)}"
        f"{f' ({base})' if base != cfg.model.name and unloadable is None and not _local(base) else ''} |",
        f"| task | {public_name(cfg.data.task)} |",
        f"| dp-mode | {mode} |",
        f"| epsilon | {'inf (no DP)' if eps is None else f'{eps:.4f}'} |",
        f"| delta | {privacy.get('delta', cfg.privacy.delta) if eps is not None else '-'} |",
        f"| unit protected | {privacy.get('unit') or '-'} |",
        f"| clients (declared population) | {cfg.federation.population or 'not declared'} |",
        f"| rounds | {summary.get('rounds')} |",
        f"| LoRA | {cfg.lora.variant} r={cfg.lora.rank} alpha={cfg.lora.alpha} on {cfg.lora.targets} "
        f"(last {cfg.lora.layers or 'all'} blocks) |",
        f"| final central eval | {scores or '-'} |",
        f"| training data licence | {licence} |",
        "",
        "epsilon and delta cover everything the run released, under the dp-mode's accountant "
        f"({privacy.get('accountant') or '-'}); see fl-dplora's docs/privacy.md.",
    ]
    if has_head:
        lines += ["", "The label head (docs/label-head.md) replaces the label words' logits at the answer position."]
    return "\n".join(meta + lines) + "\n"


def export(run_dir: str | Path, output: str | Path, merge: bool, overrides: Mapping[str, Any] | None = None,
           allow_untrained: bool = False) -> Path:
    """Write the run's adapter (or the merged model) with a model card to `output`; an adapter whose
    LoRA B matrices are all still at their zero init is refused unless `allow_untrained`."""
    from fl_dplora import label_head
    from fl_dplora.data import load_task
    from fl_dplora.model_loading import tokenizer_for

    summary = read_summary(run_dir)
    cfg = run_config(run_dir, overrides, summary)
    src = adapter_dir(run_dir)
    out = check_writable_dir(Path(output).expanduser().resolve(), "--output")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--output: {out} exists and is not empty (nothing overwritten)")
    has_head = (src / label_head.FILE).is_file()
    untrained = lora_untrained(src)
    if untrained and not allow_untrained:
        raise ConfigError(
            f"export: every LoRA B matrix in {src} is still its initial zero, so the adapter adds nothing and a merged "
            "model equals the base" + (" (this run trained only its label head, which fl-dplora predict/evaluate --run "
                                       "apply)" if has_head else "") + "; --allow-untrained exports it anyway")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. a read-only file system, which os.access does not see for root
        raise ConfigError(f"--output: cannot make {out}: {exc.strerror or exc}") from None
    if merge:
        model = load_adapted_model(cfg, src, load_task(cfg.data.task, cfg.train.seed))
        merged = model.merge_and_unload()
        merged.config.use_cache = True
        merged.save_pretrained(str(out))
        tokenizer_for(cfg).save_pretrained(str(out))
        adapter_record.write(out, cfg, base_model_ref(cfg)[0])  # what was merged into which base
        if has_head:
            shutil.copy2(src / label_head.FILE, out / label_head.FILE)
    else:
        for f in src.iterdir():
            if f.is_file() and f.name != "README.md":  # PEFT's own blank card is replaced below
                shutil.copy2(f, out / f.name)
        name_base_model(out, cfg)  # also fixes adapters saved before the server named their base
    (out / "README.md").write_text(model_card(summary, cfg, merge, has_head, untrained))
    return out
