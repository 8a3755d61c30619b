"""Tests of fedprompt.backbones.preset_io: keras-nlp preset files written on Keras 2."""

import hashlib
import json
import os
import pathlib
import threading

import h5py
import keras_nlp
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from fedprompt import tokenizers
from fedprompt.backbones import preset_io

_VOCAB = {"<|endoftext|>": 0}
for _c in "abcdefghijklmnopqrstuvwxyz0123456789 .?:ĠĊ":
    _VOCAB.setdefault(_c, len(_VOCAB))
_MERGES = ["Ġ a", "a b", "Ġ t"]
for _m in _MERGES:
    _VOCAB[_m.replace(" ", "")] = len(_VOCAB)
VOCAB_SIZE = 128  # Embedding rows beyond the tokenizer vocabulary are allowed.


def _gpt2():
    return keras_nlp.models.GPT2Backbone(
        vocabulary_size=VOCAB_SIZE,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=32,
    )


def _llama():
    return keras_nlp.models.LlamaBackbone(
        vocabulary_size=VOCAB_SIZE,
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
    )


def _text_tokenizer(split_digits=True):
    keras_tokenizer = keras_nlp.models.GPT2Tokenizer(vocabulary=_VOCAB, merges=_MERGES)
    spec = tokenizers.default_spec_for(keras_tokenizer)
    spec = tokenizers.TextTokenizerSpec(**{**spec.to_json(), "split_digits": split_digits})
    return tokenizers.BPETextTokenizer(keras_tokenizer, spec=spec)


def _inputs():
    rng = np.random.default_rng(0)
    return {
        "token_ids": tf.constant(rng.integers(0, VOCAB_SIZE, [2, 7]), tf.int32),
        "padding_mask": tf.constant([[True] * 7, [True] * 4 + [False] * 3]),
    }


class PresetRoundTripTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.named_parameters(
        ("gpt2", _gpt2, keras_nlp.models.GPT2Backbone),
        ("llama", _llama, keras_nlp.models.LlamaBackbone),
    )
    def test_round_trip_identical_outputs(self, make_backbone, cls):
        tf.keras.utils.set_random_seed(1)
        backbone = make_backbone()
        tokenizer = _text_tokenizer()
        directory = pathlib.Path(self.get_temp_dir()) / "preset"
        result = preset_io.write_preset(
            directory, backbone=backbone, tokenizer=tokenizer, metadata={"name": "test", "n": 3}
        )
        self.assertEqual(result, directory)
        self.assertCountEqual(
            os.listdir(directory),
            ["config.json", "model.weights.h5", "metadata.json", "tokenizer.json", "assets"],
        )
        self.assertCountEqual(
            os.listdir(directory / "assets" / "tokenizer"), ["vocabulary.json", "merges.txt"]
        )
        # No temporary directory is left beside the preset.
        self.assertEqual(os.listdir(directory.parent), ["preset"])

        expected = backbone(_inputs(), training=False).numpy()
        # keras-nlp's own reader, on Keras 2.
        from_keras_nlp = cls.from_preset(str(directory))
        self.assertIsInstance(from_keras_nlp, cls)
        self.assertAllEqual(from_keras_nlp(_inputs(), training=False).numpy(), expected)
        # fedprompt's fast reader gives the same weights, bit for bit.
        loaded, loaded_tokenizer = preset_io.load_preset(directory)
        self.assertIsInstance(loaded, cls)
        self.assertAllEqual(loaded(_inputs(), training=False).numpy(), expected)
        for w, w_loaded in zip(backbone.weights, loaded.weights):
            self.assertAllEqual(w.numpy(), w_loaded.numpy())
        # ... because every variable started from its recorded dataset, checked at write time.
        paths = preset_io.read_metadata(directory)[preset_io.WEIGHT_PATHS_KEY]
        self.assertLen(paths, len(backbone.weights))
        self.assertEqual(paths[0], "layers/reversible_embedding/vars/0")

        text = "the cat 123. ab<|endoftext|>"
        self.assertEqual(loaded_tokenizer.encode(text), tokenizer.encode(text))
        self.assertEqual(loaded_tokenizer.spec, tokenizer.spec)
        keras_tokenizer = keras_nlp.tokenizers.Tokenizer.from_preset(str(directory))
        self.assertEqual(keras_tokenizer.vocabulary, tokenizer.tokenizer.vocabulary)

        metadata = preset_io.read_metadata(directory)
        self.assertEqual(metadata["name"], "test")
        self.assertEqual(metadata["n"], 3)
        self.assertTrue(metadata["text_tokenizer"]["split_digits"])
        top = json.loads((directory / "metadata.json").read_text())
        self.assertEqual(top["parameter_count"], backbone.count_params())
        self.assertIn("keras_version", top)

    def test_a_record_that_does_not_fit_falls_back_to_load_weights(self):
        tf.keras.utils.set_random_seed(3)
        backbone = _llama()
        directory = pathlib.Path(self.get_temp_dir()) / "preset"
        preset_io.write_preset(
            directory, backbone=backbone, tokenizer=_text_tokenizer(), metadata={}
        )
        metadata_file = directory / "metadata.json"
        for broken in (lambda paths: paths[:-1], lambda paths: paths[1:] + paths[:1]):
            top = json.loads(metadata_file.read_text())
            record = top["fedprompt"][preset_io.WEIGHT_PATHS_KEY]
            top["fedprompt"][preset_io.WEIGHT_PATHS_KEY] = broken(record)
            metadata_file.write_text(json.dumps(top))
            with self.assertLogs(level="WARNING") as logs:
                loaded = preset_io.load_backbone(directory)
            self.assertIn("load_weights instead", logs.output[0])
            for w, w_loaded in zip(backbone.weights, loaded.weights):
                self.assertAllEqual(w.numpy(), w_loaded.numpy())
            top["fedprompt"][preset_io.WEIGHT_PATHS_KEY] = record
            metadata_file.write_text(json.dumps(top))

    def test_overwrite(self):
        directory = pathlib.Path(self.get_temp_dir()) / "p"
        tokenizer = _text_tokenizer()
        preset_io.write_preset(directory, backbone=_gpt2(), tokenizer=tokenizer, metadata={"v": 1})
        with self.assertRaisesRegex(FileExistsError, "overwrite=True"):
            preset_io.write_preset(directory, backbone=_gpt2(), tokenizer=tokenizer, metadata={})
        preset_io.write_preset(
            directory, backbone=_llama(), tokenizer=tokenizer, metadata={"v": 2}, overwrite=True
        )
        self.assertEqual(preset_io.read_metadata(directory)["v"], 2)
        self.assertIsInstance(preset_io.load_backbone(directory), keras_nlp.models.LlamaBackbone)
        self.assertEqual(os.listdir(directory.parent), ["p"])

    def test_unserialisable_metadata_writes_nothing(self):
        directory = pathlib.Path(self.get_temp_dir()) / "p"
        with self.assertRaises(TypeError):
            preset_io.write_preset(
                directory, backbone=_gpt2(), tokenizer=_text_tokenizer(), metadata={"x": object()}
            )
        self.assertEqual(os.listdir(directory.parent), [])


class WeightsFingerprintTest(tf.test.TestCase):
    def test_hand_computed_digest(self):
        directory = pathlib.Path(self.get_temp_dir())
        with h5py.File(directory / preset_io.WEIGHTS_FILE, "w") as weights:
            weights["layers/b/vars/0"] = np.array([[3]], np.int32)
            weights["layers/a/vars/0"] = np.array([1.0, 2.0], np.float32)
        expected = hashlib.sha256(
            b"layers/a/vars/0|<f4|(2,)\n"
            + np.array([1.0, 2.0], np.float32).tobytes()
            + b"layers/b/vars/0|<i4|(1, 1)\n"
            + np.array([[3]], np.int32).tobytes()
        ).hexdigest()
        self.assertEqual(preset_io.weights_fingerprint(directory), expected)

    def test_same_weights_same_fingerprint_whenever_written(self):
        tf.keras.utils.set_random_seed(4)
        backbone = _gpt2()
        tokenizer = _text_tokenizer()
        root = pathlib.Path(self.get_temp_dir())
        write = lambda name: preset_io.write_preset(  # noqa: E731
            root / name, backbone=backbone, tokenizer=tokenizer, metadata={"name": name}
        )
        fingerprint = preset_io.weights_fingerprint(write("first"))
        self.assertEqual(preset_io.weights_fingerprint(write("second")), fingerprint)
        # One float32 ulp in one entry of the last variable is another backbone.
        variable = backbone.weights[-1]
        values = variable.numpy()
        values.flat[0] = np.nextafter(values.flat[0], np.float32(np.inf))
        variable.assign(values)
        self.assertNotEqual(preset_io.weights_fingerprint(write("changed")), fingerprint)


class FastConstructionTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.named_parameters(("gpt2", _gpt2), ("llama", _llama))
    def test_same_model_as_traced_construction(self, make_backbone):
        tf.keras.utils.set_random_seed(2)
        traced = make_backbone()
        with preset_io.fast_construction():
            fast = make_backbone()
        # Variables: same names, shapes and creation order (the frozen-backbone
        # checkpoint relies on the order), all zero until assigned.
        self.assertEqual(
            [(v.name, v.shape.as_list()) for v in traced.weights],
            [(v.name, v.shape.as_list()) for v in fast.weights],
        )
        self.assertTrue(all(not np.any(v.numpy()) for v in fast.weights))
        # Same symbolic outputs and connectivity.
        self.assertEqual(traced.output.shape.as_list(), fast.output.shape.as_list())
        self.assertEqual(traced.output.dtype, fast.output.dtype)
        self.assertEqual([x.name for x in traced.layers], [x.name for x in fast.layers])
        # Equal configs but for the model's own name, which Keras makes unique.
        self.assertEqual({**traced.get_config(), "name": None}, {**fast.get_config(), "name": None})
        # Same outputs once the weights are the same.
        fast.set_weights(traced.get_weights())
        self.assertAllEqual(traced(_inputs()), fast(_inputs()))

    def test_blocks_are_not_traced_and_the_method_is_restored(self):
        original = tf.keras.layers.Layer._infer_output_signature
        traced_layers = []

        def spy(layer, *args):
            traced_layers.append(type(layer).__name__)
            return original(layer, *args)

        tf.keras.layers.Layer._infer_output_signature = spy
        try:
            with preset_io.fast_construction():
                _llama()
        finally:
            tf.keras.layers.Layer._infer_output_signature = original
        self.assertNotIn("LlamaTransformerDecoder", traced_layers)
        self.assertIn("ReversibleEmbedding", traced_layers)  # Other layers still traced.
        self.assertIs(tf.keras.layers.Layer._infer_output_signature, original)


class ValidatePresetDirTest(tf.test.TestCase, parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.directory = pathlib.Path(self.get_temp_dir()) / "preset"
        preset_io.write_preset(
            self.directory, backbone=_gpt2(), tokenizer=_text_tokenizer(), metadata={}
        )

    def test_valid(self):
        self.assertEqual(preset_io.validate_preset_dir(self.directory), self.directory)
        self.assertTrue(preset_io.is_valid_preset_dir(self.directory))

    def test_missing_directory(self):
        with self.assertRaisesRegex(preset_io.MissingPresetFileError, "does not exist"):
            preset_io.validate_preset_dir(self.directory / "nope")
        self.assertFalse(preset_io.is_valid_preset_dir(self.directory / "nope"))

    @parameterized.parameters("config.json", "metadata.json", "model.weights.h5", "tokenizer.json")
    def test_missing_file_is_named(self, name):
        (self.directory / name).unlink()
        with self.assertRaisesRegex(preset_io.MissingPresetFileError, f"no `{name}`.*rebuild"):
            preset_io.validate_preset_dir(self.directory)
        self.assertIsInstance(self._error(), FileNotFoundError)  # Callers may catch the builtin.

    def test_missing_tokenizer_asset_is_named(self):
        (self.directory / "assets" / "tokenizer" / "merges.txt").unlink()
        with self.assertRaisesRegex(preset_io.MissingPresetFileError, "merges.txt"):
            preset_io.validate_preset_dir(self.directory)

    @parameterized.parameters("config.json", "metadata.json", "tokenizer.json")
    def test_unparsable_json_is_named(self, name):
        (self.directory / name).write_text("{not json")
        with self.assertRaisesRegex(preset_io.PresetError, f"`{name}`.*not valid JSON"):
            preset_io.validate_preset_dir(self.directory)

    def test_truncated_weights_are_named(self):
        weights = self.directory / "model.weights.h5"
        weights.write_bytes(weights.read_bytes()[:100])
        with self.assertRaisesRegex(preset_io.PresetError, "`model.weights.h5`.*corrupt"):
            preset_io.validate_preset_dir(self.directory)

    def test_weights_of_another_architecture_are_named(self):
        other = pathlib.Path(self.get_temp_dir()) / "other"
        preset_io.write_preset(other, backbone=_llama(), tokenizer=_text_tokenizer(), metadata={})
        os.replace(other / "model.weights.h5", self.directory / "model.weights.h5")
        preset_io.validate_preset_dir(self.directory)  # Cheap checks pass ...
        with self.assertRaisesRegex(preset_io.PresetError, "`model.weights.h5`.*does not load"):
            preset_io.load_backbone(self.directory)  # ... loading names the file.

    def _error(self):
        try:
            preset_io.validate_preset_dir(self.directory)
        except preset_io.PresetError as e:
            return e
        return None


class DefaultCacheDirTest(tf.test.TestCase):
    def test_env_override_and_default(self):
        old = {k: os.environ.get(k) for k in ("FEDPROMPT_CACHE", "XDG_CACHE_HOME")}
        try:
            os.environ["FEDPROMPT_CACHE"] = "/tmp/x-cache"
            self.assertEqual(preset_io.default_cache_dir(), pathlib.Path("/tmp/x-cache"))
            del os.environ["FEDPROMPT_CACHE"]
            os.environ["XDG_CACHE_HOME"] = "/tmp/xdg"
            self.assertEqual(preset_io.default_cache_dir(), pathlib.Path("/tmp/xdg/fedprompt"))
            del os.environ["XDG_CACHE_HOME"]
            self.assertEqual(
                preset_io.default_cache_dir(), pathlib.Path.home() / ".cache" / "fedprompt"
            )
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


if __name__ == "__main__":
    tf.test.main()


class CacheEntryLockTest(tf.test.TestCase):
    def test_second_holder_waits_until_the_first_releases(self):
        entry = pathlib.Path(self.get_temp_dir()) / "cache" / "tiny-abc"
        acquired = threading.Event()

        def second_holder():
            with preset_io.cache_entry_lock(entry):
                acquired.set()

        with preset_io.cache_entry_lock(entry):
            thread = threading.Thread(target=second_holder)
            thread.start()
            # flock locks belong to the open file, so a second open in this process
            # blocks exactly like another process would.
            self.assertFalse(acquired.wait(timeout=0.5))
        self.assertTrue(acquired.wait(timeout=10))
        thread.join()
        self.assertTrue((entry.parent / "tiny-abc.lock").exists())
        self.assertFalse(entry.exists())  # the lock never creates the entry itself
