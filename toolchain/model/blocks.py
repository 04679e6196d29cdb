"""Row blocks for float64 work on large matrices (norm folding, rotations of V x D tables)."""

ROW_BLOCK_BYTES = 64 * 2**20  # float64 working set of one row block


def row_blocks(rows: int, cols: int) -> list[slice]:
    """Row ranges of a (rows x cols) matrix whose float64 copy is at most ROW_BLOCK_BYTES each."""
    step = max(1, ROW_BLOCK_BYTES // (8 * max(cols, 1)))
    return [slice(start, start + step) for start in range(0, rows, step)]
