"""The catalogue of bad inputs (docs/reliability.md): each row is a case here, run as a test.

    .venv/bin/python -m tests.test_reliability > docs/reliability.md   # regenerate the page

Every case builds the bad input the way a user would meet it (a CLI argument, a recipe value, a
data file, a callback or optimizer argument, a checkpoint) and must fail with its exception type
and a message naming the value and the fix. The page shows the exact message each case gets; a
test checks that the page is the one this module writes, so the page cannot drift from the code.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGE = REPO_ROOT / "docs" / "reliability.md"
LM = [str(REPO_ROOT / "recipes/lm/base.yaml"), str(REPO_ROOT / "recipes/lm/models/transformer.yaml")]


@dataclass(frozen=True)
class Case:
    area: str
    bad_input: str
    trigger: Callable[[Path], object]  # gets a scratch directory
    error: type[BaseException]
    says: str  # a regular expression the message must match: the value and the fix


def cli(*args: str) -> Callable[[Path], object]:
    """``nl-lightning fit`` of the LM recipe with ``args`` (from the scratch directory)."""

    def run(tmp: Path):
        import os

        from nl_lightning.cli import main

        previous = os.getcwd()
        os.chdir(tmp)
        try:
            return main(["fit", *(a for path in LM for a in ("--config", path)), "--trainer.max_steps=1",
                         "--data.init_args.max_bytes=200000", *args])
        finally:
            os.chdir(previous)

    return run


def model(**overrides) -> Callable[[Path], object]:
    def run(tmp: Path):
        from nl_lightning.models import Hope

        return Hope("tiny", overrides=overrides)

    return run


def byte_data(**kwargs) -> Callable[[Path], object]:
    def run(tmp: Path):
        from nl_lightning.data import ByteLMDataModule

        texts = tmp / "texts"
        texts.mkdir(exist_ok=True)
        for i in range(4):
            (texts / f"f{i}.py").write_text(f"x = {i}\n" * 200)
        module = ByteLMDataModule(**{"paths": [str(texts)], "data_dir": str(tmp / "data"), **kwargs})
        module.setup("fit")
        return module

    return run


def continual_data(**kwargs) -> Callable[[Path], object]:
    def run(tmp: Path):
        from nl_lightning.data import ContinualDataModule

        module = ContinualDataModule(**kwargs)
        module.setup("fit")
        return module

    return run


def npz_with_nan(tmp: Path):
    from nl_lightning.data.continual import npz_stream

    x = np.random.default_rng(0).random((20, 4)).astype(np.float32)
    x[3, 1] = np.nan
    path = tmp / "arrays.npz"
    np.savez(path, x_train=x, y_train=np.arange(20) % 2, x_test=x[:10] * 0, y_test=np.arange(10) % 2)
    return npz_stream(str(path), scenario="class", num_tasks=2)


def nested(**kwargs) -> Callable[[Path], object]:
    def run(tmp: Path):
        from nl_lightning.optim import NestedOptimizer

        return NestedOptimizer([torch.nn.Parameter(torch.zeros(3))], **kwargs)

    return run


def scheduler_fit(levels) -> Callable[[Path], object]:
    """Three steps of a tiny LM with a NestedScheduler over ``levels``."""

    def run(tmp: Path):
        from lightning.pytorch import Trainer

        from nl_lightning.callbacks import NestedScheduler
        from nl_lightning.models import TransformerPP
        from nl_lightning.modules import LanguageModel

        module = LanguageModel(TransformerPP("tiny", overrides={"n_layer": 1}))
        data = byte_data(seq_len=16, batch_size=2)(tmp)
        trainer = Trainer(max_steps=3, callbacks=[NestedScheduler(levels)], logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, limit_val_batches=0, default_root_dir=tmp)
        return trainer.fit(module, data)

    return run


def diverging_fit(tmp: Path):
    from lightning.pytorch import Trainer, seed_everything

    from nl_lightning.models import TransformerPP
    from nl_lightning.modules import LanguageModel

    seed_everything(0)
    module = LanguageModel(TransformerPP("tiny", overrides={"n_layer": 1}),
                           optimizer=lambda params: torch.optim.SGD(params, lr=1e30), warmup_steps=0)
    trainer = Trainer(max_steps=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      limit_val_batches=0, default_root_dir=tmp)
    return trainer.fit(module, byte_data(seq_len=16, batch_size=2)(tmp))


def truncated_checkpoint(tmp: Path):
    bad = tmp / "last.ckpt"
    bad.write_bytes(b"PK\x03\x04 half a zip archive")
    (tmp / "epoch=0-step=10.ckpt").write_bytes(b"")
    return cli("--ckpt_path", str(bad))(tmp)


def another_models_checkpoint(tmp: Path):
    from nl_lightning.models import Titans, TransformerPP
    from nl_lightning.modules import LanguageModel

    saved = {"state_dict": LanguageModel(TransformerPP("tiny", overrides={"n_layer": 1})).state_dict()}
    return LanguageModel(Titans("tiny", overrides={"n_layer": 2})).on_load_checkpoint(saved)


def language_model(**kwargs) -> Callable[[Path], object]:
    def run(tmp: Path):
        from nl_lightning.models import TransformerPP
        from nl_lightning.modules import LanguageModel

        return LanguageModel(TransformerPP("tiny", overrides={"n_layer": 1}), **kwargs)

    return run


CASES: dict[str, Case] = {
    # -- CLI and recipes ---------------------------------------------------------------------------
    "unknown class": Case("CLI", "`--model.init_args.network.class_path=nl_lightning.models.Hopee` (a typo)",
                          cli("--model.init_args.network.class_path=nl_lightning.models.Hopee"), SystemExit,
                          r"Hopee.*Valid classes shipped with nl_lightning.*nl_lightning\.models\.Hope"),
    "unknown preset": Case("recipe", "`preset: huge`", cli("--model.init_args.network.init_args.preset=huge"),
                           ValueError, r"huge.*tiny"),
    "wrong type": Case("recipe", "`trainer.max_steps: ten`", cli("--trainer.max_steps=ten"), SystemExit,
                       r"max_steps.*Got value: ten"),
    "negative warm-up": Case("recipe", "`warmup_steps: -5`", language_model(warmup_steps=-5), ValueError,
                             r"warmup_steps must be >= 0, got -5"),
    "compile option": Case("recipe", "`compile: fast`", language_model(compile="fast"), TypeError,
                           r"compile must be true/false or a dict.*got 'fast'"),
    "min lr ratio": Case("recipe", "`min_lr_ratio: 2`", language_model(min_lr_ratio=2.0), ValueError,
                         r"min_lr_ratio must be in \[0, 1\], got 2"),
    # -- model configuration ---------------------------------------------------------------------
    "memory impl": Case("model", "`memory_impl: cuda`", model(memory_impl="cuda"), ValueError,
                        r"memory_impl must be one of .*got 'cuda'"),
    "write rule": Case("model", "`write_rule: hebbian`", model(write_rule="hebbian"), ValueError,
                       r"write_rule must be 'delta' or 'paper', got 'hebbian'"),
    "key shift type": Case("model", "`key_shift: 'yes'`", model(key_shift="yes"), ValueError,
                           r"key_shift must be true or false, got 'yes'"),
    "key shift kernel": Case("model", "`key_shift: true` with `conv_kernel: 1`", model(conv_kernel=1), ValueError,
                             r"key_shift needs conv_kernel >= 2"),
    "reset period": Case("model", "`proj_reset_every: 100` (not a multiple of proj_chunk_size 64)",
                         model(proj_reset_every=100), ValueError, r"proj_reset_every must be None or a positive multiple"),
    "context periods": Case("model", "`cms_in_context: true` with 3 CMS levels and 4 context periods",
                            model(cms_in_context=True), ValueError, r"one entry per CMS level"),
    # -- data ---------------------------------------------------------------------------------------
    "empty glob": Case("data", "`paths: ['/no/such/*.txt']`", byte_data(paths=["/no/such/*.txt"]), FileNotFoundError,
                       r"/no/such/\*\.txt"),
    "tiny corpus": Case("data", "`seq_len: 100000` on a 3 KB corpus", byte_data(seq_len=100_000), ValueError,
                        r"seq_len=100000 needs at least 100001 bytes.*lower seq_len or add text"),
    "batch size": Case("data", "`batch_size: 0`", byte_data(batch_size=0), ValueError,
                       r"batch_size must be a positive integer, got 0"),
    "val lengths": Case("data", "`val_lengths: [256]` (= seq_len)", byte_data(val_lengths=[256]), ValueError,
                        r"val_lengths must be distinct positive integers other than seq_len=256"),
    "shuffle seed": Case("data", "`shuffle_seed: 'x'`", byte_data(shuffle_seed="x"), ValueError,
                         r"shuffle_seed must be an integer or null, got 'x'"),
    "unknown stream": Case("data", "continual `stream: fashion`", continual_data(stream="fashion"), ValueError,
                           r"unknown stream 'fashion'; choose one of"),
    "epochs per task": Case("data", "continual `epochs_per_task: 0`", continual_data(epochs_per_task=0), ValueError,
                            r"epochs_per_task must be a positive integer, got 0"),
    "too many tasks": Case("data", "continual `stream: split`, `num_tasks: 20` (10 classes)",
                           continual_data(stream="split", num_tasks=20), ValueError, r"num_tasks=20 is more than"),
    "nan in data": Case("data", "a NaN in an `.npz` stream's `x_train`", npz_with_nan, ValueError,
                        r"x_train has non-finite values \(NaN or inf\) in 1 rows, e\.g\. \[3\]"),
    # -- callbacks ----------------------------------------------------------------------------------
    "level glob": Case("callback", "`NestedScheduler(levels={'network.cms.*': 4})` on a model without CMS",
                       scheduler_fit({"network.cms.*": 4}), ValueError, r"level 'network\.cms\.\*' matches no parameter"),
    "no periods": Case("callback", "`NestedScheduler(levels=None)` on a model whose groups carry no period",
                       scheduler_fit(None), ValueError, r"levels=None.*period"),
    "log period": Case("callback", "`NestedScheduler(log_every_n_steps=0)`",
                       lambda tmp: __import__("nl_lightning.callbacks", fromlist=["x"]).NestedScheduler(None, log_every_n_steps=0),
                       ValueError, r"log_every_n_steps must be a positive integer, got 0"),
    # -- optimizers ---------------------------------------------------------------------------------
    "nested preset": Case("optimizer", "`NestedOptimizer(preset='google4')`", nested(preset="google4"), ValueError,
                          r"unknown preset 'google4'"),
    "unstable pull": Case("optimizer", "`NestedOptimizer(lr=0.04, reg=50)` (lr·λ ≥ 1)", nested(lr=0.04, reg=50),
                          ValueError, r"lr·reg·Σw = 0\.04·50·1 = 2 ≥ 1.*reg below 25"),
    "slowest period": Case("optimizer", "`NestedOptimizer(slowest_period=3)` with 5 levels", nested(slowest_period=3),
                           ValueError, r"slowest_period must be an integer of at least 5"),
    "levels order": Case("optimizer", "`NestedOptimizer(levels=[1, 10, 10])`", nested(levels=[1, 10, 10]), ValueError,
                         r"strictly increasing"),
    "diverging lr": Case("training", "SGD at `lr: 1e30`", diverging_fit, FloatingPointError,
                         r"non-finite training loss .* at global step \d+; lower the learning rate"),
    # -- checkpoints --------------------------------------------------------------------------------
    "truncated checkpoint": Case("checkpoint", "`--ckpt_path last.ckpt` cut short by a crash", truncated_checkpoint,
                                 ValueError, r"last\.ckpt cannot be read .*other checkpoints in .*epoch=0-step=10\.ckpt"),
    "missing checkpoint": Case("checkpoint", "`--ckpt_path` to a file that does not exist",
                               lambda tmp: __import__("nl_lightning.checkpoint_io", fromlist=["x"]).load_readable(
                                   torch.load, tmp / "gone.ckpt"), FileNotFoundError, r"gone\.ckpt does not exist"),
    "other model checkpoint": Case("checkpoint", "a Transformer++ checkpoint resumed into Titans",
                                   another_models_checkpoint, ValueError,
                                   r"does not fit this model: .*missing from it.*build the model it was saved from"),
}


def failure(case: Case, tmp: Path) -> BaseException:
    """The exception the case raises (fails the test if it raises none or another type)."""
    with pytest.raises(case.error) as caught:
        case.trigger(tmp)
    return caught.value


def message(error: BaseException, stderr: str = "") -> str:
    """The error's message on one line; for the CLI's argument errors, what it printed from "error:" on."""
    text = str(error)
    if isinstance(error, SystemExit) and "error:" in stderr:
        text = stderr[stderr.index("error:"):]
    return re.sub(r"/tmp/\S*?/", "<tmp>/", " ".join(text.split()))


@pytest.mark.parametrize("name", CASES)
def test_every_catalogued_bad_input_fails_naming_the_value_and_the_fix(name, tmp_path, capsys):
    case = CASES[name]
    error = failure(case, tmp_path)
    text = message(error, capsys.readouterr().err)
    assert re.search(case.says, text), text
    if isinstance(error, SystemExit):  # the CLI's own argument errors: a usage message, not a traceback
        assert error.code not in (0, None) and text.startswith("error:")


def test_the_catalogue_has_at_least_25_rows_across_every_area():
    assert len(CASES) >= 25
    assert {c.area for c in CASES.values()} >= {"CLI", "recipe", "data", "callback", "optimizer", "checkpoint"}


def test_the_page_lists_every_case():
    page = PAGE.read_text()
    for name, case in CASES.items():
        assert case.bad_input in page, f"docs/reliability.md lacks {name!r}: python -m tests.test_reliability"


def render(tmp: Path) -> str:
    import contextlib
    import io

    rows = []
    for name, case in CASES.items():
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            try:
                case.trigger(tmp / re.sub(r"\W+", "_", name))
                text = "(no error)"
            except BaseException as error:  # noqa: BLE001 - the page shows whatever it is
                text = f"`{type(error).__name__}`: {message(error, stderr.getvalue())}"
        escaped = text.replace("|", "\\|")
        rows.append(f"| {case.area} | {case.bad_input} | {escaped} |")
    return "\n".join([
        "# Bad inputs and the errors they get",
        "",
        "Each row is a test (`tests/test_reliability.py`, which also regenerates this page:",
        "`.venv/bin/python -m tests.test_reliability > docs/reliability.md`). Every one fails before",
        "training starts, or at the step where the problem appears, with the value and the fix; none",
        "writes anything into weights or checkpoints. Paths under a scratch directory are shown as `<tmp>/`.",
        "",
        "| area | bad input | what it gets |",
        "|---|---|---|",
        *rows,
        "",
    ])


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        for name in CASES:
            Path(scratch, re.sub(r"\W+", "_", name)).mkdir()
        sys.stdout.write(render(Path(scratch)))
