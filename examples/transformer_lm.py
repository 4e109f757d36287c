"""Hessian spectra of a small transformer language model, in a plain PyTorch training loop.

A character-level, causal, pre-norm transformer (two ``nn.TransformerEncoderLayer`` s) learns
to continue Python's own ``textwrap`` module source (about 20 KB, shipped with Python, so
this runs offline). After every epoch a :class:`layerhessians.SpectraTracker` measures the
spectrum of the full loss Hessian and of its diagonal blocks (embeddings, each layer's
attention and MLP, the output head) on a fixed set of sequences, and appends them to a run
directory that ``layerhessians plot`` and ``layerhessians match`` read.

Run (timings: ``python benchmarks/bench_examples.py``; ``--quick``: a few seconds; one torch
thread unless ``--threads N``)::

    python examples/transformer_lm.py --run runs/transformer_lm
    python examples/transformer_lm.py --run runs/transformer_lm --epochs 8 --resume
    layerhessians match runs/transformer_lm --out runs/match

The loss is the mean next-token cross-entropy over all token positions, so an "example" of
the Hessian's mean is one token position; every sequence has the same length, so the mean
over sequences (what the engine weights batches by) equals the mean over tokens.
"""

import argparse
import inspect
import textwrap
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import layerhessians as lh
from layerhessians.analysis.report import make_figures
from layerhessians.store.checkpoints import save_torch  # atomic torch.save
from layerhessians.training.threads import set_threads

# Blocks by parameter-name pattern (fnmatch), input to output.
BLOCK_PATTERNS = OrderedDict([
    ("embedding", ["embed.weight", "position"]),
    ("layers.0.attention", ["layers.0.self_attn.*"]),
    ("layers.0.mlp", ["layers.0.linear*"]),
    ("layers.1.attention", ["layers.1.self_attn.*"]),
    ("layers.1.mlp", ["layers.1.linear*"]),
    ("head", ["head.*"]),
])


class CharTransformer(nn.Module):
    """Causal character-level transformer: token + learned position embeddings, pre-norm
    encoder layers under a causal mask, a final layer norm and a linear head.
    ``forward(tokens [B, T] int64) -> logits [B, T, vocab]``."""

    def __init__(self, vocab: int, context: int = 64, width: int = 64, heads: int = 4,
                 layers: int = 2, hidden: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.02 * torch.randn(context, width))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, hidden, dropout=0.0, batch_first=True,
                                       norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens):
        length = tokens.shape[1]
        h = self.embed(tokens) + self.position[:length]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        for layer in self.layers:
            h = layer(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


def next_token_loss(logits, targets):
    """Mean cross-entropy over every token position: logits [B, T, V], targets [B, T]."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def select_blocks(model, patterns=BLOCK_PATTERNS):
    """``{block: [leaf parameters]}``: the parameters whose names match each block's patterns
    (:func:`layerhessians.select_blocks`, each parameter in one block)."""
    return lh.select_blocks(model, patterns=patterns)


def corpus():
    """The text (``textwrap``'s source) as a LongTensor of character ids, and the alphabet."""
    text = inspect.getsource(textwrap)
    alphabet = sorted(set(text))
    return torch.tensor([alphabet.index(c) for c in text], dtype=torch.long), alphabet


def windows(ids, starts, context):
    """Input and next-token target sequences [len(starts), context] starting at ``starts``."""
    index = torch.as_tensor(starts)[:, None] + torch.arange(context + 1)
    chunk = ids[index]
    return chunk[:, :-1], chunk[:, 1:]


def settings(quick: bool) -> dict:
    if quick:
        return dict(epochs=2, steps=8, batch=16, hessian_sequences=8, iterations=12)
    return dict(epochs=6, steps=60, batch=32, hessian_sequences=32, iterations=48)


def parse_args(argv=None, default_run="runs/transformer_lm"):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default=default_run, help="run directory")
    parser.add_argument("--epochs", type=int, help="epochs (default 6, --quick 2)")
    parser.add_argument("--quick", action="store_true", help="a few seconds: smaller everything")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: right on a shared machine; "
                             "0 keeps torch's default of one per core)")
    args = parser.parse_args(argv)
    set_threads(args.threads or None)  # torch.set_num_threads, checked
    return args


def main(argv=None):
    args = parse_args(argv)
    cfg = settings(args.quick)
    epochs = args.epochs or cfg["epochs"]
    context = 64
    torch.manual_seed(args.seed)
    ids, alphabet = corpus()
    split = int(0.9 * len(ids))
    model = CharTransformer(len(alphabet), context=context)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    # the fixed Hessian data: evenly spaced held-out sequences, one batch
    starts = torch.linspace(split, len(ids) - context - 2, cfg["hessian_sequences"]).long()
    hessian_data = windows(ids, starts, context)

    run = Path(args.run)
    tracker = lh.SpectraTracker(
        model, next_token_loss, hessian_data, run_dir=run, blocks=select_blocks(model),
        iterations=cfg["iterations"], seed=args.seed, resume=args.resume,
        overwrite=not args.resume, dataset="textwrap.py", settings={**cfg, "lr": 3e-3},
        loggers=[lambda epoch, scalars, spectra: print(
            f"epoch {epoch}: top eigenvalue " + ", ".join(
                f"{k.split('/', 1)[1]} {v:.3g}" for k, v in scalars.items()
                if k.startswith("top_eigenvalue/")))])
    # the loop's own checkpoint, written after the tracker's record of the same epoch
    state_path = run / "lm_state.pt"
    first = 0
    if args.resume and state_path.exists():
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        first = state["epoch"] + 1
    with tracker:
        for epoch in range(first, epochs + 1):
            losses = []
            if epoch > 0:  # epoch 0: the spectra at initialisation
                generator = torch.Generator().manual_seed(args.seed * 1000 + epoch)
                model.train()
                for _ in range(cfg["steps"]):
                    batch_starts = torch.randint(0, split - context - 1, (cfg["batch"],),
                                                 generator=generator)
                    x, y = windows(ids, batch_starts, context)
                    loss = next_token_loss(model(x), y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    losses.append(loss.item())
            with torch.no_grad():
                model.eval()
                test_loss = next_token_loss(model(hessian_data[0]), hessian_data[1]).item()
            metrics = {"test_loss": test_loss}
            if losses:
                metrics["train_loss"] = sum(losses) / len(losses)
            tracker.update(epoch, metrics=metrics)           # spectra -> run directory
            save_torch(state_path, {"model": model.state_dict(),
                                    "optimizer": optimizer.state_dict(), "epoch": epoch})
    written = make_figures(lh.load_run(run), points=512)
    print(f"run: {run} ({len(written)} figures in {run / 'images'})")
    return run


if __name__ == "__main__":
    main()
