"""Times the personalization computations on the default experiment's data.

  python -m bench.bench_personalization

Prints the wall time of the evaluation computation (1 prompt x 1 and 8 clients,
10 prompts x 1 client) and of the fine-tuning computation (4 epochs, 1 and 8
clients); the first call of each includes TFF tracing and graph set-up.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402,F401

from fedprompt import (  # noqa: E402
    backbones,
    execution,
    frozen_backbone,
    personalization,
    program,
    prompt_model,  # noqa: E402
)


def main():
    config = program.ExperimentConfig(output_dir=tempfile.mkdtemp())
    resolved = backbones.resolve_backbone(config.backbone)
    keras_backbone = resolved.load_keras_backbone()
    prompt = program._initial_prompt(config, keras_backbone, resolved.tokenizer)
    frozen = frozen_backbone.save_frozen_backbone(keras_backbone, config.output_dir + "/frozen")
    data = program.build_data(config, resolved)

    def model_fn():
        return prompt_model.PromptTunedLM(frozen_backbone.restore_backbone(frozen))

    with execution.local_context():
        process = personalization.build_personalization_evaluation(
            model_fn=model_fn,
            prompt_shape=prompt.shape,
            sequence_length=config.sequence_length,
            generation_width=config.sequence_length,
            grid=config.personalization_grid(),
            max_new_tokens=config.max_new_tokens,
            stop_token_ids=resolved.stop_token_ids,
            pad_token_id=resolved.tokenizer.pad_token_id,
        )
        inputs = [
            personalization.client_data(c, data.global_batches, data.global_generation)
            for c in data.evaluation_clients
        ]

        def timed(label, fn):
            start = time.perf_counter()
            fn()
            print(f"{label}: {time.perf_counter() - start:.2f} s", flush=True)

        timed(
            "evaluate 1 prompt x 1 client (first call)",
            lambda: process.evaluate([prompt[None]], inputs[:1]),
        )
        timed("evaluate 1 prompt x 1 client", lambda: process.evaluate([prompt[None]], inputs[:1]))
        timed(
            "evaluate 1 prompt x 8 clients",
            lambda: process.evaluate([prompt[None]] * 8, inputs[:8]),
        )
        timed(
            "evaluate 10 prompts x 1 client",
            lambda: process.evaluate([np.stack([prompt] * 10)], inputs[:1]),
        )
        fine_tune = next(iter(process.fine_tune.values()))
        args = (prompt, np.float32(0.1), np.float32(0.0))
        timed("fine-tune 4 epochs x 1 client (first call)", lambda: fine_tune(*args, inputs[:1]))
        timed("fine-tune 4 epochs x 1 client", lambda: fine_tune(*args, inputs[:1]))
        timed("fine-tune 4 epochs x 8 clients", lambda: fine_tune(*args, inputs[:8]))


if __name__ == "__main__":
    main()
