"""The transformer language model of ``transformer_lm.py``, trained with PyTorch Lightning;
a :class:`layerhessians.integrations.lightning.SpectraCallback` records the Hessian spectra
(full, embeddings, each layer's attention and MLP, head) after every epoch, and a
:class:`~layerhessians.integrations.tensorboard.TensorBoardLogger` writes their top
eigenvalues, traces and densities to TensorBoard.

Needs ``pip install 'layerhessians[lightning,tensorboard]'``. Run (timings:
``python benchmarks/bench_examples.py``; ``--quick``: a few seconds; one torch thread unless
``--threads N``)::

    python examples/transformer_lm_lightning.py --run runs/transformer_lm_lightning
    tensorboard --logdir runs/transformer_lm_lightning_tensorboard
"""

from pathlib import Path

import lightning.pytorch as pl
import torch
from transformer_lm import (  # the example beside this file
    CharTransformer,
    corpus,
    next_token_loss,
    parse_args,
    select_blocks,
    settings,
    windows,
)

import layerhessians as lh
from layerhessians.analysis.report import make_figures
from layerhessians.integrations.lightning import SpectraCallback
from layerhessians.integrations.tensorboard import TensorBoardLogger


class LanguageModel(pl.LightningModule):
    """The character transformer with its next-token loss and AdamW."""

    def __init__(self, vocab: int, context: int, lr: float = 3e-3):
        super().__init__()
        self.net = CharTransformer(vocab, context=context)
        self.lr = lr

    def forward(self, tokens):
        return self.net(tokens)

    def training_step(self, batch, batch_index):
        x, y = batch
        loss = next_token_loss(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_index):
        x, y = batch
        self.log("test_loss", next_token_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)


def main(argv=None):
    args = parse_args(argv, default_run="runs/transformer_lm_lightning")
    cfg = settings(args.quick)
    epochs = args.epochs or cfg["epochs"]
    context = 64
    pl.seed_everything(args.seed, verbose=False)
    ids, alphabet = corpus()
    split = int(0.9 * len(ids))
    generator = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, split - context - 1, (cfg["steps"] * cfg["batch"],),
                           generator=generator)
    train = torch.utils.data.TensorDataset(*windows(ids, starts, context))
    held_out = torch.linspace(split, len(ids) - context - 2, cfg["hessian_sequences"]).long()
    hessian_data = windows(ids, held_out, context)
    model = LanguageModel(len(alphabet), context)

    run = Path(args.run)
    tensorboard = TensorBoardLogger(run.parent / f"{run.name}_tensorboard", points=256)
    callback = SpectraCallback(
        next_token_loss, hessian_data, run, blocks=lambda module: select_blocks(module.net),
        loggers=[tensorboard], at_start=True, iterations=cfg["iterations"], seed=args.seed,
        resume=args.resume, overwrite=not args.resume, dataset="textwrap.py",
        settings={**cfg, "lr": model.lr})
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[callback], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1,
                         num_sanity_val_steps=0)
    trainer.fit(model,
                torch.utils.data.DataLoader(train, batch_size=cfg["batch"], shuffle=True),
                torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*hessian_data),
                                            batch_size=len(held_out)))
    tensorboard.close()
    written = make_figures(lh.load_run(run), points=512)
    spectra = callback.last
    print("last epoch, top eigenvalue per block: " + ", ".join(
        f"{block} {measure.support[1]:.3g}" for block, measure in spectra.items()))
    print(f"run: {run} ({len(written)} figures in {run / 'images'}); "
          f"tensorboard --logdir {tensorboard.writer.log_dir}")
    return run


if __name__ == "__main__":
    main()
