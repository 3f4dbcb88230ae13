"""Write docs/walkthrough.md: a tour inside SmolLM2 with LucidLM, every output real.

    .venv/bin/python docs/make_walkthrough.py            # writes docs/walkthrough.md and docs/images/
    .venv/bin/python docs/make_walkthrough.py --out DIR  # somewhere else (the slow test does this)

Each `lucid ...` block is produced by parsing that command line with LucidLM's own argument
parser and running the command on one loaded model (loading it once instead of once per
command); the Python blocks run as shown. Timings and sampled text are from this run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import lucidlm  # noqa: E402
from lucidlm.cli import build_parser  # noqa: E402
from lucidlm.introspect.attention import attention_patterns  # noqa: E402
from lucidlm.introspect.token_labels import visible  # noqa: E402

FRANCE = "The capital of France is"
SQUIRREL = "The dog chased the squirrel because it was fast"
WORDS = "king queen prince princess man woman boy girl Paris London Berlin Rome cat dog horse".split()


class Walkthrough:
    def __init__(self, model):
        self.model, self.parts = model, []

    def text(self, markdown: str) -> None:
        self.parts.append(markdown.strip("\n") + "\n")

    def code(self, body: str, lang: str = "") -> None:
        self.parts.append(f"```{lang}\n{body.rstrip()}\n```\n")

    def lucid(self, command: str) -> str:
        """Run `lucid ...` on the loaded model, record the command and its output, return the output."""
        args = build_parser().parse_args(shlex.split(command)[1:])
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            args.run(self.model, args)
        self.code(f"$ {command}\n{out.getvalue()}", "console")
        return out.getvalue()

    def image(self, path: str, alt: str) -> None:
        if not Path(path).exists():
            raise FileNotFoundError(path)
        self.parts.append(f"![{alt}]({path})\n")


def tour(w: Walkthrough) -> None:
    m = w.model
    w.text("""
# Inside a language model, step by step

This walkthrough follows the seeds' tour of a transformer LLM (tokenizer → stack of blocks →
LM head → choosing a token) on LucidLM's default model, SmolLM2-135M-Instruct. Everything
below was produced by `docs/make_walkthrough.py`; rerun it to regenerate this page.

## 1. Tokenization: text to token ids
""")
    ids = m.tokenizer.encode(FRANCE)
    pieces = [visible(m.tokenizer.decode([i])) for i in ids]
    w.code(f">>> m = lucidlm.load()\n>>> m.tokenizer.encode({FRANCE!r})\n{ids}\n"
           f">>> [m.tokenizer.decode([i]) for i in _]   # ␣ marks a space\n{pieces}", "python")
    w.text("""
Most tokens carry their leading space: ` capital` is one token, not a space and a word.
SmolLM2 adds no start-of-text token to plain prompts.

## 2. The architecture

`lucid inspect` prints the module tree (names as in the checkpoint), the configuration, where
the bytes go (the file stores most matrices in 4-bit Q4_1, and the default `--dtype packed` keeps
them so in memory: q, k and v stacked into one `qkv_proj`, gate and up into `gate_up_proj`, the old
names now views of their rows; `--dtype float32` decodes every weight), the KV-cache cost per token
(float16 where our decode kernels run, as here), and the hook points through which everything
below is observed.
""")
    w.lucid("lucid inspect")
    w.text("""
## 3. "The capital of France is" → logits → " Paris"

The model maps 5 token ids to 5 rows of logits, one score per vocabulary entry. Only the
last row predicts what comes after the prompt.
""")
    logits = m.logits(ids)
    top = logits[-1].softmax(-1).topk(5)
    rows = "\n".join(f"{visible(m.tokenizer.decode([int(i)])):>10}  {float(p):.3f}" for i, p in zip(top.indices, top.values))
    w.code(f">>> logits = m.logits(m.tokenizer.encode({FRANCE!r}))\n>>> logits.shape\n{tuple(logits.shape)}\n"
           f">>> m.tokenizer.decode([int(logits[-1].argmax())])\n{m.tokenizer.decode([int(logits[-1].argmax())])!r}\n"
           f">>> logits[-1].softmax(-1).topk(5)   # token, probability\n{rows}", "python")
    w.text("""
## 4. Generation, one token at a time

Generation is a loop: pick a token, append it, run again. `lucid trace` shows each step's
choice, its probability and the runners-up.
""")
    w.lucid(f'lucid trace "{FRANCE}" --steps 6')
    w.text("""
## 5. The logit lens: what the model "thinks" after each layer

Applying the final norm and the LM head to the residual stream after every block shows the
prediction forming. For this small model, " Paris" surfaces only in the last layers.
""")
    w.lucid(f'lucid trace "{FRANCE}" --steps 1 --lens --out images')
    w.image("images/lens.png", "logit lens heatmap")
    w.text("""
## 6. Why a KV cache

Without a cache every step re-runs the model over the whole sequence; with it, each step
computes only the new token and attends over stored keys and values. Same tokens, less time:
""")
    w.lucid("lucid kv-demo --max-new-tokens 32")
    w.text(f"""
## 7. Attention: where each token looks

In "{SQUIRREL}", which earlier token does " it" attend to? The script picks the head
(over all layers) that sends the most of " it"'s attention to " squirrel":
""")
    tokens = m.token_batch(SQUIRREL)
    texts = [m.tokenizer.decode([i]) for i in tokens[0].tolist()]
    it, squirrel = texts.index(" it"), texts.index(" squirrel")
    patterns = attention_patterns(m.model, tokens)  # (L, H, T, T)
    layer, head = divmod(int(patterns[:, :, it, squirrel].argmax()), patterns.shape[1])
    w.text(f"layer {layer}, head {head}: {100 * float(patterns[layer, head, it, squirrel]):.0f}% of \" it\"'s "
           "attention goes to \" squirrel\".")
    w.lucid(f'lucid attention "{SQUIRREL}" --layer {layer} --head {head} --out images')
    w.image(f"images/attention-L{layer}-H{head}.png", "one attention head")
    w.text("All heads of the same layer, and the interactive page (hover a token, pick layer and head): "
           "[images/attention.html](images/attention.html).")
    w.lucid(f'lucid attention "{SQUIRREL}" --layer {layer} --out images')
    w.image(f"images/attention-L{layer}-heads.png", "every head of the layer")
    w.text("""
## 8. Embeddings: words as points

Each token's input embedding is a row of a 49152 × 576 table; a word is the mean of its
tokens' rows. PCA projects them onto the two directions of largest variance:
""")
    w.lucid(f"lucid embed-map {' '.join(WORDS)} --method pca --out images")
    w.image("images/embed-map-input-pca.png", "PCA of input embeddings")
    w.text("""
The same words' last-layer states (each word run alone through all 30 blocks), mapped with
t-SNE, which keeps neighbours together rather than preserving distances:
""")
    w.lucid(f"lucid embed-map {' '.join(WORDS)} --contextual --method tsne --out images")
    w.image("images/embed-map-contextual-tsne.png", "t-SNE of contextual states")
    w.text("""
## 9. Decoding: greedy versus sampling

Greedy decoding always takes the most probable token. Sampling draws from the distribution
after temperature, top-k and top-p (the `drawn` column); a seed makes the draw repeatable.
""")
    w.lucid('lucid trace "Once upon a time" --steps 8 --top-k 3')
    w.lucid('lucid trace "Once upon a time" --steps 8 --top-k 3 --temperature 0.8 --sample-top-k 50 '
            '--top-p 0.95 --seed 42')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="directory for walkthrough.md and images/ (default: docs/)")
    parser.add_argument("--model", default=None)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    (out / "images").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    w = Walkthrough(lucidlm.load(args.model, progress=False))
    previous = Path.cwd()
    os.chdir(out)  # commands write to images/ and print paths relative to the page
    try:
        tour(w)
    finally:
        os.chdir(previous)
    (out / "walkthrough.md").write_text("\n".join(w.parts), encoding="utf-8")
    print(out / "walkthrough.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
