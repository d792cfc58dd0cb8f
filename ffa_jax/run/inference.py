"""Using a trained run: rebuild it from its directory, generate, predict, re-evaluate.

A run directory (what ``ffa-jax train`` writes) holds ``config.yaml`` and, once the last round
is done, ``adapter.safetensors`` (every LoRA node's ``<path>/a`` ``[d_in, r]`` and
``<path>/b`` ``[r, d_out]``, plus the trained head's leaves under their paths).
:func:`load_run` rebuilds exactly the tree the run ended with: the run's workload (model, task,
tokenizer) is loaded as training loaded it, the starting tree is built as training built it
(:func:`ffa_jax.run.initial_params`: the seeded A and head, or ``lora.init_from``), and the
adapter file's values replace the LoRA factors and the trained head. Every key is checked.

* :func:`generate` -- decoder runs (``llama``): greedy KV-cache generation
  (:func:`ffa_jax.models.generate.make_generate`) from prompts in the run's format (its chat
  template and task instruction, as in training and evaluation), or raw text.
* :func:`predict` -- classifier runs (``encoder``: texts; ``vit``: images): the label,
  its id and the class probabilities of each input.
* :func:`evaluate` -- the run's own metrics on its test split (what ``metrics.jsonl``
  recorded after the last round).

Bad input -- a folder without ``config.yaml`` or ``adapter.safetensors``, a classifier run given
to :func:`generate` (or a decoder to :func:`predict`), a prompt that does not fit the model's
context -- raises a :class:`~ffa_jax.errors.ConfigError` / ``WeightsError`` / ``DataError`` before
any model compute. ``ffa-jax generate`` / ``predict`` / ``eval`` (:mod:`ffa_jax.cli`) parse,
call these and print.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ffa_jax import lora, workloads
from ffa_jax import perf as perf_lib
from ffa_jax.config import RunConfig, load_config
from ffa_jax.errors import ConfigError, DataError, WeightsError
from ffa_jax.federated import modes
from ffa_jax.run.rundir import ADAPTER_FILE, CONFIG_FILE, METRICS_FILE
from ffa_jax.types import PyTree

CLASSIFIER_FAMILIES = ("encoder", "vit")
DECODER_FAMILIES = ("llama",)
SPLITS = ("test",)
PROMPT_FORMATS = ("task", "chat", "raw")
# Prompt slots are rounded up to a multiple of this, so that similar calls share a compilation.
PROMPT_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    """A finished run rebuilt from its directory (see :func:`load_run`).

    Attributes:
      run_dir: the run directory.
      config: its :class:`~ffa_jax.config.RunConfig` (``output_dir``/``name`` point at
        ``run_dir``).
      family: the workload family: ``"encoder"``, ``"llama"`` or ``"vit"``.
      workload: the loaded :class:`~ffa_jax.workloads.Workload` (module, test split, metrics).
      params: the final parameter tree, with LoRA nodes (unmerged); :meth:`merged` folds them.
      model_dir: the base model's local folder (``None`` for a GGUF file).
      label_names: class names of a classifier run, ``None`` for decoders.
    """

    run_dir: pathlib.Path
    config: RunConfig
    family: str
    workload: workloads.Workload
    params: PyTree
    model_dir: pathlib.Path | None
    label_names: tuple[str, ...] | None

    @property
    def model_config(self) -> Any:
        """The model's EncoderConfig / LlamaConfig / ViTConfig."""
        return self.workload.module.config

    def merged(self) -> PyTree:
        """The tree with every LoRA node merged (``w0 + scale * a @ b``): plain weights."""
        return lora.merge(self.params)

    def tokenizer(self) -> Any:
        """The run's tokenizer (encoder and decoder runs): for an encoder, the one training
        encoded with (:func:`ffa_jax.models.sources.load_encoding_tokenizer`)."""
        from ffa_jax.models import llama_weights, sources

        if self.family == "llama":
            return llama_weights.load_llama_tokenizer(self.config.model.name)
        if self.family == "encoder":
            # The same tokenizer as training used (ids must match the adapter's inputs).
            return sources.load_encoding_tokenizer(self.model_dir)
        raise ConfigError(f"a {self.family} run has no tokenizer (its inputs are images).")

    def recorded_eval(self) -> dict[str, Any] | None:
        """The ``eval_*`` entries of the last round of ``metrics.jsonl`` that has the run's
        metric (the evaluation after the last round), or ``None`` without one."""
        path = self.run_dir / METRICS_FILE
        if not path.is_file():
            return None
        last = None
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                if self.workload.metric in rec:
                    last = rec
        if last is None:
            return None
        return {k: v for k, v in last.items() if k.startswith("eval_")} | {"round": last["round"]}


def read_run_config(run_dir: str | os.PathLike) -> tuple[RunConfig, str]:
    """``(config, family)`` of a run directory, reading only ``config.yaml`` (and a local
    model folder's ``config.json``): no weights, no data.

    Raises:
      ConfigError: ``run_dir`` has no ``config.yaml`` (not a run directory) or it is invalid.
      WeightsError: the model's ``config.json`` names an unsupported architecture.
    """
    run = pathlib.Path(run_dir)
    path = run / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(
            f"{str(run)!r} is not a run directory: {CONFIG_FILE} is missing. Pass the folder "
            "that `ffa-jax train` wrote (<output_dir>/<name>, e.g. runs/quickstart)."
        )
    cfg = load_config(path, [f"output_dir={run.parent}", f"name={run.name}"])
    return cfg, workloads.resolve_family(cfg)


def check_family(run: str | os.PathLike, family: str, expect: Sequence[str], purpose: str) -> None:
    """Raises a ConfigError that says which command suits the run when ``family`` is not one of
    ``expect`` (a classifier run given to ``generate``, a decoder to ``predict``)."""
    if family in expect:
        return
    if family in DECODER_FAMILIES:
        hint = f"it is a decoder ({family}) run: use `ffa-jax generate {run} --prompt TEXT`."
    else:
        hint = f"it is a classifier ({family}) run: use `ffa-jax predict {run} --input FILE`."
    raise ConfigError(f"{purpose} needs a {' or '.join(expect)} run, but {str(run)!r}: {hint}")


def _read_adapter(path: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    if not path.is_file():
        raise WeightsError(
            f"{str(path)!r} is missing: the run has no trained adapter (train writes it after "
            "the last round; an interrupted run resumes with `ffa-jax train --resume "
            f"{path.parent}`)."
        )
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise WeightsError(f"cannot read {str(path)!r} as safetensors: {e}") from e


def apply_adapter(
    params: PyTree, stored: dict[str, np.ndarray], *, head_trained: bool, source: str
) -> PyTree:
    """``params`` with every LoRA node's ``a``/``b`` and every other stored leaf (a trained
    head) replaced by ``stored`` (the ``adapter.safetensors`` layout, see
    :func:`ffa_jax.run.save_adapter`).

    Raises:
      WeightsError: a missing LoRA factor, a shape mismatch, a key that matches nothing, or
        no head leaves when ``head_trained`` (all named in one message).
    """
    by_path = {
        lora.path_str(kp): leaf
        for kp, leaf in jax.tree_util.tree_leaves_with_path(params, is_leaf=lora.is_lora)
    }
    errors, used, new = [], set(), {}
    for p, leaf in by_path.items():
        if lora.is_lora(leaf):
            parts = {}
            for which, shape in (("a", leaf.a.shape), ("b", leaf.b.shape)):
                k = f"{p}/{which}"
                if k not in stored:
                    errors.append(f"missing key {k!r} (shape {tuple(shape)})")
                elif tuple(stored[k].shape) != tuple(shape):
                    errors.append(
                        f"shape mismatch: {k!r} expected {tuple(shape)}, got {stored[k].shape}"
                    )
                else:
                    parts[which] = jnp.asarray(stored[k], jnp.float32)
                    used.add(k)
            if len(parts) == 2:
                new[p] = leaf.replace(**parts)
        elif p in stored:
            if tuple(stored[p].shape) != tuple(np.shape(leaf)):
                errors.append(
                    f"shape mismatch: {p!r} expected {tuple(np.shape(leaf))}, got {stored[p].shape}"
                )
            else:
                new[p] = jnp.asarray(stored[p], jnp.float32)
                used.add(p)
    errors += [f"unmapped key {k!r}" for k in sorted(set(stored) - used)]
    if head_trained and not any(not k.endswith(("/a", "/b")) for k in used):
        errors.append(
            "the run trained its head (model.train_head=true) but the file holds no head leaves "
            "(e.g. classifier/kernel); it was written by a version that did not save them, so "
            "the trained head is lost: re-train the run"
        )
    if errors:
        raise WeightsError(
            f"cannot rebuild the run from {source!r} ({len(errors)} problem(s)):\n  "
            + "\n  ".join(errors)
        )
    return jax.tree_util.tree_map_with_path(
        lambda kp, leaf: new.get(lora.path_str(kp), leaf), params, is_leaf=lora.is_lora
    )


def _model_dir(cfg: RunConfig, family: str) -> pathlib.Path | None:
    from ffa_jax.models import sources

    if family == "llama":
        src = sources.resolve_llama_source(cfg.model.name)
        return src.path if src.path.is_dir() else None
    return pathlib.Path(sources.resolve_model_dir(cfg.model.name))


def load_run(
    run_dir: str | os.PathLike,
    *,
    families: Sequence[str] | None = None,
    purpose: str = "this command",
) -> LoadedRun:
    """Rebuilds a finished run's final parameter tree and its workload.

    Args:
      run_dir: the run directory (``config.yaml`` + ``adapter.safetensors``).
      families: the workload families the caller accepts (checked from ``config.yaml``
        before anything is loaded); ``None``: any.
      purpose: names the caller in the family error (e.g. ``"ffa-jax generate"``).

    Raises:
      ConfigError: not a run directory, or a family the caller does not accept.
      WeightsError: ``adapter.safetensors`` is missing or does not match the model.
      DataError: the run's task can no longer be loaded.
    """
    from ffa_jax.run.setup import KEY_HEAD, initial_params, root_key

    run = pathlib.Path(run_dir)
    cfg, family = read_run_config(run)
    if families is not None:
        check_family(run, family, families, purpose)
    if not modes.spec(cfg.lora.mode).peft:
        raise ConfigError(f"{run}: {modes.no_adapter_note(cfg.lora.mode)}")
    stored = _read_adapter(run / ADAPTER_FILE)
    wl = workloads.load(cfg, head_key=jax.random.fold_in(root_key(cfg), KEY_HEAD))
    # Fed-SB's adapter holds mid folded into b: plain LoRA nodes take it.
    params = lora.fold_mid(initial_params(cfg, wl.base_params))
    params = apply_adapter(
        params,
        stored,
        head_trained=wl.head_pattern is not None,
        source=str(run / ADAPTER_FILE),
    )
    return LoadedRun(
        run_dir=run,
        config=cfg,
        family=family,
        workload=wl,
        params=params,
        model_dir=_model_dir(cfg, family),
        label_names=None if family in DECODER_FAMILIES else tuple(wl.label_names),
    )


# --------------------------------------------------------------------------- evaluate


def evaluate(run: LoadedRun, split: str = "test") -> dict[str, Any]:
    """The run's metrics (``eval_*``, as in ``metrics.jsonl``) of its adapter on ``split``;
    a decoder's sample generations are under ``"eval_samples"``.

    Raises:
      ConfigError: an unknown split.
    """
    if split not in SPLITS:
        raise ConfigError(
            f"--split {split!r}: a run is evaluated on its test split (eval.max_examples of "
            f"data.task's test split, as during training); use one of {SPLITS}."
        )
    return dict(run.workload.evaluate(run.params))


# --------------------------------------------------------------------------- generate


def prompt_ids(
    run: LoadedRun, prompts: Sequence[str], fmt: str = "task", tokenizer: Any = None
) -> list[list[int]]:
    """Token ids of each prompt.

    ``fmt``: ``"task"`` -- the run's training format: its chat template around the prompt
    followed by the task's instruction (:func:`ffa_jax.data.gsm.format_prompt`); ``"chat"`` --
    the chat template around the prompt alone; ``"raw"`` -- the text as given (the tokenizer's
    special tokens added, e.g. a BOS). ``tokenizer``: the run's (default: loaded).

    Raises:
      ConfigError: unknown ``fmt``, or an empty prompt.
    """
    from ffa_jax.data import gsm as gsm_lib

    if fmt not in PROMPT_FORMATS:
        raise ConfigError(f"prompt format {fmt!r} is unknown; use one of {PROMPT_FORMATS}.")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ConfigError(f"prompt {i} is {p!r}; every prompt must be non-empty text.")
    tok = tokenizer if tokenizer is not None else run.tokenizer()
    if fmt == "raw":
        return [list(x) for x in tok(list(prompts), add_special_tokens=True)["input_ids"]]
    instruction = gsm_lib.DEFAULT_INSTRUCTION if fmt == "task" else None
    return gsm_lib.tokenize_prompts(tok, list(prompts), instruction=instruction)


def generate(
    run: LoadedRun,
    prompts: Sequence[str],
    *,
    max_new_tokens: int | None = None,
    fmt: str = "task",
    batch_size: int | None = None,
) -> list[dict[str, Any]]:
    """Greedy continuations of ``prompts`` by a decoder run's merged model (KV cache, one
    compilation per call).

    Args:
      run: a ``llama`` run (:func:`load_run`).
      prompts: N texts.
      max_new_tokens: tokens generated at most per prompt (default the run's
        ``eval.max_new_tokens``); generation stops at the tokenizer's EOS.
      fmt: the prompt format, see :func:`prompt_ids`.
      batch_size: prompts decoded together (default ``eval.batch_size``).

    Returns:
      One dict per prompt: ``prompt``, ``generation`` (decoded, special tokens skipped),
      ``finished`` (ended with EOS), ``new_tokens`` and ``answer`` (the number after ``####``,
      as the GSM metric reads it, or ``None``).

    Raises:
      ConfigError: not a decoder run, no prompts, an empty prompt, or a prompt whose tokens
        plus ``max_new_tokens`` exceed the model's context (before any compute).
    """
    from ffa_jax.data import gsm as gsm_lib
    from ffa_jax.models.generate import make_generate

    check_family(run.run_dir, run.family, DECODER_FAMILIES, "generate")
    if not prompts:
        raise ConfigError("no prompts: give at least one (--prompt TEXT or --input FILE.jsonl).")
    cfg, config = run.config, run.model_config
    new = cfg.eval.max_new_tokens if max_new_tokens is None else max_new_tokens
    if not isinstance(new, int) or isinstance(new, bool) or new <= 0:
        raise ConfigError(f"max_new_tokens={new!r} must be a positive integer.")
    tok = run.tokenizer()
    ids = prompt_ids(run, prompts, fmt, tok)
    context = config.max_position_embeddings
    too_long = [(i, len(p)) for i, p in enumerate(ids) if len(p) + new > context]
    if too_long:
        i, n = too_long[0]
        raise ConfigError(
            f"{len(too_long)} prompt(s) do not fit the model's context of {context} tokens: "
            f"prompt {i} has {n} tokens (format {fmt!r}) + max_new_tokens={new} = {n + new}; "
            "shorten the prompt or lower --max-new-tokens."
        )
    longest = max(len(p) for p in ids)
    slots = min(-(-longest // PROMPT_BUCKET) * PROMPT_BUCKET, context - new)
    eos = tuple(dict.fromkeys([int(tok.eos_token_id), *config.eos_token_ids]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    gen = make_generate(
        config,
        max_length=slots + new,
        max_new_tokens=new,
        eos_token_ids=eos,
        pad_token_id=int(pad),
        dtype=workloads.compute_dtype(cfg),
    )
    params = run.merged()
    B = min(batch_size or perf_lib.eval_batch_size(cfg), len(ids))
    out: list[dict[str, Any]] = []
    for start in range(0, len(ids), B):
        chunk = ids[start : start + B]
        real = len(chunk)
        res = gen(params, chunk + [chunk[0]] * (B - real))  # fixed batch: one compilation
        toks, lens, fin = (np.asarray(x) for x in (res.tokens, res.lengths, res.finished))
        for r in range(real):
            text = tok.decode(toks[r, : lens[r]], skip_special_tokens=True)
            out.append(
                {
                    "prompt": prompts[start + r],
                    "generation": text,
                    "finished": bool(fin[r]),
                    "new_tokens": int(lens[r]),
                    "answer": gsm_lib.extract_answer(text),
                }
            )
    return out


# --------------------------------------------------------------------------- predict


def _logits_fn(run: LoadedRun):
    """Jitted ``logits(params, batch) -> float32 [B, num_labels]`` of a classifier run."""
    module = run.workload.module
    if run.family == "vit":
        from ffa_jax.models.vit import normalise
        from ffa_jax.models.vit_weights import read_image_processor

        mean, std = read_image_processor(run.model_dir, run.model_config.num_channels)

        @jax.jit
        def logits(params, batch):
            x = normalise(batch["pixel_values"], mean, std)
            return module.apply({"params": params}, x).astype(jnp.float32)

        return logits

    @jax.jit
    def logits(params, batch):
        return module.apply(
            {"params": params},
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("token_type_ids"),
        ).astype(jnp.float32)

    return logits


def classifier_inputs(run: LoadedRun, inputs: Any) -> dict[str, np.ndarray]:
    """Model input arrays of a classifier run: texts are tokenized as in training
    (``model.max_length`` tokens, longer texts truncated); images (``[N, H, W]`` or
    ``[N, H, W, C]``, uint8 or floats in [0, 1]) are checked and resized to the model's input
    size as the image tasks are (:func:`ffa_jax.data.images.prepare_array_images`).

    Raises:
      DataError: no inputs, texts that are not strings, or images of the wrong shape, channel
        count, dtype or range.
    """
    from ffa_jax.data import batching, images

    if run.family == "vit":
        c = run.model_config
        x = images.prepare_array_images(inputs, c.image_size, c.num_channels, "the input images")
        return {"pixel_values": x}
    texts = list(inputs)
    if not texts:
        raise DataError("no input texts: give at least one.")
    return batching.tokenize(texts, run.tokenizer(), run.config.model.max_length)


def predict(run: LoadedRun, inputs: Any, *, batch_size: int | None = None) -> list[dict[str, Any]]:
    """Class predictions of a classifier run's merged model.

    Args:
      run: an ``encoder`` (texts) or ``vit`` (images) run (:func:`load_run`).
      inputs: N texts, or an image array (see :func:`classifier_inputs`).
      batch_size: inputs per forward pass (default ``eval.batch_size``).

    Returns:
      One dict per input: ``label`` (name), ``label_id`` and ``probs`` (``{name: p}``, the
      softmax of the logits).

    Raises:
      ConfigError: not a classifier run.
      DataError: bad inputs (before any compute).
    """
    from ffa_jax.data import batching

    check_family(run.run_dir, run.family, CLASSIFIER_FAMILIES, "predict")
    arrays = classifier_inputs(run, inputs)
    logits_fn = _logits_fn(run)
    params = run.merged()
    names = run.label_names or tuple(str(i) for i in range(run.model_config.num_labels))
    B = batch_size or perf_lib.eval_batch_size(run.config)
    out: list[dict[str, Any]] = []
    for batch, mask in batching.eval_batches(arrays, B):
        probs = np.asarray(jax.nn.softmax(logits_fn(params, batch), axis=-1))
        for row in probs[mask]:
            k = int(np.argmax(row))
            out.append(
                {
                    "label": names[k],
                    "label_id": k,
                    "probs": {n: float(p) for n, p in zip(names, row, strict=True)},
                }
            )
    return out


# --------------------------------------------------------------------------- input files


def read_jsonl_field(path: str | os.PathLike, fields: Sequence[str]) -> list[str]:
    """The first of ``fields`` present in each line of a JSON-lines file (blank lines skipped).

    Raises:
      DataError: the file is missing, a line is not a JSON object, or holds none of
        ``fields`` as a string.
    """
    p = pathlib.Path(path)
    if not p.is_file():
        raise DataError(f"--input {str(p)!r} does not exist.")
    out = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{str(p)!r} line {n} is not JSON: {e}") from e
        value = next((rec[f] for f in fields if isinstance(rec, dict) and f in rec), None)
        if not isinstance(value, str):
            raise DataError(
                f"{str(p)!r} line {n} has no text field {' / '.join(map(repr, fields))}: "
                f"{line[:80]!r}; write one JSON object per line, e.g. "
                f'{{"{fields[0]}": "..."}}.'
            )
        out.append(value)
    if not out:
        raise DataError(f"{str(p)!r} holds no input lines.")
    return out


def read_images(path: str | os.PathLike) -> np.ndarray:
    """Images from a ``.npy`` array (``[N, H, W]`` or ``[N, H, W, C]``) or a ``.npz`` with an
    ``images`` array (the format of local image tasks, see :mod:`ffa_jax.data.images`).

    Raises:
      DataError: missing file, another format, or no ``images`` array.
    """
    p = pathlib.Path(path)
    if not p.is_file():
        raise DataError(f"--input {str(p)!r} does not exist.")
    if p.suffix == ".npy":
        return np.load(p, allow_pickle=False)
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            if "images" not in z:
                raise DataError(
                    f"{str(p)!r} has arrays {sorted(z.files)} but no 'images'; save the images "
                    "as np.savez(path, images=x)."
                )
            return z["images"]
    raise DataError(
        f"--input {str(p)!r}: an image run reads a .npy array or a .npz with 'images' "
        "([N, H, W] or [N, H, W, C], uint8 or floats in [0, 1])."
    )


def read_inputs(run_config: RunConfig, family: str, path: str | os.PathLike) -> Any:
    """The inputs of ``--input`` for a run of ``family``: prompts (``prompt`` / ``question``
    / ``text`` of each JSON line) for decoders, texts (``text`` or ``data.text_field``) for
    encoders, an image array for ViT."""
    if family in DECODER_FAMILIES:
        return read_jsonl_field(path, ("prompt", "question", "text"))
    if family == "vit":
        return read_images(path)
    return read_jsonl_field(path, tuple(dict.fromkeys(("text", run_config.data.text_field))))


def export_run_peft(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    base_model: str | os.PathLike | None = None,
    absolute_base_path: bool = False,
    modules_to_save: Sequence[str] | None = None,
    merged: bool = True,
    label_names: Sequence[str] | None = None,
    overwrite: bool = False,
    vit_layout: str = "auto",
):
    """Exports a run directory as a PEFT LoRA adapter plus a merged HF checkpoint: rebuilds the
    run (:func:`load_run`: ``config.yaml`` + ``adapter.safetensors``) and calls
    :func:`ffa_jax.models.peft.export_peft` on its parameter tree.

    ``base_model`` (``base_model_name_or_path`` to record) defaults to a portable name for the
    run's ``model.name`` (:func:`ffa_jax.models.peft.portable_base_model`: hub ids as they
    are, ``minilm``/``smollm2`` as their hub ids, a local folder by its name only, or its
    absolute path with ``absolute_base_path``); a given value is recorded as given.
    ``label_names`` default to the run's own. The other arguments are those of ``export_peft``.

    Returns:
      The :class:`~ffa_jax.models.peft.ExportResult`.

    Raises:
      ConfigError: ``out_dir`` exists and is not empty (checked first), or the run directory
        is invalid.
      WeightsError: the run cannot be exported (see :func:`ffa_jax.models.peft.peft_state_dict`).
    """
    from ffa_jax.models import peft

    peft.check_export_folder(out_dir, overwrite)
    run = load_run(run_dir)
    model_dir = run.model_dir
    tokenizer = None
    if run.family == "llama" and (model_dir is None or not model_dir.is_dir()):
        tokenizer = run.tokenizer()
    notes: list[str] = []
    if base_model is not None:
        base = os.fspath(base_model)
    else:
        base, note = peft.portable_base_model(
            run.config.model.name, absolute=absolute_base_path, model_dir=model_dir
        )
        notes += [note] if note else []
    return peft.export_peft(
        run.params,
        out_dir,
        config=run.model_config,
        base_model=base,
        modules_to_save=modules_to_save,
        merged=merged,
        label_names=label_names or run.label_names,
        overwrite=overwrite,
        vit_layout=vit_layout,
        model_dir=model_dir,
        tokenizer=tokenizer,
        notes=notes,
    )


__all__ = [
    "export_run_peft",
    "LoadedRun",
    "apply_adapter",
    "check_family",
    "classifier_inputs",
    "evaluate",
    "generate",
    "load_run",
    "predict",
    "prompt_ids",
    "read_images",
    "read_inputs",
    "read_jsonl_field",
    "read_run_config",
]
