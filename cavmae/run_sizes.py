"""How many rows an encoder graph runs at once on a CPU.

A batch of encoder rows (clips' spectrograms, frames) is split into runs on a CPU for two
reasons, both measured (benchmarks/README.md, "Encoder runs sized for the CPU's cache"):

- Cache: a run of the visual encoder over 10 frames holds 1960 x 3072 float activations (24 MB)
  between its MLP products; 5 frames at a time ran 3-7% faster at 10 frames and 10-16% faster at
  40 (int8 and fp32, 2-core EPYC). About a thousand tokens per run was the best size measured.
- int8: dynamic quantization scales a product's activations by their range over the whole run,
  so a run holding two clips makes one clip's result depend on the other (up to 2% of a token's
  range). Runs never span two clips, so a clip's int8 result is the same alone or in a batch.

fp32 outputs are bit for bit the same however the rows are split.
"""

from __future__ import annotations

#: about this many tokens per encoder run on a CPU (the best of the sizes measured)
CPU_TOKENS_PER_RUN = 1024


def rows_per_run(tokens_per_row: int, rows_per_clip: int = 1) -> int:
    """Rows per encoder run on a CPU: the largest divisor of ``rows_per_clip`` whose tokens fit
    :data:`CPU_TOKENS_PER_RUN`, at least 1.

    A divisor, so that runs split a clip evenly and never hold rows of two clips. Examples:
    frames of 196 tokens, 10 per clip -> 5; one audio row of 512 tokens per clip -> 1.
    """
    if tokens_per_row < 1 or rows_per_clip < 1:
        raise ValueError(f"need tokens_per_row >= 1 and rows_per_clip >= 1, got {tokens_per_row}, {rows_per_clip}")
    fitting = [d for d in range(1, rows_per_clip + 1)
               if rows_per_clip % d == 0 and d * tokens_per_row <= CPU_TOKENS_PER_RUN]
    return max(fitting, default=1)
