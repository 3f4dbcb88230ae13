"""Plain-text tables for the terminal: traces, logit-lens readings, tensor types."""

from __future__ import annotations

from ..introspect.token_labels import token_text, visible


def _pct(p: float | None) -> str:
    return "" if p is None else f"{100 * p:5.1f}%"


def trace_table(steps, sampling: bool) -> str:
    """One line per generation step: the chosen token, its probability, and the top-k candidates.
    With sampling, each probability is followed by the one in the distribution drawn from."""
    header = f"{'step':>4}  {'chosen':<16} {'prob':>6}" + (f" {'drawn':>6}" if sampling else "") + "  top candidates"
    lines = [header]
    for s in steps:
        chosen = s.chosen
        cells = [f"{visible(c.text)} {_pct(c.prob).strip()}" + (f" ({_pct(c.sampled_prob).strip()})" if sampling else "")
                 for c in s.candidates]
        line = f"{s.index + 1:>4}  {visible(chosen.text):<16} {_pct(chosen.prob)}"
        line += f" {_pct(chosen.sampled_prob)}" if sampling else ""
        lines.append(line + "  " + " · ".join(cells))
    return "\n".join(lines)


def lens_table(top_ids, top_probs, tokenizer, position: int, k: int = 3) -> str:
    """The logit lens at one position: for each layer, its top-k tokens with probabilities."""
    lines = [f"{'layer':>5}  top {k} tokens read from the residual stream"]
    for layer in range(top_ids.shape[0]):
        cells = [f"{visible(token_text(tokenizer, int(i))):<12} {_pct(float(p))}"
                 for i, p in zip(top_ids[layer, position, :k], top_probs[layer, position, :k])]
        lines.append(f"{layer:>5}  " + "  ".join(cells))
    return "\n".join(lines)


def lens_grid(top_ids, tokenizer, position_labels: list[str], width: int = 10) -> str:
    """The logit lens at every position: layers x positions, each cell the top-1 token."""
    def cell(text: str) -> str:
        return (text[: width - 1] + "…" if len(text) > width else text).ljust(width)

    lines = [f"{'layer':>5}  " + " ".join(cell(t) for t in position_labels)]
    for layer in range(top_ids.shape[0]):
        row = [cell(visible(token_text(tokenizer, int(top_ids[layer, p, 0])))) for p in range(top_ids.shape[1])]
        lines.append(f"{layer:>5}  " + " ".join(row))
    return "\n".join(lines)


def megabytes(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:,.1f} MiB"


def tensor_type_table(rows: list[dict]) -> str:
    lines = [f"{'type':<8} {'tensors':>7} {'parameters':>13} {'in file':>12} {'in memory':>12}"]
    for r in rows:
        lines.append(f"{r['type']:<8} {r['tensors']:>7} {r['parameters']:>13,} {megabytes(r['file_bytes']):>12} "
                     f"{megabytes(r['memory_bytes']):>12}")
    return "\n".join(lines)
