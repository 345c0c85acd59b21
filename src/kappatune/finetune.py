"""``kappatune train`` / :func:`train`: fine-tune a model on your data with a forgetting-aware method and get a model
directory that plain transformers loads.

A train run *is* a one-task run of the harness (:func:`kappatune.harness.run`): the same config schema (one task,
the control corpus optional), the same setup checks, method building, budget matching, training loop
(:func:`kappatune.training.train_stage` through accelerate), mid-stage checkpoints and atomic stage commit, so
``resume=True`` after a SIGKILL ends with bitwise the same weights. On top of the run, :func:`train` exports:

* the merged model (``save="merged"``/``"both"``): ``config.json``, ``model.safetensors``,
  ``generation_config.json`` and the tokenizer files, so ``AutoModelForCausalLM.from_pretrained(DIR)`` and
  ``AutoTokenizer.from_pretrained(DIR)`` load it (the byte-level tiny test models have no transformers tokenizer:
  their directory holds no tokenizer files, use :class:`kappatune.data.ByteTokenizer`);
* the trained tensors alone (``save="adapter"``/``"both"``): ``adapter.safetensors`` with the method, its config,
  the exact targets, the base model's name and its weight fingerprints in the metadata, reloaded by
  :func:`kappatune.methods.load_adapter` (or ``kappatune.models.load_model(DIR)``, which applies it to the base);
* ``README.md``, a model card: base model, method and options, every adapted tensor with its κ before and after,
  data, steps, metrics (test perplexity, control perplexity change, the validation curve), library versions;
* ``train.json``: the same as data, written last (the export's commit point: a run killed during the export
  redoes it on resume).

The run's own files stay next to them (``state.json``, ``results.json``, ``results.md``, ``checkpoints/``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from .config import RunConfig, config_from_dict, load_config
from .errors import ConfigError
from .storage import atomic_write_json, atomic_write_text

__all__ = ["train", "SAVE_MODES", "model_card"]

logger = logging.getLogger("kappatune")

SAVE_MODES = ("merged", "adapter", "both")
EXPORT_MARKER = "train.json"
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")


def _train_config(
    model: str | None, data: str | None, *, config: Any, output_dir: str | os.PathLike | None, method: str,
    method_options: dict[str, Any] | None, policy: str | None, top_p: float | None, num_modules: int | None,
    targets: Sequence[str] | str | None, param_budget: int | None, steps: int | None, epochs: float | None,
    lr: float | None, batch_size: int | None, seq_len: int | None, control: str | None, text_field: str,
    eval_every: int, early_stopping: int, eval_blocks: int | None, optimizer: str | None, dtype: str | None,
    gradient_checkpointing: bool | None, checkpoint_every: int | None, seed: int, num_threads: int | None,
    packing: bool | None = None,
    overrides: Sequence[str], sft: dict[str, Any] | None = None,
) -> tuple[RunConfig, bool]:
    """The run config of a train: from ``config`` (a YAML path, dict or RunConfig with exactly one task), or
    built from the arguments. Arguments given explicitly override the config's values. Also says whether the
    length is still to be set from the epochs (neither steps nor tokens given)."""
    if config is not None:
        if isinstance(config, RunConfig):
            data_dict = config.to_dict()
        elif isinstance(config, dict):
            data_dict = dict(config)
        else:
            data_dict = load_config(config).to_dict()
        data_dict.setdefault("name", "train")
    else:
        if not model:
            raise ConfigError("train needs a model (--model NAME_OR_DIR) or a config file")
        if not data:
            raise ConfigError("train needs data (--data FILE_OR_CORPUS) or a config file")
        data_dict = {
            "name": "train", "model": str(model),
            "tasks": [_task_entry(str(data), text_field, sft)],
            "control": None, "method": {"name": method, "options": dict(method_options or {})},
            "training": {"lr": 1e-4, "checkpoint_every": 50}, "eval": {"max_blocks": 32},
            "output": {"plots": False, "spectrum_plot": False},
        }
        if method != "full":
            knobs = {k: v for k, v in dict(policy=policy, top_p=top_p, num_modules=num_modules).items() if v is not None}
            if targets is not None:
                data_dict["method"]["targets"] = {"modules": targets if isinstance(targets, str) else list(targets), **knobs}
            elif not any(k in (method_options or {}) for k in ("policy", "top_p", "num_modules", "param_budget")):
                knobs.setdefault("policy", "kappa")
                if "top_p" not in knobs and "num_modules" not in knobs:
                    knobs["top_p"] = 1.0 if param_budget is not None else 0.2  # a budget ranks every candidate
                data_dict["method"]["targets"] = knobs
    t = data_dict.setdefault("training", {}) or {}
    data_dict["training"] = t
    for key, value in (("steps", steps), ("lr", lr), ("batch_size", batch_size), ("seq_len", seq_len),
                       ("optimizer", optimizer), ("dtype", dtype), ("gradient_checkpointing", gradient_checkpointing),
                       ("checkpoint_every", checkpoint_every), ("packing", packing)):
        if value is not None:
            t[key] = value
    if steps is not None:
        t.pop("tokens", None)
    e = data_dict.setdefault("eval", {}) or {}
    data_dict["eval"] = e
    if eval_every:
        e["curve_every"] = eval_every
    if early_stopping:
        e["early_stopping"] = early_stopping
    if eval_blocks is not None:
        e["max_blocks"] = eval_blocks
    if control is not None:
        data_dict["control"] = {"corpus": str(control)} if control else None
    if param_budget is not None:
        data_dict["budget"] = param_budget
    if output_dir is not None:
        data_dict["output_dir"] = str(output_dir)
    if num_threads is not None:
        data_dict["num_threads"] = num_threads
    if config is None:
        data_dict["seed"] = seed
    out = data_dict.setdefault("output", {}) or {}
    data_dict["output"] = out
    out.update(save_adapter=False, save_model=False)  # train exports the model itself (see _export)
    tr = data_dict["training"]
    placeholder = tr.get("steps") is None and tr.get("tokens") is None
    if placeholder:
        tr["steps"] = 1_000_000  # placeholder for the static checks; replaced from the epochs by train()
    cfg = config_from_dict(data_dict, overrides)
    if len(cfg.tasks) != 1:
        raise ConfigError(f"train takes exactly one task (its data), the config lists {len(cfg.tasks)}; "
                          "use `kappatune run` for a sequence of tasks")
    if cfg.methods or len(cfg.seed_list()) != 1:
        raise ConfigError("train takes one method and one seed; use `kappatune bench` to compare several")
    if cfg.output_dir is None:
        raise ConfigError("train needs an output directory (--output DIR / output_dir)")
    return cfg, placeholder


def _is_sft_data(data: str, task_type: str | None, prompt_field: str, messages_field: str | None) -> bool:
    """Whether ``data`` is read as supervised examples: asked for (``task_type``), a built-in sft task, or a
    .jsonl/.json/.csv file whose first records have the prompt (or messages) field; else raw text."""
    from .data.tasks import looks_like_sft

    if task_type is not None:
        if task_type not in ("lm", "sft"):
            raise ConfigError(f"task type must be lm or sft, got {task_type!r}")
        return task_type == "sft"
    return looks_like_sft(data, prompt_field, messages_field)


def _task_entry(data: str, text_field: str, sft: dict[str, Any] | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"corpus": data, "text_field": text_field, "name": _data_label(data)}
    if sft is not None:  # supervised: prompt -> response examples through the harness's sft task loader
        entry.update(type="sft", **{k: v for k, v in sft.items() if v is not None})
    return entry


def _data_label(data: str) -> str:
    """The task's name in tables and the card: a file's stem (``notes`` for ``notes.txt``), else the corpus name."""
    p = Path(data)
    return p.stem if p.suffix.lower() in (".txt", ".md", ".jsonl", ".json", ".csv", ".parquet", ".gz") else data


def _steps_for_epochs(cfg: RunConfig, epochs: float, progress: bool) -> int:
    """Optimizer steps for ``epochs`` passes over the training blocks (tokenised once; the run reuses the cache)."""
    from . import data as kdata
    from .models import BUILTIN_MODELS, builtin_tokenizer

    if not (epochs > 0 and math.isfinite(epochs)):
        raise ConfigError(f"epochs must be > 0, got {epochs}")
    tok = builtin_tokenizer(cfg.model) if cfg.model in BUILTIN_MODELS else kdata.get_tokenizer(cfg.model)
    task = cfg.tasks[0]
    if task.type == "sft":  # one step per batch of training examples
        t = kdata.load_task(task.corpus, name=task.label, seed=cfg.eval.split_seed,
                            validation_fraction=cfg.eval.validation_fraction, test_fraction=cfg.eval.eval_fraction,
                            prompt_field=task.prompt_field, response_field=task.response_field,
                            messages_field=task.messages_field, choices_field=task.choices_field, progress=progress)
        n = len(t["train"]) if cfg.training.max_train_blocks is None else min(len(t["train"]), cfg.training.max_train_blocks)
        if cfg.training.packing:  # one step per batch of packed rows
            n = int(kdata.tokenize_sft(t["train"][:n], tok, max_length=cfg.training.seq_len, chat_template=task.chat_template,
                                       packing=True)["input_ids"].shape[0])
        return max(1, math.ceil(epochs * n / cfg.training.batch_size))
    blocks = kdata.build_blocks(task.corpus, tok, cfg.training.seq_len, split="train", seed=cfg.eval.split_seed,
                                eval_fraction=cfg.eval.eval_fraction, validation_fraction=cfg.eval.validation_fraction,
                                max_blocks=cfg.training.max_train_blocks,
                                text_field=task.text_field, progress=progress)
    return max(1, math.ceil(epochs * blocks.shape[0] / cfg.training.batch_size))


def train(
    model: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    *,
    output_dir: str | os.PathLike | None = None,
    config: Any = None,
    method: str = "selective",
    method_options: dict[str, Any] | None = None,
    policy: str | None = None,
    top_p: float | None = None,
    num_modules: int | None = None,
    targets: Sequence[str] | str | None = None,
    param_budget: int | None = None,
    steps: int | None = None,
    epochs: float | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    control: str | None = None,
    text_field: str = "text",
    eval_every: int = 0,
    early_stopping: int = 0,
    eval_blocks: int | None = None,
    optimizer: str | None = None,
    dtype: str | None = None,
    gradient_checkpointing: bool | None = None,
    checkpoint_every: int | None = None,
    packing: bool | None = None,
    save: str = "merged",
    seed: int = 0,
    num_threads: int | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    overrides: Sequence[str] = (),
    task_type: str | None = None,
    prompt_field: str = "prompt",
    response_field: str = "response",
    messages_field: str | None = None,
    choices_field: str | None = None,
    chat_template: bool = True,
    metrics: Sequence[str] | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Fine-tune ``model`` on ``data`` and write a loadable model directory; returns ``(trained model, results)``.

    ``model``: a built-in name, local directory or hub id; ``data``: a text/jsonl/csv/parquet file, a built-in
    corpus or a ``datasets`` name (documents of ``text_field``). Or ``config``: a ``kappatune run`` config (YAML
    path, dict or :class:`~kappatune.config.RunConfig`) with exactly one task; the keyword arguments given then
    override it. ``method`` (default ``selective`` = KappaTune) with ``method_options``; which tensors:
    ``policy`` (default ``kappa``) and ``top_p`` (default 0.2) / ``num_modules``, or ``targets`` (PEFT
    ``target_modules`` semantics: names or suffixes, or one regex); ``param_budget``: trainable parameters,
    matched within ±10% by the method's knob. Length: ``steps`` or ``epochs`` (default 1 epoch).
    Supervised data (``task_type="sft"``, or detected: a built-in sft task or a file whose records have
    ``prompt_field``): prompt → response examples, loss on the response tokens only, through the same task loader
    as ``kappatune run`` (``response_field``, ``messages_field``, ``choices_field``, ``chat_template``, ``metrics``
    e.g. ``["accuracy"]``); otherwise raw text documents of ``text_field``.
    ``eval_every``: validation perplexity (the data's validation split, never the test split) every N steps; ``early_stopping``: stop after
    that many validations without improvement. ``control``: a corpus whose perplexity change from the base
    model is reported (what the model forgot). ``optimizer``: adamw | adafactor | sgd; ``dtype``: float32 |
    bfloat16; ``gradient_checkpointing``; ``packing`` (sft: several examples per row, each attending only to
    itself). ``save``: merged | adapter | both. ``resume``: continue a run killed in
    ``output_dir`` (same weights as an uninterrupted one); ``force``: start over in a directory holding a run.

    The returned model is a plain transformers model with the training merged in (``method.merge()``); the
    results dict is ``results.json`` plus ``export`` (files written, selection with κ before/after).
    """
    from .harness.run import _run

    if save not in SAVE_MODES:
        raise ConfigError(f"save must be one of {', '.join(SAVE_MODES)}, got {save!r}")
    if steps is not None and epochs is not None:
        raise ConfigError("give steps or epochs, not both")
    cfg, no_length = _train_config(
        None if model is None else str(model), None if data is None else str(data), config=config,
        output_dir=output_dir, method=method, method_options=method_options, policy=policy, top_p=top_p,
        num_modules=num_modules, targets=targets, param_budget=param_budget, steps=steps, epochs=epochs, lr=lr,
        batch_size=batch_size, seq_len=seq_len, control=control, text_field=text_field, eval_every=eval_every,
        early_stopping=early_stopping, eval_blocks=eval_blocks, optimizer=optimizer, dtype=dtype,
        gradient_checkpointing=gradient_checkpointing, checkpoint_every=checkpoint_every, packing=packing, seed=seed,
        num_threads=num_threads, overrides=overrides,
        sft=(dict(prompt_field=prompt_field, response_field=response_field, messages_field=messages_field,
                  choices_field=choices_field, chat_template=chat_template, metrics=list(metrics) if metrics else None)
             if data is not None and config is None and _is_sft_data(str(data), task_type, prompt_field, messages_field)
             else None),
    )
    if epochs is not None or no_length:  # default: one epoch
        from dataclasses import replace

        n = _steps_for_epochs(cfg, 1.0 if epochs is None else epochs, progress)
        cfg = config_from_dict(replace(cfg, training=replace(cfg.training, steps=n, tokens=None)).to_dict())
    out = cfg.out_dir()
    if force and not resume:
        (out / EXPORT_MARKER).unlink(missing_ok=True)
    results, trained = _run(cfg, resume=resume, force=force, progress=progress)
    marker = out / EXPORT_MARKER
    if trained is None and marker.is_file():  # already trained and exported: load what is on disk
        info = json.loads(marker.read_text("utf-8"))
        if info.get("save") == save:
            logger.info(f"{out}: already trained and exported (--force to train again)")
            return _load_exported(out, cfg), {**results, "export": info}
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under accelerate launch / torchrun only the main process exports
        return (trained.merge() if trained is not None else None), results
    if trained is None:  # trained, but killed before the export finished: rebuild the method from the last stage
        trained = _rebuild(cfg, out)
    info = _export(cfg, out, trained, results, save, progress)
    return trained.model, {**results, "export": info}


def _rebuild(cfg: RunConfig, out: Path) -> Any:
    from .harness.run import _load
    from .harness.state import _read_state
    from .methods import load_adapter

    state = _read_state(out) or {}
    ck = (state.get("checkpoint") or {}).get("file")
    if not ck:
        raise ConfigError(f"{out} holds no finished training to export; rerun with --force")
    model, _ = _load(cfg)
    return load_adapter(model, out / ck)


def _load_exported(out: Path, cfg: RunConfig) -> torch.nn.Module:
    from .models import load_model

    return load_model(out, trust_remote_code=cfg.trust_remote_code)[0]


def _selection_rows(method: Any, spectrum: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per adapted tensor: name, parameters and κ before/after (from the spectrum of the merged model)."""
    before = dict(zip(spectrum["names"], spectrum["kappa_before"])) if spectrum else {}
    after = dict(zip(spectrum["names"], spectrum["kappa_after"])) if spectrum else {}
    names = method.adapted_names() or list(before)
    scores = getattr(getattr(method, "selection", None), "scores", {}) or {}
    rows = []
    for n in names:
        key = n if n in before else f"{n}.weight" if f"{n}.weight" in before else n
        rows.append({"tensor": key, "kappa_before": before.get(key, scores.get(key)), "kappa_after": after.get(key)})
    return rows


def _export(cfg: RunConfig, out: Path, method: Any, results: dict[str, Any], save: str, progress: bool) -> dict[str, Any]:
    """Write adapter / merged model + tokenizer / model card / train.json (the marker, last)."""
    from .harness.run import _spectrum
    from .harness.state import library_versions
    from . import data as kdata
    from .models import BUILTIN_MODELS, builtin_tokenizer
    from .storage import fault_point

    files: list[str] = []
    if save in ("adapter", "both"):
        method.save(out / "adapter.safetensors", extra_metadata={"base_model": cfg.model})
        files.append("adapter.safetensors")
    fault_point("export")
    merged = method.merge()
    try:
        spectrum = _spectrum(cfg, merged)
    except Exception as exc:  # a diverged model (NaN weights) has no spectrum: the card says so
        logger.warning(f"could not compute the κ of the adapted tensors: {exc}")
        spectrum = None
    tmp = out / ".export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if save in ("merged", "both"):
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer = builtin_tokenizer(cfg.model) if cfg.model in BUILTIN_MODELS else kdata.get_tokenizer(cfg.model)
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        gen = getattr(merged, "generation_config", None)
        if gen is not None and not (tmp / "generation_config.json").is_file():
            gen.save_pretrained(tmp)
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
            files.append(f.name)
    else:  # adapter only: no stale model files from an earlier export in this directory
        for name in _MODEL_FILES:
            (out / name).unlink(missing_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    stage = (results.get("stages") or [{}])[-1]
    info = {
        "kappatune_train": 1,
        "base_model": cfg.model,
        "save": save,
        "files": files,
        "method": results.get("method"),
        "trainable_params": results.get("trainable_params"),
        "total_params": results.get("total_params"),
        "budget_report": results.get("budget_report"),
        "selection": _selection_rows(method, spectrum),
        "data": results.get("corpora"),
        "steps": stage.get("steps"),
        "stopped_early": stage.get("stopped_early"),
        "losses": {"first": (stage.get("losses") or [None])[0], "last": (stage.get("losses") or [None])[-1]},
        "validation_curve": stage.get("curve"),
        "metrics": results.get("metrics"),
        "training": results.get("config", {}).get("training"),
        "seed": results.get("seed"),
        "libraries": library_versions(),
        "tokenizer_saved": any(f.startswith("tokenizer") for f in files),
    }
    atomic_write_text(out / "README.md", model_card(info, results))
    atomic_write_json(out / EXPORT_MARKER, info)  # the commit point of the export
    return info


def _fmt(x: Any, nd: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return "inf" if math.isinf(x) else f"{x:.{nd}g}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def model_card(info: dict[str, Any], results: dict[str, Any]) -> str:
    """The README.md model card of a train output directory (Hugging Face card layout, YAML front matter)."""
    m = info.get("metrics") or {}
    method = info.get("method") or {}
    task = (results.get("tasks") or ["data"])[0]
    base = results.get("base") or {}
    tr = info.get("training") or {}
    lines = [
        "---",
        f"base_model: {info['base_model']}",
        "library_name: transformers",
        "tags: [kappatune, " + str(method.get("name")) + "]",
        "---",
        "",
        f"# {Path(str(results.get('config', {}).get('output_dir') or 'model')).name}",
        "",
        f"Fine-tuned from `{info['base_model']}` with kappatune ({method.get('label')}: method `{method.get('name')}`, "
        f"options `{json.dumps(method.get('options'), default=str)}`"
        + (f", targets `{json.dumps(_targets_of(results), default=str)}`" if _targets_of(results) else "") + ").",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("<this directory>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this directory>")' if info.get("tokenizer_saved") else
        "tokenizer = kappatune.data.ByteTokenizer()  # byte-level test model: no transformers tokenizer",
        "```",
        "",
        f"Files: {', '.join(f'`{f}`' for f in info.get('files', [])) or '–'}"
        + (" (`adapter.safetensors`: the trained tensors only; `kappatune.methods.load_adapter(base_model, DIR)`)"
           if "adapter.safetensors" in info.get("files", []) else ""),
        "",
        "## Training",
        "",
        f"- data: `{task}` ({_data_line(info.get('data') or {}, task)})",
        f"- steps: {_fmt(info.get('steps'))}" + (f" (stopped early; {info['stopped_early'].get('planned_steps')} planned)"
                                                 if info.get("stopped_early") else "")
        + f", batch {tr.get('batch_size')} × {tr.get('seq_len')} tokens, lr {tr.get('lr')} ({tr.get('schedule')}), "
          f"optimizer {tr.get('optimizer', 'adamw')}, dtype {tr.get('dtype', 'float32')}, seed {info.get('seed')}",
        f"- training loss: {_fmt((info.get('losses') or {}).get('first'))} → {_fmt((info.get('losses') or {}).get('last'))}",
        f"- trainable parameters: {_fmt(info.get('trainable_params'))} of {_fmt(info.get('total_params'))}"
        + (f" (budget {_fmt(info['budget_report'].get('param_budget'))}, {info['budget_report'].get('knob')}="
           f"{info['budget_report'].get('value')})" if info.get("budget_report") else ""),
        "",
        "## Metrics",
        "",
        "| metric | base | fine-tuned |",
        "|---|---:|---:|",
        f"| test perplexity ({task}, held-out test split) | {_fmt((base.get('task_ppl') or {}).get(task))} | "
        f"{_fmt((m.get('final_task_ppl') or {}).get(task))} |",
    ]
    for metric in ("accuracy", "exact_match"):  # supervised data: held-out scores
        R = (results.get("matrix") or {}).get(metric)
        if R and R[0][0] is not None:
            lines.append(f"| {metric} ({task}, test split) | {100 * R[0][0]:.1f}% | {100 * R[-1][0]:.1f}% |")
    if results.get("control") is not None:
        lines.append(f"| control perplexity ({results['control']}) | {_fmt(m.get('control_ppl_base'))} | "
                     f"{_fmt(m.get('control_ppl_final'))} ({_fmt(m.get('control_change_pct'), 3)}%) |")
    curve = info.get("validation_curve") or []
    if curve:
        lines += ["", "Validation-split perplexity during training (what early stopping reads): "
                  + ", ".join(f"step {p['step']}: {_fmt(p.get('task_ppl'))}" for p in curve)]
    lines += ["", "## Adapted tensors", "",
              "κ = σ_max / σ_min of each adapted weight matrix, before and after training.", "",
              "| tensor | κ before | κ after |", "|---|---:|---:|"]
    for r in info.get("selection") or []:
        lines.append(f"| `{r['tensor']}` | {_fmt(r.get('kappa_before'))} | {_fmt(r.get('kappa_after'))} |")
    libs = info.get("libraries") or {}
    lines += ["", "## Library versions", "",
              ", ".join(f"{k} {v}" for k, v in libs.items() if k not in ("platform",)), ""]
    return "\n".join(lines)


def _targets_of(results: dict[str, Any]) -> dict[str, Any]:
    t = ((results.get("config") or {}).get("method") or {}).get("targets") or {}
    return {k: v for k, v in t.items() if v not in (None, False)}


def _data_line(corpora: dict[str, Any], task: str) -> str:
    c = corpora.get(task) or {}
    return (f"{c.get('corpus')}, {c.get('documents')} documents, {c.get('train_blocks')} training blocks, "
            f"{c.get('validation_blocks', '-')} validation blocks, {c.get('eval_blocks')} test blocks")
