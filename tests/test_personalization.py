"""Personalization grid inside TFF: epoch 0, interpolation ends, strong L2, records."""

import collections

import numpy as np
import tensorflow as tf

from fedprompt import evaluation, frozen_backbone, personalization, prompt_model
from optimizers import ClientOptimizer
from tests.test_prompt_model import tiny_backbone

SEQ = 8
WIDTH = 4
NEW = 3


class IdTokenizer:
    """Decodes ids to space-separated numbers: ROUGE then compares id sequences."""

    vocabulary_size = 61
    eos_token_id = 60
    pad_token_id = 0

    def encode(self, text):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        return " ".join(str(i) for i in ids if i not in (0, 60))


def _batches(seed, n=4):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 59, size=(n, SEQ)).astype(np.int32)
    target = np.zeros((n, SEQ), bool)
    target[:, 4:7] = True
    pad = np.ones((n, SEQ), bool)
    pad[:, 7:] = False
    return tf.data.Dataset.from_tensor_slices(
        collections.OrderedDict(token_ids=ids, padding_mask=pad, target_mask=target)
    ).batch(2)


def _generation(seed, n=3):
    rng = np.random.default_rng(seed)
    rows = [list(rng.integers(1, 59, size=rng.integers(2, WIDTH + 1))) for _ in range(n)]
    ids, lengths = evaluation.left_pad(rows, pad_token_id=0, width=WIDTH)
    refs = tuple((" ".join(str(x) for x in rng.integers(1, 59, size=3)),) for _ in range(n))
    return evaluation.GenerationSet(ids, lengths, refs, (False,) * n, tuple(range(n)))


class PersonalizationTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        backbone = tiny_backbone("gpt2", seed=3)
        cls.frozen = frozen_backbone.save_frozen_backbone(
            backbone, cls.get_temp_dir_static() + "/frozen"
        )

    @staticmethod
    def get_temp_dir_static():
        import tempfile

        return tempfile.mkdtemp()

    def _run(self, grid, global_prompt):
        comp = personalization.build_personalization_evaluation(
            model_fn=lambda: prompt_model.PromptTunedLM(
                frozen_backbone.restore_backbone(self.frozen)
            ),
            prompt_shape=(2, 16),
            sequence_length=SEQ,
            generation_width=WIDTH,
            grid=grid,
            max_new_tokens=NEW,
            stop_token_ids=[60],
            pad_token_id=0,
        )
        clients = [
            personalization.EvaluationClient(
                client_id=f"c{i}",
                split="test",
                personalization_train=_batches(10 + i),
                local_test_batches=_batches(20 + i),
                local_generation=_generation(30 + i),
            )
            for i in range(2)
        ]
        global_gen = _generation(40, n=4)
        data = [personalization.client_data(c, _batches(50), global_gen) for c in clients]
        results = personalization.run_personalization(comp, global_prompt, data)
        records = []
        for client, result in zip(clients, results):
            records += personalization.score_personalization(
                grid=grid,
                client=client,
                global_generation=global_gen,
                result=result,
                tokenizer=IdTokenizer(),
            )
        return results, records

    def test_grid_points_alpha_ends_and_epoch_zero(self):
        grid = personalization.PersonalizationGrid(
            optimizers=(ClientOptimizer.SGD,),
            learning_rates=(50.0, 0.1),
            epochs=(0, 1, 3),
            l2_strengths=(1.0,),
            interpolation_alphas=(0.0, 0.5, 1.0),
        )
        prompt = np.random.default_rng(0).uniform(-0.5, 0.5, (2, 16)).astype(np.float32)
        results, records = self._run(grid, prompt)
        points = grid.evaluated_points()
        # One row per (client, method, lr, epochs, l2/alpha).
        per_client = 2 * (3 + 3 * 3) + 2 * 3  # finetune+interp (3 epochs x 4) + l2 (3 epochs)
        self.assertLen(records, 2 * per_client)
        keys = {
            (
                r["client_id"],
                r["method"],
                r["learning_rate"],
                r["epochs"],
                r["l2_strength"],
                r["alpha"],
            )
            for r in records
        }
        self.assertLen(keys, len(records))
        for result in results:
            r = {k: np.asarray(v) for k, v in result.items()}
            global_idx = 0
            for k, point in enumerate(points):
                if point["kind"] == "interpolation" and point["alpha"] == 0.0:
                    # alpha = 0 is exactly the global prompt.
                    for key in r:
                        self.assertAllEqual(r[key][k], r[key][global_idx])
                if point["kind"] == "interpolation" and point["alpha"] == 1.0:
                    # alpha = 1 is exactly the plain fine-tuned prompt (evaluated just before).
                    finetune_idx = k - 3
                    self.assertEqual(points[finetune_idx]["kind"], "finetune")
                    for key in r:
                        self.assertAllEqual(r[key][k], r[key][finetune_idx])
                if point["kind"] == "finetune" and point["lr"] == 50.0:
                    self.assertNotAllClose(r["local_loss_sum"][k], r["local_loss_sum"][global_idx])
        # Epoch 0 rows reproduce the global prompt's scores for every method.
        epoch0 = [r for r in records if r["epochs"] == 0 and r["client_id"] == "c0"]
        self.assertLen(
            {(r["local_rougeL"], r["global_rougeL"], r["local_loss"]) for r in epoch0}, 1
        )

    def test_very_large_lambda_keeps_the_global_prompt(self):
        # Adam's step is bounded by lr, so the L2 pull (gradient 1e4 * (P - P_g))
        # dominates the data gradient: the prompt stays within ~lr of P_g.
        grid = personalization.PersonalizationGrid(
            optimizers=(ClientOptimizer.ADAM,),
            learning_rates=(1e-3,),
            epochs=(0, 2),
            l2_strengths=(1e4,),
        )
        prompt = np.random.default_rng(1).uniform(-0.5, 0.5, (2, 16)).astype(np.float32)
        results, _ = self._run(grid, prompt)
        r = {k: np.asarray(v) for k, v in results[0].items()}
        # points: global, finetune@2, l2@2
        finetune_change = abs(r["local_loss_sum"][1] - r["local_loss_sum"][0])
        l2_change = abs(r["local_loss_sum"][2] - r["local_loss_sum"][0])
        self.assertGreater(finetune_change, 0)
        self.assertLess(l2_change, 0.2 * finetune_change)

    def test_bad_grid_values_are_named(self):
        with self.assertRaisesRegex(ValueError, "interpolation_alphas"):
            personalization.PersonalizationGrid(interpolation_alphas=(1.5,))
        with self.assertRaisesRegex(ValueError, "personalization_epochs"):
            personalization.PersonalizationGrid(epochs=(4, 2))


if __name__ == "__main__":
    tf.test.main()
