r"""`fedprompt-generate`: greedy decoding with a backbone and (optionally) a soft prompt.

  python -m fedprompt.generate --backbone=smollm2-135m-instruct \
      --prompt="What is the capital of France?"
  fedprompt-generate --backbone=tiny --soft_prompt=results/default/final_prompt.npy \
      --prompt=$'Definition: Reverse the order of the words.\n\nInput: red blue\nOutput:'

Chat backbones (template `chatml`, e.g. SmolLM2-Instruct) get the text wrapped as one
user turn unless `--raw`.

Without `--soft_prompt` the backbone decodes the text alone (the embedding of the
text's first token stands in for the prompt, so this is plain decoding). With it, the
trained `[P, H]` prompt is prepended, as in training.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from fedprompt import backbones, evaluation, prompt_model  # noqa: E402
from fedprompt.backbones import smollm2  # noqa: E402
from fedprompt.data_types import PromptTemplate  # noqa: E402

FLAGS = flags.FLAGS


def _define_flags():
    """CLI flags, defined only when the CLI runs (the library import defines none)."""
    flags.DEFINE_string("backbone", "tiny", "As in run_experiment.py --backbone.")
    flags.DEFINE_string("prompt", None, "The input text.", required=True)
    flags.DEFINE_bool(
        "raw", False, "Do not wrap the text as a ChatML user turn for chat backbones."
    )
    flags.DEFINE_string("soft_prompt", None, "A [P, H] .npy prompt to prepend.")
    flags.DEFINE_integer("max_new_tokens", 32, "Decoding budget.")
    flags.DEFINE_string("cache_dir", None, "Backbone cache folder.")


def generate_text(
    resolved: backbones.ResolvedBackbone,
    text: str,
    *,
    soft_prompt=None,
    max_new_tokens: int = 32,
) -> str:
    """Greedy continuation of `text` (eager; loads the backbone)."""
    model = prompt_model.PromptTunedLM(resolved.load_keras_backbone())
    ids = resolved.tokenizer.encode(text)
    if not ids:
        raise ValueError("--text encodes to no tokens; give some text.")
    if soft_prompt is None:
        # The text's first token embedding serves as a one-position prompt.
        if len(ids) < 2:
            raise ValueError("--text must encode to at least 2 tokens without --soft_prompt.")
        prompt = model.embed_tokens(tf.constant([ids[:1]], tf.int32))[0]
        ids = ids[1:]
    else:
        prompt = tf.constant(np.asarray(soft_prompt, np.float32))
        if prompt.shape.rank != 2 or prompt.shape[1] != model.hidden_dim:
            raise ValueError(
                f"--soft_prompt has shape {tuple(prompt.shape)}; expected [P, {model.hidden_dim}] "
                f"for backbone {resolved.name!r}."
            )
    input_ids, lengths = evaluation.left_pad([ids], pad_token_id=resolved.tokenizer.pad_token_id)
    tokens, generated = model.greedy_generate(
        prompt,
        input_ids,
        lengths,
        max_new_tokens=max_new_tokens,
        stop_token_ids=resolved.stop_token_ids,
        pad_token_id=resolved.tokenizer.pad_token_id,
    )
    return evaluation.decode_generations(resolved.tokenizer, tokens.numpy(), generated.numpy())[0]


def main(argv):
    del argv
    try:
        resolved = backbones.resolve_backbone(FLAGS.backbone, cache_dir=FLAGS.cache_dir)
        soft = None
        if FLAGS.soft_prompt:
            if not os.path.isfile(FLAGS.soft_prompt):
                raise ValueError(f"--soft_prompt={FLAGS.soft_prompt!r} is not a file.")
            soft = np.load(FLAGS.soft_prompt)
        chat = resolved.template is PromptTemplate.CHATML and not FLAGS.raw
        text = smollm2.chatml_prompt(FLAGS.prompt) if chat else FLAGS.prompt
        print(generate_text(resolved, text, soft_prompt=soft, max_new_tokens=FLAGS.max_new_tokens))
    except (ValueError, backbones.BackboneError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run():
    """Console-script entry point (`fedprompt-generate`)."""
    _define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
