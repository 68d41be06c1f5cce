"""Forward passes on real tokens only, for the RL step and the fine-tunings: several sequences packed
in a row (`padding_free`) and micro-batches of similar lengths (`by_length`, `in_micro_batches`). The
plain path they replace is one padded forward over the batch; tests/test_ppo.py checks that they agree."""
import torch


# Two things keep padding out of a forward pass. Packing puts several sequences in a row as long as the
# longest, so a row attends over no more than a padded row did (longer rows pack tighter but cost more
# attention than they save). And micro-batches of similar lengths (`ppo.update`, `in_micro_batches`), for
# batches whose sequences are too alike to pack two a row. docs/performance.md has the measurements.
# Every process makes as many calls, as FSDP needs.
def pack_rows(lengths):
    """First-fit decreasing -> (rows, each a list of sequence indices whose lengths sum to at most
    `width`, and width, the longest length); each sequence is in exactly one row."""
    width = max(1, max(lengths))
    rows, free = [], []
    for b in sorted(range(len(lengths)), key=lambda b: -lengths[b]):
        r = next((r for r, room in enumerate(free) if room >= lengths[b]), len(rows))
        if r == len(rows):
            rows.append([])
            free.append(width)
        rows[r].append(b)
        free[r] -= lengths[b]
    return rows, width


def padding_free(forward, input_ids, attention_mask):
    """Runs `forward(input_ids [R, W], position_ids [R, W]) -> [R, W, ...]` on the real tokens alone,
    several sequences a row (`pack_rows`) -> its output laid out as the padded batch, [B, T, ...], 0 on
    padding. Given no attention_mask, Hugging Face's causal mask confines attention to each run of
    position_ids that starts at 0: each sequence attends to itself alone, at the positions it has
    alone (sdpa and eager, tested). A row's empty slots hold position 0 each, sequences of their own
    whose outputs are dropped."""
    real = attention_mask.bool().cpu()  # the layout is planned on the CPU
    lengths = real.sum(-1).tolist()
    rows, width = pack_rows(lengths)
    places = real.flatten().nonzero().squeeze(-1).split(lengths)  # each sequence's places in the flat [B*T]
    slot = torch.full((len(rows), width), -1, dtype=torch.long)  # [R, W] the place each slot holds, -1 empty
    position_ids = torch.zeros_like(slot)  # [R, W]
    for r, seqs in enumerate(rows):
        n = sum(lengths[b] for b in seqs)
        slot[r, :n] = torch.cat([places[b] for b in seqs])
        position_ids[r, :n] = torch.cat([torch.arange(lengths[b]) for b in seqs])
    slot, position_ids = slot.to(input_ids.device), position_ids.to(input_ids.device)
    filled = slot >= 0
    out = forward(input_ids.flatten()[slot.clamp(min=0)], position_ids)  # [R, W, ...]
    padded = out.new_zeros(input_ids.numel(), *out.shape[2:]).index_copy(0, slot[filled], out[filled])
    return padded.view(*input_ids.shape, *out.shape[2:])


def by_length(attention_mask, rows, size):
    """The batch's `rows` sorted by length (stable), `size` at a time: micro-batches of similar lengths."""
    return rows[torch.argsort(attention_mask[rows].sum(-1), stable=True)].split(size)


def in_micro_batches(forward, attention_mask, size):
    """`forward(rows) -> (tensors [len(rows), ...])` run on micro-batches `by_length`, as `update` runs
    them -> the tensors for every row, in the batch's order."""
    chunks = by_length(attention_mask, torch.arange(len(attention_mask), device=attention_mask.device), size)
    parts = [forward(rows) for rows in chunks]
    back = torch.argsort(torch.cat(chunks))
    return [torch.cat(outs)[back] for outs in zip(*parts)]
