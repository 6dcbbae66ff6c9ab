"""Synthetic long-context tasks: answers are recoverable, needles sit at uniform depths, splits don't leak."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from scipy.stats import kstest

from nl_lightning.data import RecallDataModule
from nl_lightning.data.longctx import MQAR_KEYS, MQAR_VALUES, is_held_out, make_mqar, make_niah, make_passkey


@pytest.fixture
def niah_data(text_dir, tmp_path) -> RecallDataModule:
    return RecallDataModule(task="niah", train_length=256, eval_lengths=[512], haystack_paths=[str(text_dir)],
                            data_dir=str(tmp_path / "data"))


def context_and_answer(sample) -> tuple[bytes, bytes]:
    start = int(np.argmax(sample.answer_mask))
    return sample.tokens[:start].tobytes(), sample.answer


@pytest.mark.parametrize("length", [196, 1000, 4096])
def test_passkey_answer_is_the_key_stated_in_the_context(length):
    for index in range(20):
        sample = make_passkey(np.random.default_rng(index), length)
        context, answer = context_and_answer(sample)
        assert len(sample.tokens) == length and re.fullmatch(rb"\d{5}", answer)
        assert re.findall(rb"The pass key is (\d+)\. Remember it\.", context) == [answer]
        assert context.endswith(b"What is the pass key? The pass key is ")


def test_niah_answer_is_the_code_of_the_named_needle(niah_data):
    dataset = niah_data.dataset("train", 512, 20)
    for index in range(20):
        context, answer = context_and_answer(dataset.sample(index))
        (name,) = re.findall(rb"What is the secret code of (\w+)\? The secret code of \1 is $", context)
        assert re.findall(rb"The secret code of " + name + rb" is (\d+)\.", context) == [answer]


# (1, 1, 64): the default of recipes/longctx/tasks/mqar.yaml
@pytest.mark.parametrize("num_pairs, num_queries, length", [(8, 5, 300), (1, 1, 64)])
def test_mqar_every_queried_value_is_the_value_paired_with_its_key_in_the_context(num_pairs, num_queries, length):
    for index in range(20):
        sample = make_mqar(np.random.default_rng(index), length, num_pairs=num_pairs, num_queries=num_queries)
        tokens, answers = sample.tokens, np.flatnonzero(sample.answer_mask)
        assert len(tokens) == length and len(answers) == num_queries
        context = tokens[: answers[0] - 1]
        assert np.isin(context, MQAR_KEYS).sum() == num_pairs and np.isin(context, MQAR_VALUES).sum() == num_pairs
        for position in answers:
            key, value = tokens[position - 1], tokens[position]
            (key_at,) = np.flatnonzero(context == key)
            assert context[key_at + 1] == value


def test_dataset_items_shift_by_one_byte_and_mask_exactly_the_answer():
    data = RecallDataModule(task="passkey", train_length=200, eval_lengths=[300])
    dataset = data.dataset("test", 300, 3)
    inputs, targets, mask = dataset[1]
    sample = dataset.sample(1)
    assert inputs.shape == targets.shape == mask.shape == (299,)
    assert torch.equal(inputs[1:], targets[:-1])
    assert bytes(targets[mask].tolist()) == sample.answer and mask[-5:].all() and mask.sum() == 5


@pytest.mark.parametrize("task", ["passkey", "niah", "mqar"])
def test_needle_depth_is_uniform_over_the_haystack(task, niah_data):
    """Kolmogorov–Smirnov against U(0, 1) with a fixed seed: deterministic, and p is far from the cut-off."""
    if task == "niah":
        dataset = niah_data.dataset("train", 512, 400)
    else:
        dataset = RecallDataModule(task=task, train_length=512, eval_lengths=[512], num_pairs=4).dataset("train", 512, 400)
    depths = np.concatenate([dataset.sample(i).depths for i in range(len(dataset))])
    assert depths.min() >= 0 and depths.max() <= 1
    assert kstest(depths, "uniform").pvalue > 0.01
    # And not all bunched: every decile holds some needles.
    assert np.all(np.histogram(depths, bins=10, range=(0, 1))[0] > 0)


@pytest.mark.parametrize("task", ["passkey", "mqar"])
def test_train_and_test_splits_share_no_sequence_and_are_deterministic(task):
    data = RecallDataModule(task=task, train_length=256, eval_lengths=[256], seed=3)
    train = {data.dataset("train", 256, 300).sample(i).tokens.tobytes() for i in range(300)}
    test = {data.dataset("test", 256, 300).sample(i).tokens.tobytes() for i in range(300)}
    assert len(train) == len(test) == 300 and not train & test
    again = RecallDataModule(task=task, train_length=256, eval_lengths=[256], seed=3).dataset("test", 256, 300)
    assert again.sample(7).tokens.tobytes() in test
    other_seed = RecallDataModule(task=task, train_length=256, eval_lengths=[256], seed=4).dataset("test", 256, 300)
    assert other_seed.sample(7).tokens.tobytes() not in test


@pytest.mark.parametrize("task", ["passkey", "niah"])
def test_evaluation_answers_are_never_training_answers(task, niah_data):
    data = niah_data if task == "niah" else RecallDataModule(task=task, train_length=256, eval_lengths=[256])
    for split, held_out in (("train", False), ("val", True), ("test", True)):
        dataset = data.dataset(split, 256, 50)
        assert all(is_held_out(dataset.sample(i).answer) == held_out for i in range(50)), split


def test_niah_haystack_comes_from_train_files_for_training_and_held_out_files_for_test(niah_data):
    corpus_dir = niah_data._build_corpus()
    train_text, val_text = ((corpus_dir / f"{s}.bin").read_bytes() for s in ("train", "val"))
    for split, own, other in (("train", train_text, val_text), ("test", val_text, train_text)):
        context, _ = context_and_answer(niah_data.dataset(split, 512, 5).sample(0))
        window = max(re.split(rb"\nThe secret code of \w+ is \d+\.\n|\nWhat is the secret", context), key=len)[:64]
        assert window in own and window not in other, split


def test_bad_settings_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match="length=60 is too short.*at least"):
        RecallDataModule(task="passkey", train_length=60)
    with pytest.raises(ValueError, match="num_pairs must be in"):
        RecallDataModule(task="mqar", num_pairs=65)
    with pytest.raises(ValueError, match="cannot hold 8 pairs"):
        RecallDataModule(task="mqar", train_length=20, num_pairs=8)
    with pytest.raises(ValueError, match="unknown task 'copy'"):
        RecallDataModule(task="copy")
    with pytest.raises(ValueError, match="answer_digits must be at least 3"):
        RecallDataModule(answer_digits=2)
    with pytest.raises(ValueError, match="eval_lengths"):
        RecallDataModule(eval_lengths=[])
    with pytest.raises(ValueError, match="haystack corpus has 10 bytes"):
        make_niah(np.random.default_rng(0), 200, np.zeros(10, dtype=np.uint8))


def test_mqar_min_distance_keeps_every_key_that_far_before_the_queries():
    rng = np.random.default_rng(0)
    for _ in range(100):
        sample = make_mqar(rng, 128, 4, 2, min_distance=40)
        first_query = int(np.flatnonzero(sample.answer_mask)[0]) - 1
        keys = [i for i in range(first_query) if 128 <= sample.tokens[i] < 192]
        assert len(keys) == 4 and first_query - max(keys) >= 40
    with pytest.raises(ValueError, match="min_distance"):
        make_mqar(rng, 32, 4, 1, min_distance=30)
    with pytest.raises(ValueError, match="min_distance must be a non-negative integer"):
        make_mqar(rng, 32, 1, 1, min_distance=-1)


def test_mqar_without_min_distance_draws_what_it_drew_before():
    # min_distance=0 must not change the samples behind earlier results
    sample = make_mqar(np.random.default_rng(0), 64, 4, 1)
    assert [i for i, t in enumerate(sample.tokens) if 128 <= t < 192] == [4, 32, 48, 56, 62]


def test_curriculum_batches_grow_in_stages_at_constant_tokens_per_step():
    from nl_lightning.data.longctx import CurriculumBatches

    batches = CurriculumBatches([32, 64, 256], stage_steps=3, tokens=16 * 256, num_pairs=16, seed=0)
    shapes = [batches[step][0].shape for step in range(10)]
    assert shapes[:3] == [(128, 31)] * 3 and shapes[3:6] == [(64, 63)] * 3 and shapes[6:] == [(16, 255)] * 4
    assert batches.stage(0) == (32, 128, 4) and batches.stage(9) == (256, 16, 16)
    inputs, targets, mask = batches[4]
    assert torch.equal(inputs[:, 1:], targets[:, :-1]) and (mask.sum(1) == 8).all()  # every pair queried
    again = CurriculumBatches([32, 64, 256], stage_steps=3, tokens=16 * 256, num_pairs=16, seed=0)[4]
    assert all(torch.equal(a, b) for a, b in zip(batches[4], again))


def test_datamodule_curriculum_feeds_whole_batches_in_order_and_refuses_bad_settings():
    data = RecallDataModule(task="mqar", train_length=64, num_pairs=4, batch_size=2, curriculum=[32, 64],
                            curriculum_steps=2, eval_lengths=[64])
    loader = data.train_dataloader()
    shapes = [batch[0].shape for _, batch in zip(range(4), loader)]
    assert shapes == [(4, 31), (4, 31), (2, 63), (2, 63)]
    with pytest.raises(ValueError, match="ending at train_length=64"):
        RecallDataModule(task="mqar", train_length=64, curriculum=[32, 128], eval_lengths=[64])
    with pytest.raises(ValueError, match="task='mqar' only"):
        RecallDataModule(task="passkey", train_length=512, curriculum=[256, 512])
    with pytest.raises(ValueError, match="curriculum_steps must be a positive integer"):
        RecallDataModule(task="mqar", train_length=64, curriculum=[64], curriculum_steps=0, eval_lengths=[64])
