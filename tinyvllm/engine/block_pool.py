"""The KV block pool seen from Python: which physical blocks are free.

Blocks are fixed-size pages of the native KV cache; a sequence owns the blocks in its table
until it finishes, is aborted or is preempted."""


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, seq, num_tokens: int) -> int:
        """New blocks `seq` needs so that `num_tokens` more tokens fit after its computed ones."""
        total = -(-(seq.num_computed_tokens + num_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def can_allocate(self, seq, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self.free_blocks)

    def allocate(self, seq, num_tokens: int) -> None:
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self.free_blocks):
            raise RuntimeError("KV block pool exhausted")  # callers check can_allocate first
        seq.block_table.extend(self.free_blocks.pop() for _ in range(need))

    def free(self, seq) -> None:
        self.free_blocks.extend(reversed(seq.block_table))
        seq.block_table = []
        seq.num_computed_tokens = 0
