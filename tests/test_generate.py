"""fedprompt-generate: decoding with and without a soft prompt on a local preset."""

import numpy as np
import pytest

from fedprompt import backbones, generate
from fedprompt.backbones import preset_io, tiny
from tests.test_driver import SMALL


@pytest.fixture(scope="module")
def resolved(tmp_path_factory):
    preset = tiny.build_tiny(output_dir=tmp_path_factory.mktemp("gen") / "small", config=SMALL)
    return backbones.resolve_backbone(str(preset))


def test_soft_prompt_of_first_token_equals_plain_decoding(resolved):
    text = "Definition: Reverse the words.\n\nInput: red blue\nOutput:"
    plain = generate.generate_text(resolved, text, max_new_tokens=6)
    first = resolved.tokenizer.encode(text)[0]
    embedding = np.asarray(resolved.load_keras_backbone().token_embedding.embeddings)[[first]]
    rest = resolved.tokenizer.decode(resolved.tokenizer.encode(text)[1:])
    assert resolved.tokenizer.encode(rest) == resolved.tokenizer.encode(text)[1:]
    # Same model input either way: the first token's embedding, then the rest.
    with_prompt = generate.generate_text(resolved, rest, soft_prompt=embedding, max_new_tokens=6)
    assert with_prompt == plain


def test_describe_records_the_weights_fingerprint(resolved):
    described = resolved.describe()
    assert described["preset_dir"] == str(resolved.preset_dir)
    assert described["weights_sha256"] == preset_io.weights_fingerprint(resolved.preset_dir)


def test_soft_prompt_of_wrong_width_is_named(resolved):
    with pytest.raises(ValueError, match=r"--soft_prompt has shape \(2, 5\); expected \[P, 32\]"):
        generate.generate_text(resolved, "a b", soft_prompt=np.zeros((2, 5), np.float32))
